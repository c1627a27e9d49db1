"""vLLM conventions in jobs: OpenAI batch lines in and out, per-job sampling fields, greedy-only refusals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import config, write_jobs

from splitvlm.cli.main import cli
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.decoder.jobs import JobError, parse_job
from splitvlm.encoder import Encoder
from splitvlm.tools.samples import save_corpus
from splitvlm.verify import Verifier


def openai_line(custom_id: str, image: str, text: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image if ":" in image else f"file://{image}"}},
                {"type": "text", "text": text}]}], **body}}


@pytest.fixture(scope="module")
def corpus(tiny_model, engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    images = save_corpus(root / "imgs", 3, seed=5, sizes=[(64, 64), (96, 80)])
    cfg = config(tiny_model, root / "store", max_tokens=8)
    Encoder(cfg, engine=engine).encode(images)
    return cfg, images, root


@pytest.fixture()
def run(engine, monkeypatch):
    monkeypatch.setattr("splitvlm.core.engine.Engine", lambda *a, **k: engine)
    return lambda *args: CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_an_openai_batch_line_is_a_job():
    job = parse_job(openai_line("req-1", "/x/a.png", "What is it?", max_tokens=5, stop=".", temperature=0), "f:1")
    assert (job.id, job.images, job.max_tokens, job.stop, job.openai) == ("req-1", ["/x/a.png"], 5, ["."], True)
    assert job.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert job.sampling(8, []) == (5, ["."])
    assert parse_job({"id": 1, "prompt": "p"}, "f:2").sampling(8, ["x"]) == (8, ["x"])


@pytest.mark.parametrize("line, reason", [
    (openai_line("a", "/x.png", "t", temperature=0.7), "greedily"),
    (openai_line("a", "/x.png", "t", top_p=0.9), "greedily"),
    (openai_line("a", "/x.png", "t", n=2), "greedily"),
    (openai_line("a", "/x.png", "t", logprobs=True), "not supported"),
    (openai_line("a", "/x.png", "t", max_tokens=0), "positive integer"),
    ({**openai_line("a", "/x.png", "t"), "url": "/v1/embeddings"}, "/v1/chat/completions"),
    (openai_line("a", "data:image/png;base64,AAAA", "t"), "store key"),
    ({"id": "b", "prompt": "p", "stop": [1]}, "stop"),
])
def test_what_greedy_decoding_cannot_honour_is_refused_per_job(line, reason):
    with pytest.raises(JobError, match=reason) as err:
        parse_job(line, "jobs.jsonl:3")
    assert str(err.value).startswith("jobs.jsonl:3: ") and "\n" not in str(err.value)


def test_per_job_max_tokens_and_stop_are_honoured_and_verified(corpus, engine, tmp_path):
    cfg, images, _ = corpus
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "short", "images": [images[0]], "prompt": "Describe it.", "max_tokens": 3},
        {"id": "run", "images": [images[0]], "prompt": "Describe it."},
    ]))
    short, full = Decoder(cfg, engine=engine).generate(jobs)
    assert len(short.token_ids) == 3 and len(full.token_ids) == 8
    assert short.token_ids == full.token_ids[:3]  # greedy: the same start, cut at the job's own length
    alone = Decoder(cfg.replace(max_tokens=3), engine=engine).generate(jobs[1:])[0]
    assert alone.token_ids == short.token_ids
    report = Verifier(cfg, engine=engine).run(jobs)
    assert report.identical == report.total == 2


def test_the_result_cache_keeps_jobs_with_their_own_length_apart(corpus, engine, tmp_path):
    cfg, images, _ = corpus
    cached = cfg.replace(cache=True)
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "a", "images": [images[1]], "prompt": "Name the colours.", "max_tokens": 2},
        {"id": "b", "images": [images[1]], "prompt": "Name the colours."},
    ]))
    first = Decoder(cached, engine=engine).generate(jobs)
    again = Decoder(cached, engine=engine).generate(jobs)
    assert [r.cached for r in first] == [False, False] and [r.cached for r in again] == [True, True]
    assert [len(r.token_ids) for r in again] == [2, 8]


def test_openai_batch_in_and_out_with_resume(corpus, run, tmp_path):
    cfg, images, _ = corpus
    lines = [openai_line(f"req-{n}", images[n % 3], f"Question {n}?", max_tokens=4) for n in range(5)]
    lines.append(openai_line("bad", images[0], "t", temperature=1.5))
    jobs = write_jobs(tmp_path / "batch.jsonl", lines)
    base = ["decode", "--model", cfg.model, "--store", cfg.store, "--jobs", jobs, "--max-model-len", "2048",
            "--batch-jobs", "2"]
    plain = run(*base, "--out", tmp_path / "plain.jsonl")
    assert plain.exit_code == 3  # the refused line fails on its own
    out = tmp_path / "openai.jsonl"
    assert run(*base, "--out", out, "--output-format", "openai").exit_code == 3
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    want = {r["id"]: r for r in map(json.loads, (tmp_path / "plain.jsonl").read_text(encoding="utf-8").splitlines())}
    assert [g["custom_id"] for g in got] == [f"req-{n}" for n in range(5)] + ["bad"]
    for g in got[:5]:
        body = g["response"]["body"]
        assert g["error"] is None and g["response"]["status_code"] == 200
        assert body["choices"][0]["message"]["content"] == want[g["custom_id"]]["text"]
        assert body["splitvlm"]["token_ids"] == want[g["custom_id"]]["token_ids"]
        assert body["usage"]["completion_tokens"] == 4
    assert got[5]["response"] is None and "greedily" in got[5]["error"]["message"]
    # a torn run resumes on the OpenAI lines: keep two, cut the third in half
    text = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:20], encoding="utf-8")
    assert run(*base, "--out", out, "--output-format", "openai", "--resume").exit_code == 3
    again = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert again == got


def test_vllm_arguments_pass_through_by_vllms_names(corpus, run, tmp_path):
    from splitvlm.core.errors import SplitVLMError
    from splitvlm.core.vllm_args import parse_vllm_args

    assert parse_vllm_args(["max-num-batched-tokens=4096", "disable_log_stats=true"], "exact", gpu=False) == {
        "max_num_batched_tokens": 4096, "disable_log_stats": True}
    for item, reason in [("enable_prefix_caching=true", "pins"), ("no_such_thing=1", "not an engine argument"),
                         ("dtype=float16", "--dtype"), ("model=x", "itself"), ("max_num_seqs", "NAME=VALUE")]:
        with pytest.raises(SplitVLMError, match=reason):
            parse_vllm_args([item], "exact", gpu=False)
    assert parse_vllm_args(["enable_prefix_caching=true"], "fast", gpu=False) == {"enable_prefix_caching": True}
    cfg, images, _ = corpus
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "images": [images[0]], "prompt": "Hi."}])
    bad = run("decode", "--model", cfg.model, "--store", cfg.store, "--jobs", jobs, "--out", tmp_path / "o.jsonl",
              "--vllm-arg", "enable_prefix_caching=true")
    assert bad.exit_code == 2 and "exact profile pins" in bad.output and not (tmp_path / "o.jsonl").exists()
