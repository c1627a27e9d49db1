"""Hostile inputs and faults: each is refused on one line naming the input, and nothing else is lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import config, write_jobs

from splitvlm.core.provenance import KeyMaker
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.encoder import Encoder
from splitvlm.store import EmbeddingStore, Entry, StoreError
from splitvlm.store.results import check_results
from splitvlm.tools.samples import save_corpus


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_corpus(tmp_path_factory.mktemp("hostile") / "imgs", 3, seed=11, sizes=[(64, 64), (96, 80)])


@pytest.fixture()
def store(tiny_model, engine, images, tmp_path):
    cfg = config(tiny_model, tmp_path / "store", max_tokens=8)
    Encoder(cfg, engine=engine).encode(images)
    return cfg


def key_of(cfg, path: str) -> str:
    return KeyMaker(cfg)(open(path, "rb").read())


def rewrite_meta(cfg, key: str, **meta: str) -> None:
    """Re-store an entry with some metadata changed, with valid checksums (as another encoder would write it)."""
    with EmbeddingStore(cfg.store) as s:
        entry = s.get(key)
        s.put_many([Entry(key, entry.image_embeds, entry.image_grid_thw, {**entry.meta, **meta})], overwrite=True)


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitvlm.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_entry_of_another_model_is_refused_by_key(store, engine, images, tmp_path):
    """Failure 1: an entry encoded by other vision weights, given by key, fails its job only."""
    other, good = key_of(store, images[0]), key_of(store, images[1])
    rewrite_meta(store, other, model_fingerprint="f" * 64)
    jobs = read_jobs(write_jobs(tmp_path / "j.jsonl", [{"id": "other", "images": [other], "prompt": "Hi"},
                                                       {"id": "good", "images": [good], "prompt": "Hi"}]))
    results = Decoder(store, engine=engine).generate(jobs)
    assert results[0].error and "another model" in results[0].error and other in results[0].error
    assert results[1].error is None and results[1].token_ids


def test_tampered_cached_result_is_not_served_and_store_check_names_it(store, engine, images, tmp_path):
    """Failure 2: a cached result with one token id, finish_reason and prompt_tokens changed."""
    cfg = store.replace(cache=True)
    jobs = read_jobs(write_jobs(tmp_path / "j.jsonl", [{"id": "a", "images": [images[0]], "prompt": "Hi"}]))
    first = Decoder(cfg, engine=engine).generate(jobs)[0]
    with EmbeddingStore(cfg.store) as s:
        db = s.results_db()
        with s.read() as txn:
            (key, raw), = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
        value = json.loads(raw)
        value["token_ids"][0] += 1
        value["finish_reason"], value["prompt_tokens"] = "stop", value["prompt_tokens"] + 1
        s.write(lambda txn: txn.put(key, json.dumps(value).encode(), db=db))
        assert check_results(s) == (1, [key.decode()])
    checked = cli("store", "check", "--store", cfg.store, timeout=120)
    assert checked.returncode == 1 and f"cached result {key.decode()}" in checked.stdout, checked.stdout
    again = Decoder(cfg, engine=engine).generate(jobs)[0]
    assert again.cached is False and again.token_ids == first.token_ids
    assert again.finish_reason == first.finish_reason and again.prompt_tokens == first.prompt_tokens


def test_one_bad_job_never_sinks_the_decode(store, tiny_model, images, cli_run, tmp_path):
    """Failure 4 (and 7 through the CLI): bad jobs are their own error lines; the others are written."""
    old = key_of(store, images[2])
    rewrite_meta(store, old, vllm_version="0.0.1")
    lines = [
        {"id": "good", "images": [images[0]], "prompt": "Hi"},
        {"id": "empty", "messages": []},
        {"id": "long", "images": [images[1]], "prompt": "word " * 3000},
        {"id": "oldvllm", "images": [old], "prompt": "Hi"},
        {"id": "string-images", "images": images[0], "prompt": "Hi"},
        {"id": None, "prompt": "Hi"},
        {"id": "good2", "images": [images[1]], "prompt": "Hello"},
    ]
    jobs = write_jobs(tmp_path / "j.jsonl", lines)
    with open(jobs, "ab") as f:
        f.write(b'{"id": "latin1", "prompt": "caf\xe9"}\n')
    out = tmp_path / "out.jsonl"
    proc = cli_run("decode", "--model", tiny_model, "--store", store.store, "--jobs", jobs, "--out", out,
                   "--max-tokens", "4", "--max-model-len", "2048", "--no-progress")
    assert proc.exit_code == 3, proc.stderr  # some jobs failed, the rest done
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(results) == 8 and "latin1" not in results
    assert results["good"]["error"] is None and results["good2"]["error"] is None and results["good2"]["token_ids"]
    assert "non-empty list" in results["empty"]["error"]
    assert "longer than the context" in results["long"]["error"]
    assert "vLLM 0.0.1" in results["oldvllm"]["error"]
    assert "list of paths" in results["string-images"]["error"]
    assert '"id" must be' in results["line 6"]["error"] and ":6:" in results["line 6"]["error"]
    assert "not UTF-8" in results["line 8"]["error"] and ":8:" in results["line 8"]["error"]


def test_nan_embeddings_are_never_stored_or_decoded(store, monkeypatch):
    """Failure 9: NaN or Inf in an entry, even one with valid checksums."""
    import splitvlm.store.entry as entry_module

    with EmbeddingStore(store.store) as s:
        key = next(iter(s.keys()))
        entry = s.get(key)
        bad = entry.image_embeds.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(StoreError, match="NaN or Inf"):
            s.put_many([Entry(key, bad, entry.image_grid_thw, dict(entry.meta))], overwrite=True)
        monkeypatch.setattr(entry_module, "check_finite", lambda key, embeds: None)  # a forger's writer
        s.put_many([Entry(key, bad, entry.image_grid_thw, dict(entry.meta))], overwrite=True)
        monkeypatch.undo()
        with pytest.raises(StoreError, match=f"{key}: image_embeds holds 1 NaN"):
            s.get(key)
    assert torch.isnan(bad).any()


@pytest.mark.parametrize("args, message", [
    (["decode", "--jobs", "J", "--out", "/nonexistent/dir/o.jsonl"], "does not exist"),
    (["decode", "--jobs", "J", "--out", "O", "--max-tokens", "0"], "--max-tokens"),
    (["decode", "--jobs", "J", "--out", "O", "--batch-jobs", "0"], "--batch-jobs"),
    (["decode", "--jobs", "J", "--out", "O", "--limit-images", "-1"], "--limit-images"),
    (["decode", "--jobs", "J", "--out", "O", "--limit-mm-per-prompt", '{"audio": 2}'], '{"image": N}'),
    (["decode", "--jobs", "J", "--out", "O", "--limit-mm-per-prompt", "{not json"], "not JSON"),
    (["decode", "--jobs", "J", "--out", "O", "--min-pixels", "100000", "--max-pixels", "1000"], "larger than"),
    (["decode", "--jobs", "J", "--out", "O", "--dtype", "bf16"], "--dtype"),
    (["encode", "--loader-threads", "0", "IMG"], "--loader-threads"),
    (["encode", "IMGDIR/*.nothing"], "names no image files"),
])
def test_bad_options_are_refused_before_any_work(tiny_model, images, tmp_path, args, message):
    """Failures 5 and 6: refused up front (no engine, no store made), one line naming the option."""
    jobs = write_jobs(tmp_path / "j.jsonl", [{"id": "a", "images": [images[0]], "prompt": "Hi"}])
    subs = {"J": jobs, "O": str(tmp_path / "o.jsonl"), "IMG": images[0],
            "IMGDIR/*.nothing": str(tmp_path / "*.nothing")}
    argv = [subs.get(a, a) for a in args]
    proc = cli(argv[0], "--model", tiny_model, "--store", str(tmp_path / "S"), *argv[1:], timeout=120)
    assert proc.returncode in (1, 2) and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "S").exists() and not (tmp_path / "o.jsonl").exists()


def test_job_schema_is_strict(tmp_path):
    """Failure 7: wrong types are refused, never turned into strings; errors name file:line."""
    key = "A" * 64
    lines = [
        {"id": "s", "images": "a.png", "prompt": "x"},
        {"id": "d", "images": {"a": 1}, "prompt": "x"},
        {"id": "n", "prompt": 12345},
        {"id": "z", "prompt": None},
        {"id": None, "prompt": "x"},
        {"id": "part", "messages": [{"role": "user", "content": ["just a string"]}]},
        {"id": "upper", "images": [key], "prompt": "x"},
        {"id": 7, "prompt": "an integer id is fine"},
    ]
    jobs = read_jobs(write_jobs(tmp_path / "j.jsonl", lines))
    assert [j.id for j in jobs] == ["s", "d", "n", "z", "line 5", "part", "upper", "7"]
    errors = [j.error for j in jobs]
    assert all(e and f"j.jsonl:{n}:" in e and "\n" not in e for n, e in enumerate(errors[:7], 1))
    assert "lowercase" in errors[6] and errors[7] is None
