"""Result cache: a repeated decode is answered from the store byte for byte; any key field change misses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import config, flip_one_ulp, write_jobs

from splitvlm.cli.store_cmd import command as store_cli
from splitvlm.core import identity
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.provenance import KeyMaker
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.decoder.cache import (
    ResultCache,
    count_results,
    prompt_token_ids,
    standalone_tokenizer,
)
from splitvlm.decoder.jobs import build_prompt
from splitvlm.encoder import Encoder
from splitvlm.store import EmbeddingStore
from splitvlm.tools.samples import save_corpus

FIELDS = ("text", "token_ids", "finish_reason", "sha256", "prompt_tokens", "keys")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_corpus(tmp_path_factory.mktemp("cache") / "imgs", 3, seed=9, sizes=[(64, 64), (96, 80)])


@pytest.fixture()
def cfg(tiny_model, engine, images, tmp_path):
    cfg = config(tiny_model, tmp_path / "store", max_tokens=8, cache=True)
    Encoder(cfg, engine=engine).encode(images)
    return cfg


@pytest.fixture()
def jobs_file(images, tmp_path):
    return write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "a", "images": [images[0]], "prompt": "Describe."},
        {"id": "b", "images": [images[1], images[2]], "prompt": "Compare them."},
        {"id": "c", "images": [images[0]], "prompt": "请描述。"},
        {"id": "text", "prompt": "Just text."},
    ])


def test_prompt_token_ids_are_vllms(engine, images, tmp_path):
    """encode(text) is what vLLM makes of the prompt text; with images, before the placeholders expand."""
    path = write_jobs(tmp_path / "j.jsonl", [{"id": "t", "prompt": "Just text."},
                                             {"id": "i", "images": [images[0]], "prompt": "Describe."}])
    text_job, image_job = read_jobs(path)
    tok = engine.tokenizer()
    text = build_prompt(tok, text_job)
    out = engine.generate([{"prompt": text}], engine.sampling_params(max_tokens=1))[0]
    assert prompt_token_ids(tok, text) == list(out.prompt_token_ids)

    from splitvlm.core.sources import load_image

    text = build_prompt(tok, image_job)
    out = engine.generate([{"prompt": text, "multi_modal_data": {"image": load_image(images[0])[1]}}],
                          engine.sampling_params(max_tokens=1))[0]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    collapsed = [t for n, t in enumerate(out.prompt_token_ids) if t != pad or out.prompt_token_ids[n - 1] != pad]
    assert len(out.prompt_token_ids) > len(collapsed) and prompt_token_ids(tok, text) == collapsed
    # the tokenizer a decode answered from the cache uses, without an engine, says the same
    standalone = standalone_tokenizer(engine.cfg)
    assert build_prompt(standalone, image_job) == text
    assert prompt_token_ids(standalone, text) == prompt_token_ids(tok, text)


def test_second_decode_is_answered_from_the_cache(cfg, engine, jobs_file):
    jobs = read_jobs(jobs_file)
    first_decoder = Decoder(cfg, engine=engine)
    first = first_decoder.generate(jobs)
    assert all(r.error is None and r.cached is False for r in first)
    assert first_decoder.stats.cached == 0 and "0 from the cache" in first_decoder.stats.summary()
    with EmbeddingStore(cfg.store, readonly=True) as store:
        assert count_results(store) == len(jobs)
    again = Decoder(cfg)  # no engine given: a full hit must never start one
    second = again.generate(jobs)
    assert again._engine is None
    assert all(r.cached is True for r in second) and again.stats.cached == len(jobs)
    for a, b in zip(first, second, strict=True):
        assert a.id == b.id and all(getattr(a, f) == getattr(b, f) for f in FIELDS)
        assert a.text.encode() == b.text.encode()
    assert json.loads(json.dumps(second[0].to_json()))["cached"] is True
    assert Decoder(cfg.replace(cache=False), engine=engine).generate(jobs[:1])[0].to_json()["cached"] is None


def test_any_key_field_change_misses(cfg, engine, jobs_file, monkeypatch):
    jobs = read_jobs(jobs_file)
    Decoder(cfg, engine=engine).generate(jobs[:1])
    tok = engine.tokenizer()
    with EmbeddingStore(cfg.store) as store:
        entries = store.get_many([KeyMaker(cfg)(open(jobs[0].images[0], "rb").read())])
        ids = prompt_token_ids(tok, build_prompt(tok, jobs[0]))

        def hit(c=cfg, e=entries, i=ids) -> bool:
            cache = ResultCache(store, c)
            return cache.get_many([cache.key(e, i)]) != [None]

        assert hit()
        assert not hit(i=prompt_token_ids(tok, build_prompt(tok, jobs[2])))  # another prompt, same image
        assert not hit(e=store.get_many([KeyMaker(cfg)(open(jobs[1].images[0], "rb").read())]))  # another image
        assert not hit(c=cfg.replace(max_tokens=9))
        assert not hit(c=cfg.replace(stop=["."]))
        assert not hit(c=cfg.replace(seed=1))
        assert not hit(c=cfg.replace(dtype="float16"))
        for name in ("vllm", "torch", "transformers", "device", "splitvlm"):
            with monkeypatch.context() as m:
                m.setitem(identity.environment(), name, "changed")
                assert not hit(), name
        with monkeypatch.context() as m:
            m.setenv("SPLITVLM_PROFILE", "exact;vision=per_image")  # a profile setting
            assert not hit()
        assert hit()
    # an altered entry (valid checksum, one ulp off) misses: the key holds each entry's tensor checksum
    flip_one_ulp(cfg.store, entries[0].key)
    (again,) = Decoder(cfg, engine=engine).generate(jobs[:1])
    assert again.cached is False


def test_fast_profile_is_refused(cfg):
    with pytest.raises(SplitVLMError) as err:
        Decoder(cfg.replace(profile="fast"))
    assert "exact" in str(err.value) and "\n" not in str(err.value)


def test_damaged_value_is_a_miss(cfg, engine, jobs_file):
    jobs = read_jobs(jobs_file)[:1]
    Decoder(cfg, engine=engine).generate(jobs)
    with EmbeddingStore(cfg.store) as store:
        db = store.results_db()
        with store.read() as txn:
            ((key, value),) = [(bytes(k), json.loads(bytes(v))) for k, v in txn.cursor(db)]
        value["text"] += "!"  # no longer matches its sha256
        store.write(lambda txn: txn.put(key, json.dumps(value).encode(), db=db))
    (result,) = Decoder(cfg, engine=engine).generate(jobs)
    assert result.cached is False and not result.text.endswith("!")


def test_store_stats_and_rm_results(cfg, engine, jobs_file):
    Decoder(cfg, engine=engine).generate(read_jobs(jobs_file))
    out = CliRunner().invoke(store_cli, ["stats", "--store", cfg.store])
    assert out.exit_code == 0 and "4 cached results" in out.output
    assert json.loads(CliRunner().invoke(store_cli, ["stats", "--store", cfg.store, "--json"]).output)["results"] == 4
    out = CliRunner().invoke(store_cli, ["rm", "--store", cfg.store, "--results"])
    assert out.exit_code == 0 and "removed 4 cached results" in out.output
    with EmbeddingStore(cfg.store, readonly=True) as store:
        assert count_results(store) == 0 and len(store) == 3  # the embeddings stay
    assert CliRunner().invoke(store_cli, ["rm", "--store", cfg.store]).exit_code == 2


def splitvlm(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "splitvlm.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "CI": "1"})


def test_cli_second_run_is_all_cached(cfg, jobs_file, cli_run, tmp_path):
    """The first run in this process on the shared engine; the second, all from the cache, in its own
    process, which must not start vLLM's engine at all."""
    common = ["decode", "--model", cfg.model, "--store", cfg.store, "--jobs", jobs_file, "--max-tokens", "8",
              "--max-model-len", "2048", "--no-progress", "--cache"]
    first = cli_run(*common, "--out", tmp_path / "1.jsonl")
    assert first.exit_code == 0, first.stderr[-2000:]
    second = splitvlm(*common, "--out", str(tmp_path / "2.jsonl"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "decoded 4/4 jobs, 4 from the cache" in second.stdout
    lines = [[json.loads(line) for line in open(tmp_path / f"{n}.jsonl")] for n in (1, 2)]
    assert [r["cached"] for r in lines[0]] == [False] * 4 and [r["cached"] for r in lines[1]] == [True] * 4
    assert [{k: r[k] for k in FIELDS} for r in lines[0]] == [{k: r[k] for k in FIELDS} for r in lines[1]]
    refused = splitvlm(*common, "--out", str(tmp_path / "3.jsonl"), "--profile", "fast")
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0 and "--cache" in refused.stderr
