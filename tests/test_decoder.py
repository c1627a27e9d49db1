"""Decoder: jobs in order, several images, the messages form, missing images, corrupted entries."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import config, write_jobs

from splitvlm.cli.main import cli
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.provenance import KeyMaker
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.encoder import Encoder
from splitvlm.tools.samples import save_corpus


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_corpus(tmp_path_factory.mktemp("dec") / "imgs", 6, seed=5, sizes=[(64, 64), (100, 80)])


@pytest.fixture()
def store(tiny_model, engine, images, tmp_path):
    cfg = config(tiny_model, tmp_path / "store", max_tokens=12)
    Encoder(cfg, engine=engine).encode(images[:4])
    return cfg


def test_jobs_forms_order_and_fields(store, engine, images, tmp_path):
    key = KeyMaker(store)(open(images[1], "rb").read())
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "one", "images": [images[0]], "prompt": "Describe."},
        {"id": "two", "images": [images[1], images[2]], "prompt": "Compare the two."},
        {"id": "chat", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "file://" + images[3]}},
            {"type": "text", "text": "请描述。"}]}]},
        {"id": "bykey", "images": [key], "prompt": "Describe."},
        {"id": "noimage", "prompt": "Just text."},
        {"id": "bypath", "images": [images[1]], "prompt": "Describe."},
    ]))
    decoder = Decoder(store, engine=engine)
    results = decoder.generate(jobs)
    assert [r.id for r in results] == ["one", "two", "chat", "bykey", "noimage", "bypath"]
    assert all(r.error is None and r.token_ids and r.finish_reason for r in results)
    assert len(results[1].keys) == 2 and results[3].keys == [key]
    # the same image by key and by path: the same output
    assert results[3].token_ids == results[5].token_ids and results[3].token_ids != results[0].token_ids
    import hashlib

    assert all(r.sha256 == hashlib.sha256(r.text.encode()).hexdigest() for r in results)
    assert decoder.stats.jobs == 6 and decoder.stats.failed == 0
    # batching does not reorder: one job per vLLM call gives the same lines
    again = Decoder(store.replace(batch_jobs=1), engine=engine).generate(jobs)
    assert [(r.id, r.token_ids) for r in again] == [(r.id, r.token_ids) for r in results]


def test_prompt_matches_vllm_chat(store, engine, images, tmp_path):
    """Our prompt text tokenizes to what vLLM's own chat path builds for the same messages."""
    from splitvlm.core.sources import load_image
    from splitvlm.decoder.jobs import build_prompt

    (job,) = read_jobs(write_jobs(tmp_path / "j.jsonl", [{"id": "a", "images": [images[0]], "prompt": "Describe it."}]))
    ours = engine.generate([{"prompt": build_prompt(engine.tokenizer(), job),
                             "multi_modal_data": {"image": load_image(images[0])[1]}}],
                           engine.sampling_params(max_tokens=4))[0]
    from PIL import Image

    img = load_image(images[0])[1]
    assert isinstance(img, Image.Image)
    chat = engine.llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": img},
                                                          {"type": "text", "text": "Describe it."}]}],
                           engine.sampling_params(max_tokens=4), use_tqdm=False)[0]
    assert list(ours.prompt_token_ids) == list(chat.prompt_token_ids)
    assert list(ours.outputs[0].token_ids) == list(chat.outputs[0].token_ids)


def test_missing_policies(store, engine, images, tmp_path):
    path = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "have", "images": [images[0]], "prompt": "Describe."},
        {"id": "miss1", "images": [images[4]], "prompt": "Describe."},
        {"id": "miss2", "images": [images[0], images[5]], "prompt": "Describe."},
    ])
    with pytest.raises(SplitVLMError) as err:
        Decoder(store, engine=engine).generate(read_jobs(path))
    message = str(err.value)
    assert "\n" not in message and "2 image(s)" in message
    assert images[4] in message and images[5] in message

    skipped = Decoder(store.replace(on_missing="skip"), engine=engine).generate(read_jobs(path))
    assert [r.error is None for r in skipped] == [True, False, False]
    assert "not in the store" in skipped[1].error

    with pytest.raises(SplitVLMError, match="needs encode_missing") as err:  # the decoder never imports the encoder
        Decoder(store.replace(on_missing="encode"), engine=engine)
    assert "\n" not in str(err.value)
    asked: list[list[str]] = []

    def encode_missing(paths: list[str]):
        asked.append(paths)
        return Encoder(store, engine=engine).encode(paths)

    encoded = Decoder(store.replace(on_missing="encode"), engine=engine,
                      encode_missing=encode_missing).generate(read_jobs(path))
    assert all(r.error is None for r in encoded)
    assert encoded[0].token_ids == skipped[0].token_ids
    assert asked == [[images[4], images[5]]]  # each missing image once, none that was stored


def test_cli_encodes_missing_images_in_the_decoders_engine(tiny_model, engine, images, tmp_path, monkeypatch):
    """decode --on-missing encode and verify (encode by default) hand the encoder the decoder's engine."""
    starts: list[tuple] = []
    monkeypatch.setattr("splitvlm.core.engine.Engine", lambda *a, **k: starts.append(a) or engine)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "images": [images[4]], "prompt": "Describe."}])
    common = ["--model", tiny_model, "--jobs", jobs, "--max-tokens", "6", "--max-model-len", "2048", "--no-progress"]
    out = tmp_path / "out.jsonl"
    decoded = CliRunner().invoke(cli, ["decode", "--store", str(tmp_path / "s1"), "--out", str(out),
                                       "--on-missing", "encode", *common], catch_exceptions=False)
    assert decoded.exit_code == 0, decoded.output
    assert json.loads(out.read_text())["error"] is None
    verified = CliRunner().invoke(cli, ["verify", "--store", str(tmp_path / "s2"), *common], catch_exceptions=False)
    assert verified.exit_code == 0, verified.output
    assert "embeddings identical 1/1" in verified.output and "identical 1/1" in verified.output
    assert len(starts) == 2  # one engine per command: the encoder ran in the decoder's


def test_corrupted_entry_is_one_line_error_and_no_crash(store, engine, images, tmp_path):
    import lmdb

    key = KeyMaker(store)(open(images[2], "rb").read())
    env = lmdb.open(store.store, max_dbs=8, subdir=True)
    flipped = False
    with env.begin(write=True) as txn:
        for name in (b"embeddings", None):
            db = env.open_db(name, txn=txn) if name else None
            blob = txn.get(key.encode(), db=db) if db is not None else txn.get(key.encode())
            if blob:
                data = bytearray(blob)
                data[-3] ^= 0x01
                txn.put(key.encode(), bytes(data), db=db) if db is not None else txn.put(key.encode(), bytes(data))
                flipped = True
                break
    env.close()
    assert flipped
    path = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "fine", "images": [images[0]], "prompt": "Describe."},
        {"id": "bad", "images": [images[2]], "prompt": "Describe."},
    ])
    results = Decoder(store, engine=engine).generate(read_jobs(path))
    assert results[0].error is None and results[0].token_ids
    assert results[1].error and key in results[1].error and "\n" not in results[1].error


def test_entries_from_another_vllm_or_device_are_refused(store, engine, images, tmp_path):
    from splitvlm.store import EmbeddingStore, Entry

    key = KeyMaker(store)(open(images[0], "rb").read())
    with EmbeddingStore(store.store) as s:
        entry = s.get(key)
        meta = {**entry.meta, "vllm_version": "0.26.0", "device": "NVIDIA H200"}
        s.put(Entry(key, entry.image_embeds.clone(), entry.image_grid_thw.clone(), meta), overwrite=True)
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "images": [images[0]], "prompt": "Hi."}]))
    (refused,) = Decoder(store, engine=engine).generate(jobs)  # that job's error, not the run's
    assert key in refused.error and "vLLM 0.26.0 on NVIDIA H200" in refused.error and "\n" not in refused.error
    assert not refused.token_ids
    assert Decoder(store.replace(allow_mismatch=True), engine=engine).generate(jobs)[0].error is None


def test_entries_whose_tower_ran_other_attention_kernels_are_refused(store, engine, images, tmp_path):
    """An exact entry records its tower's attention kernels; one made under others (the GPU's exact
    profile before it ran FlashAttention with one split, another machine) cannot give this engine's
    bytes, so its job fails naming the entry. Entries from before the field ran per-image SDPA."""
    from splitvlm.core.profiles import LEGACY_TOWER_KERNELS
    from splitvlm.store import EmbeddingStore, Entry

    key = KeyMaker(store)(open(images[0], "rb").read())
    with EmbeddingStore(store.store) as s:
        entry = s.get(key)
        assert entry.meta["tower_kernels"] == engine.environment()["tower_kernels"] == LEGACY_TOWER_KERNELS  # CPU
        s.put(Entry(key, entry.image_embeds.clone(), entry.image_grid_thw.clone(),
                    {**entry.meta, "tower_kernels": "flash-attn-varlen-splits1"}), overwrite=True)
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "images": [images[0]], "prompt": "Hi."}]))
    (refused,) = Decoder(store, engine=engine).generate(jobs)
    assert key in refused.error and "tower attention flash-attn-varlen-splits1" in refused.error
    assert "\n" not in refused.error and not refused.token_ids
    assert Decoder(store.replace(allow_mismatch=True), engine=engine).generate(jobs)[0].error is None
    with EmbeddingStore(store.store) as s:  # no field: made before it existed, with SDPA, as here
        s.put(Entry(key, entry.image_embeds.clone(), entry.image_grid_thw.clone(),
                    {k: v for k, v in entry.meta.items() if k != "tower_kernels"}), overwrite=True)
    assert Decoder(store, engine=engine).generate(jobs)[0].error is None


def test_too_many_images_is_that_jobs_error(store, engine, images, tmp_path):
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "many", "images": [images[0]] * 3, "prompt": "x"},
        {"id": "fine", "images": [images[0]], "prompt": "x"},
    ]))
    results = Decoder(store.replace(max_images_per_prompt=2), engine=engine).generate(jobs)
    assert "3 images, more than the limit of 2" in results[0].error and results[1].error is None
