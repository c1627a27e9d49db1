"""Encoder: a folder with good and bad images gives a store of exactly the good ones, equal to vLLM's own."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import config
from PIL import Image

from splitvlm.core.provenance import KeyMaker
from splitvlm.encoder import Encoder
from splitvlm.encoder.inputs import expand_inputs
from splitvlm.store import EmbeddingStore
from splitvlm.tools.samples import save_corpus, synthetic_image

SIZES = [(64, 64), (96, 72), (72, 120), (140, 100), (56, 200)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    good = save_corpus(root / "imgs", 22, seed=3, sizes=SIZES)
    sub = root / "imgs" / "nested"
    sub.mkdir()
    synthetic_image(99, (80, 80)).save(sub / "deep.png")
    good.append(str(sub / "deep.png"))
    bad = {
        "zero.png": b"",
        "text.jpg": b"this is not an image",
        "truncated.png": (root / "imgs" / "img00000.png").read_bytes()[:100],
    }
    for name, data in bad.items():
        (root / "imgs" / name).write_bytes(data)
    Image.new("RGB", (1200, 4), "red").save(root / "imgs" / "thin.png")
    (root / "imgs" / "dir.png").mkdir()
    (root / "imgs" / "link.png").symlink_to(root / "nowhere.png")
    bad_names = set(bad) | {"thin.png", "dir.png", "link.png"}
    return root, good, bad_names


def test_folder_with_bad_files(tiny_model, engine, corpus, tmp_path):
    root, good, bad_names = corpus
    failures = tmp_path / "failures.jsonl"
    cfg = config(tiny_model, tmp_path / "store", failures=str(failures), batch_patches=600)
    stats = Encoder(cfg, engine=engine).encode([str(root / "imgs")])
    assert stats.encoded == len(good) and stats.failed == len(bad_names)
    failed = [json.loads(line) for line in failures.read_text().splitlines()]
    assert {f["path"].rsplit("/", 1)[1] for f in failed} == bad_names
    assert all(f["error"] and "\n" not in f["error"] for f in failed)
    keys = KeyMaker(cfg)
    with EmbeddingStore(cfg.store) as store:
        assert len(store) == len(good)
        assert set(store.keys()) == {keys(open(p, "rb").read()) for p in good}
        entry = store.get(keys(open(good[0], "rb").read()))
        assert entry.meta["source"] == good[0] and entry.meta["vllm_version"] and entry.meta["device"]

    again = Encoder(cfg, engine=engine).encode([str(root / "imgs")])
    assert again.encoded == 0 and again.skipped == len(good) and again.failed == len(bad_names)


def test_stored_embeddings_equal_vllms_own_end_to_end(tiny_model, engine, corpus, tmp_path):
    _, good, _ = corpus
    cfg = config(tiny_model, tmp_path / "store")
    Encoder(cfg, engine=engine).encode(good[:8])
    tok = engine.tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    from splitvlm.core.sources import load_image

    with engine.recording() as recorded:
        engine.generate([{"prompt": text, "multi_modal_data": {"image": load_image(p)[1]}} for p in good[:8]],
                        engine.sampling_params(max_tokens=1))
    keys = KeyMaker(cfg)
    with EmbeddingStore(cfg.store) as store:
        stored = [store.get(keys(open(p, "rb").read())).image_embeds for p in good[:8]]
    assert len(recorded) == 8
    for s in stored:
        assert any(r.dtype == s.dtype and r.shape == s.shape and torch.equal(r, s) for r in recorded)
    # and the check has teeth: a one-ulp change is not equal
    bumped = stored[0].clone()
    bumped.view(-1).view(torch.int16)[0] += 1
    assert not any(r.shape == bumped.shape and torch.equal(r, bumped) for r in recorded)


def test_input_forms_and_duplicates(tiny_model, engine, corpus, tmp_path):
    root, good, _ = corpus
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(good[:3]) + "\n")
    jsonl = tmp_path / "imgs.jsonl"
    jsonl.write_text("".join(json.dumps({"image": p}) + "\n" for p in good[2:5]))
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(good[0], "rb").read())
    specs = [str(listing), str(jsonl), str(root / "imgs" / "img0000[5-6].png"), str(copy)]
    assert len(expand_inputs(specs)) == 8
    stats = Encoder(config(tiny_model, tmp_path / "store"), engine=engine).encode(specs)
    assert stats.encoded == 7 and stats.duplicates == 1 and stats.failed == 0


def test_each_file_is_read_once_so_key_and_tensor_share_bytes(tiny_model, engine, corpus, tmp_path, monkeypatch):
    """A file that changes mid-run can never be stored under the key of its old bytes."""
    import splitvlm.encoder.pipeline as pipeline

    _, good, _ = corpus
    real, reads = pipeline.read_image_bytes, {}

    def counted(path):
        reads[path] = reads.get(path, 0) + 1
        return real(path)

    monkeypatch.setattr(pipeline, "read_image_bytes", counted)
    cfg = config(tiny_model, tmp_path / "store")
    stats = Encoder(cfg, engine=engine).encode(good[:4])
    assert stats.encoded == 4 and reads == {p: 1 for p in good[:4]}
    assert Encoder(cfg, engine=engine).encode(good[:4]).skipped == 4 and reads == {p: 2 for p in good[:4]}


def test_resume_starts_no_engine(tiny_model, engine, corpus, tmp_path):
    _, good, _ = corpus
    cfg = config(tiny_model, tmp_path / "store")
    Encoder(cfg, engine=engine).encode(good[:3])
    again = Encoder(cfg)  # no engine given: one would start only if something needed encoding
    stats = again.encode(good[:3])
    assert stats.skipped == 3 and again._engine is None


COUNT_STARTS = """
import json, sys
from splitvlm.core.config import Config
from splitvlm.core.engine import engine_starts
from splitvlm.encoder import Encoder
model, store, max_len, *inputs = sys.argv[1:]
cfg = Config(model=model, store=store, max_model_len=int(max_len), show_progress=False, batch_patches=600)
encoder = Encoder(cfg)
stats = encoder.encode(inputs)
print(json.dumps({"encoded": stats.encoded, "failed": stats.failed, "eager": encoder.engine.settings["enforce_eager"],
                  "encoder_only": encoder.engine.encoder_only, "starts": engine_starts()}))
"""


def count_starts(model: str, store, max_len: int, inputs: list[str]) -> dict:
    """Encoder.encode in a fresh process (a second in-process vLLM engine would break the session's)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", COUNT_STARTS, model, str(store), str(max_len), *inputs],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_encode_starts_vllm_once_whatever_the_inputs(tiny_model, corpus, tmp_path):
    """Good, bad and unpreprocessable inputs in one run: one engine start (encoder-only, eager), never one per image."""
    root, good, bad_names = corpus
    out = count_starts(tiny_model, tmp_path / "store", 2048, [str(root / "imgs")])
    assert out == {"encoded": len(good), "failed": len(bad_names), "eager": True, "encoder_only": True, "starts": 1}


CLI_COUNTING_STARTS = """
import atexit, sys
from splitvlm.core.engine import engine_starts
out, sys.argv = sys.argv[1], ["splitvlm", *sys.argv[2:]]
atexit.register(lambda: open(out, "w").write(str(engine_starts())))
from splitvlm.cli.main import main
main()
"""


def test_engine_that_cannot_start_stops_the_cli_once_with_one_line_and_keeps_the_store(tiny_model, engine, corpus,
                                                                                       tmp_path):
    """`splitvlm encode` in its own process (the CLI's main, with vLLM engine starts counted on the way out)
    on a store that already holds 2 of the inputs: vLLM refuses the engine; one start, exit 1, one line
    with vLLM's reason, no summary, and the 2 stored entries kept."""
    import subprocess
    import sys

    _, good, _ = corpus
    cfg = config(tiny_model, tmp_path / "store")
    Encoder(cfg, engine=engine).encode(good[:2])
    starts = tmp_path / "starts"
    proc = subprocess.run(  # longer than the model's positions: vLLM refuses
        [sys.executable, "-c", CLI_COUNTING_STARTS, str(starts), "encode", "--model", tiny_model, "--store", cfg.store,
         "--max-model-len", str(10**8), "--no-progress", *good[:6]],
        capture_output=True, text=True, timeout=600,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: vLLM could not start"), proc.stderr
    assert "max_model_len" in errors[0] or "max model len" in errors[0].lower(), errors[0]  # vLLM's reason, not a header
    assert "skipped" not in proc.stderr and "encoded" not in proc.stdout
    assert starts.read_text() == "1"  # never one start per image or per batch
    with EmbeddingStore(cfg.store) as store:
        assert len(store) == 2
