"""Qwen2.5-VL and Qwen3-VL are exact like Qwen2-VL: the split flow, batch invariance, sensitivity, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from helpers import batch_runs, config, flip_one_ulp, write_jobs
from test_sensitivity import chat_prompt, greedy, make_image

from benchmarks.common import encode_batches
from benchmarks.exactness import chat_prompt as text_prompt
from splitvlm.cli.main import cli
from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.families import FAMILIES, LEGACY, family_of_config, family_of_model
from splitvlm.core.identity import model_fingerprint
from splitvlm.core.provenance import KeyMaker, Provenance
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.encoder import Encoder
from splitvlm.store import EmbeddingStore, Expect
from splitvlm.store.entry import UNNAMED_FAMILY, check_tensors
from splitvlm.store.errors import StoreError
from splitvlm.store.key import image_digest, key_from_digest
from splitvlm.tools import demo
from splitvlm.tools.make_model import build_config
from splitvlm.tools.samples import synthetic_image
from splitvlm.verify import verify

TINY = {"tiny-qwen2.5-vl": ("qwen2.5-vl", 128, 0), "tiny-qwen3-vl": ("qwen3-vl", 512, 3)}  # family, width, deepstack
# Engines started here live as long as the process: vLLM's shutdown of one engine tears down the
# process-wide distributed state that every other engine in the process (the session's) still uses.
KEEP_ALIVE: list = []


@pytest.fixture(scope="module", params=list(TINY))
def family_model(request, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("families") / request.param
    made = CliRunner().invoke(cli, ["make-model", "--arch", request.param, "--out", str(out)])
    assert made.exit_code == 0, made.output
    return str(out)


@pytest.fixture(scope="module")
def family_engine(family_model):
    """One full engine per family (pytest runs each family's tests together)."""
    from splitvlm.core.engine import Engine

    engine = Engine(Config(model=family_model, max_model_len=2048, show_progress=False))
    KEEP_ALIVE.append(engine)
    return engine


def arch_of(model: str) -> str:
    return json.loads(open(f"{model}/splitvlm-model.json").read())["arch"]


@pytest.mark.slow
def test_encode_decode_verify_identical_and_a_flip_is_caught(family_model, family_engine, tmp_path):
    family, width, deepstack = TINY[arch_of(family_model)]
    assert (family_engine.family.name, family_engine.embed_width, family_engine.layout.deepstack) == TINY[arch_of(family_model)]
    workdir = tmp_path / "demo"
    demo.prepare_workdir(workdir, fresh=False)
    paths = demo.write_corpus(workdir / "images", 3)
    cfg = Config(model=family_model, store=str(workdir / "store"), max_model_len=2048, show_progress=False)
    encoder = Encoder(cfg)  # encoder-only engine, as `splitvlm encode` starts it
    KEEP_ALIVE.append(encoder)
    assert encoder.encode([str(p) for p in paths]).encoded == 3 and encoder.engine.encoder_only
    lines: list[str] = []
    result = demo.run_demo(workdir, images=3, max_tokens=8, model_dir=family_model, engine=family_engine,
                           echo=lines.append, show_progress=False)
    printed = "\n".join(lines)
    assert "[encode]  encoded 0, skipped 3 already stored" in printed  # decode used the encoder-only entries
    assert result.ok and result.identical == result.jobs == 3 * len(demo.PROMPTS) + 1, printed
    report = json.loads(result.report.read_text(encoding="utf-8"))
    assert report["embeddings_checked"] == report["embeddings_identical"] == 3  # full engine == encoder-only
    assert len({j["sha256_split"] for j in report["jobs"]}) > result.jobs // 2
    with EmbeddingStore(cfg.store, readonly=True) as store:
        entries = [store.get(k) for k in store.keys()]
    assert {(e.meta["family"], e.meta["hidden_size"], e.meta["deepstack"]) for e in entries} == {
        (family, str(width), str(deepstack))}
    assert all(json.loads(e.meta["provenance"])["family"] == family for e in entries)
    checked = CliRunner().invoke(cli, ["store", "check", "--store", cfg.store])
    assert checked.exit_code == 0 and "3 entries checked, 0 bad" in checked.output, checked.output

    key = KeyMaker(cfg)(paths[0].read_bytes())
    flip_one_ulp(cfg.store, key)
    jobs = read_jobs(str(workdir / "jobs.jsonl"))
    flipped = verify(cfg.replace(max_tokens=8), jobs, engine=family_engine)
    assert not flipped.ok
    (mismatch,) = flipped.embedding_mismatches
    assert mismatch["key"] == key and mismatch["jobs"]
    assert all(j.identical for j in flipped.jobs if j.id not in mismatch["jobs"])


@pytest.mark.slow
def test_batch_1_vs_8_vs_shuffled(family_engine):
    """Qwen2.5-VL: images of one and of several windows, partial ones included (window 4x4 tokens)."""
    sizes = [(64, 64), (96, 128), (168, 84), (120, 140)]
    images = [synthetic_image(i, sizes[i % 4], seed=7) for i in range(8)]
    prepared = [family_engine.preprocess(im) for im in images]
    tokens_hw = [(int(g[0, 1]) // 2, int(g[0, 2]) // 2) for _, g in prepared]
    assert any(h > 4 or w > 4 for h, w in tokens_hw) and any(h % 4 or w % 4 for h, w in tokens_hw)
    alone = [family_engine.run_tower(pv, g)[0] for pv, g in prepared]
    embeds, _ = encode_batches(family_engine, prepared, batch_patches=4096)
    assert all(torch.equal(a, b) for a, b in zip(embeds, alone))  # the tower: batch of 8 == one by one
    jobs = [(i, 2 * (i % 2)) for i in range(8)]  # prompts 0 and 2 by turns
    runs = batch_runs(family_engine, images, prepared, embeds, jobs, text_prompt, shuffled_batch=3)  # 3 + 3 + 2
    reference = runs["e2e/b1"]
    assert len({tuple(t) for t in reference}) >= len(jobs) - 1
    for name, tokens in runs.items():
        assert tokens == reference, name


@pytest.mark.slow
def test_sensitive_like_the_qwen2_vl_tiny_model(family_engine):
    """The thresholds of tests/test_sensitivity.py; for Qwen3-VL also noise in the deepstack levels alone."""
    images = [make_image(i) for i in range(16)]
    text = chat_prompt(family_engine)
    outputs = greedy(family_engine, [{"prompt": text, "multi_modal_data": {"image": image}} for image in images])
    assert len(set(outputs)) >= 14
    questions = ["Describe this image.", "What colour is it?", "Count the objects.", "这是什么？"]
    asked = greedy(family_engine, [{"prompt": chat_prompt(family_engine, q), "multi_modal_data": {"image": images[1]}}
                                   for q in questions])
    assert len(set(asked)) >= 3
    hidden, width = family_engine.hidden_size, family_engine.embed_width
    prepared = [family_engine.preprocess(image) for image in images]
    encoded = [(family_engine.run_tower(pv, grid)[0], grid) for pv, grid in prepared]
    assert all(e.shape[1] == width for e, _ in encoded)

    def noisy(columns: slice) -> int:
        gen = torch.Generator().manual_seed(0)
        prompts = []
        for emb, grid in encoded:
            part = emb[:, columns].float()
            changed = emb.clone()
            changed[:, columns] = (part + torch.randn(part.shape, generator=gen) * 0.01 * part.pow(2).mean().sqrt()).to(emb.dtype)
            prompts.append({"prompt": text, "multi_modal_data": {"image": {"image_embeds": changed, "image_grid_thw": grid}}})
        return sum(a != b for a, b in zip(outputs, greedy(family_engine, prompts)))

    assert noisy(slice(0, width)) >= len(images) // 2
    if width > hidden:  # Qwen3-VL: the deepstack levels reach the output, not only the main part
        assert noisy(slice(hidden, width)) >= len(images) // 2


@pytest.mark.slow
def test_decode_refuses_an_entry_of_another_family(family_model, family_engine, tiny_model, engine, tmp_path):
    family = TINY[arch_of(family_model)][0]
    image = tmp_path / "a.png"
    synthetic_image(3, (96, 96)).save(image)
    store = tmp_path / "store"
    Encoder(config(family_model, store), engine=family_engine).encode([str(image)])
    key = KeyMaker(config(family_model, store))(image.read_bytes())
    jobs = read_jobs(write_jobs(tmp_path / "j.jsonl", [{"id": "by-key", "images": [key], "prompt": "Hi"},
                                                       {"id": "by-path", "images": [str(image)], "prompt": "Hi"}]))
    by_key, by_path = Decoder(config(tiny_model, store, on_missing="skip"), engine=engine).generate(jobs)
    assert by_key.error and key in by_key.error and "\n" not in by_key.error
    assert f"an embedding of a {family} model" in by_key.error and "is a qwen2-vl model" in by_key.error
    assert by_path.error and f"family {family} (here qwen2-vl)" in by_path.error


def test_expect_names_family_and_deepstack():
    key = "ab" * 32
    embeds, grid = torch.zeros(4, 512, dtype=torch.bfloat16), torch.tensor([[1, 4, 4]])
    meta = {"dtype": "bfloat16", "hidden_size": "512"}  # no family: made before families were recorded
    check_tensors(key, embeds, grid, meta, Expect(512, torch.bfloat16, 2, "qwen2-vl", 0))
    with pytest.raises(StoreError, match=f"^{key}: an embedding of a qwen2-vl model, the model is qwen3-vl"):
        check_tensors(key, embeds, grid, meta, Expect(512, torch.bfloat16, 2, "qwen3-vl", 3))
    with pytest.raises(StoreError, match=f"^{key}: 2 deepstack levels, the model needs 3"):
        check_tensors(key, embeds, grid, {**meta, "family": "qwen3-vl", "deepstack": "2"},
                      Expect(512, torch.bfloat16, 2, "qwen3-vl", 3))
    assert UNNAMED_FAMILY == LEGACY.name == "qwen2-vl"


def test_qwen2_vl_keys_are_unchanged_and_families_never_share_a_key(tiny_model, tmp_path):
    cfg = config(tiny_model, tmp_path / "S")
    prov = Provenance.of(cfg)
    digest = image_digest(b"an image")
    before = key_from_digest(digest, model_fingerprint=model_fingerprint(tiny_model),
                             preprocess=json.loads(prov.preprocess_json), profile=cfg.profile, dtype=cfg.dtype)
    assert prov.family == "qwen2-vl" and prov.key_of_digest(digest) == before  # no key version bump
    keys = {dataclasses.replace(prov, family=f.name).key_of_digest(digest) for f in FAMILIES}
    assert len(keys) == len(FAMILIES)
    recorded = dataclasses.replace(prov, family="qwen3-vl").meta(digest)["provenance"]
    assert prov.differences(recorded) == ["family qwen3-vl (here qwen2-vl)"]


def test_real_architectures_have_the_real_shapes():
    q25 = build_config("qwen2.5-vl-3b")
    text, vision = q25.text_config, q25.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (36, 2048, 11008)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (16, 2, 151936)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (32, 1280, 3420, 16)
    assert (vision.out_hidden_size, vision.window_size, list(vision.fullatt_block_indexes)) == (2048, 112, [7, 15, 23, 31])
    assert (vision.patch_size, vision.spatial_merge_size, q25.tie_word_embeddings) == (14, 2, True)
    q3 = build_config("qwen3-vl-2b")
    text, vision = q3.text_config, q3.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.head_dim) == (28, 2048, 6144, 128)
    assert (text.num_attention_heads, text.num_key_value_heads, text.max_position_embeddings) == (16, 8, 262144)
    assert text.rope_parameters == {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                    "mrope_interleaved": True}
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (24, 1024, 4096, 16)
    assert (vision.out_hidden_size, vision.patch_size, vision.num_position_embeddings) == (2048, 16, 2304)
    assert list(vision.deepstack_visual_indexes) == [5, 11, 17] and q3.tie_word_embeddings is True
    for config_, name, width, deepstack, patch in ((q25, "qwen2.5-vl", 2048, 0, 14), (q3, "qwen3-vl", 8192, 3, 16)):
        family = family_of_config(config_.to_dict())
        layout = family.layout(config_.to_dict())
        assert (family.name, layout.width, layout.deepstack, layout.patch_size) == (name, width, deepstack, patch)


def test_unsupported_architecture_is_one_line(tiny_model, tmp_path):
    assert family_of_model(tiny_model).name == "qwen2-vl"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(SplitVLMError) as err:
        family_of_model(tmp_path)
    assert str(tmp_path) in str(err.value) and "LlavaForConditionalGeneration is not supported" in str(err.value)
    assert "\n" not in str(err.value)


def test_gpu_check_takes_an_arch():
    from benchmarks import gpu_check

    assert gpu_check.parse_args([]).out == "benchmarks/results/gpu_check.json"
    args = gpu_check.parse_args(["--arch", "qwen3-vl-2b"])
    assert args.arch == "qwen3-vl-2b" and args.out == "benchmarks/results/gpu_check_qwen3-vl-2b.json"


def test_encode_engine_choice_per_family(tmp_path, monkeypatch):
    """Qwen2.5-VL encodes with the full engine under the exact profile on a GPU (its eager tower-only
    engine gave other bits on the H200); every other case keeps the tower-only engine unless told."""
    import json

    from splitvlm.core import engine as engine_module
    from splitvlm.core.config import Config

    models = {}
    for name, arch in (("q2", "Qwen2VLForConditionalGeneration"), ("q25", "Qwen2_5_VLForConditionalGeneration"),
                       ("q3", "Qwen3VLForConditionalGeneration")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": [arch]}))
        models[name] = str(tmp_path / name)
    choice = engine_module.encoder_only_for
    assert all(choice(Config(model=m)) for m in models.values())  # on the CPU: the tower alone
    monkeypatch.setattr(engine_module, "on_gpu", lambda: True)
    assert not choice(Config(model=models["q25"]))
    assert choice(Config(model=models["q25"], profile="fast")) and choice(Config(model=models["q2"]))
    assert choice(Config(model=models["q3"]))
    assert choice(Config(model=models["q25"], encoder_only=True))  # --mm-encoder-only, as asked
    assert not choice(Config(model=models["q2"], encoder_only=False))  # --full-engine
