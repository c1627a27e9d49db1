"""Streaming decode: lines appended per batch, --resume after kill -9, --out -, every field on every line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner
from helpers import config, write_jobs

from splitvlm.cli.decode_cmd import finished_lines
from splitvlm.cli.main import cli
from splitvlm.decoder import Decoder, Result, read_jobs
from splitvlm.decoder.spot_check import chosen
from splitvlm.encoder import Encoder
from splitvlm.tools.samples import save_corpus

FIELDS = ["id", "text", "token_ids", "finish_reason", "sha256", "prompt_tokens", "keys", "error", "cached",
          "spot_checked", "spot_check_identical", "spot_check_error"]
NJOBS = 40


@pytest.fixture(scope="module")
def corpus(tiny_model, engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    images = save_corpus(root / "imgs", 3, seed=7, sizes=[(64, 64), (96, 80)])
    cfg = config(tiny_model, root / "store", max_tokens=8)
    Encoder(cfg, engine=engine).encode(images)
    jobs = write_jobs(root / "jobs.jsonl", [{"id": f"job{n:02d}", "images": [images[n % 3]],
                                             "prompt": f"Describe picture {n}."} for n in range(NJOBS)])
    return cfg, jobs


@pytest.fixture()
def run(engine, monkeypatch):
    """The CLI in this process; every vLLM engine it asks for is the session's one."""
    monkeypatch.setattr("splitvlm.core.engine.Engine", lambda *a, **k: engine)
    return lambda *args: CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def decode_args(cfg, jobs, out, *more) -> list[str]:
    return ["decode", "--model", cfg.model, "--store", cfg.store, "--jobs", jobs, "--out", str(out),
            "--max-tokens", "8", "--max-model-len", "2048", "--batch-jobs", "4", *more]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_generate_iter_yields_each_batch_in_order(corpus, engine):
    cfg, jobs_file = corpus
    jobs = read_jobs(jobs_file)
    decoder = Decoder(cfg.replace(batch_jobs=16), engine=engine)
    chunks = list(decoder.generate_iter(jobs))
    assert [len(c) for c in chunks] == [16, 16, 8]
    assert [r.id for c in chunks for r in c] == [j.id for j in jobs]
    assert decoder.stats.jobs == NJOBS and decoder.stats.failed == 0
    whole = Decoder(cfg, engine=engine).generate(jobs)
    assert [r.to_json() for c in chunks for r in c] == [r.to_json() for r in whole]


def test_kill_9_then_resume_loses_and_repeats_nothing(corpus, run, tmp_path):
    cfg, jobs = corpus
    base = tmp_path / "base.jsonl"
    assert run(*decode_args(cfg, jobs, base)).exit_code == 0
    expected = base.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(expected) == NJOBS

    out, err = tmp_path / "out.jsonl", tmp_path / "killed.err"
    cmd = [sys.executable, "-m", "splitvlm", *decode_args(cfg, jobs, out)]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "CI": "1"})
        deadline = time.monotonic() + 300
        while not (out.exists() and b"\n" in out.read_bytes()):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    data = out.read_bytes()
    kept = data.count(b"\n")
    assert 1 <= kept < NJOBS  # killed mid-run, after at least one batch
    assert data.decode().splitlines(keepends=True)[:kept] == expected[:kept]  # the batches done are on disk
    if data.endswith(b"\n"):  # the line a kill tears while it is written
        with open(out, "a", encoding="utf-8") as f:
            f.write(expected[kept][:40])
    assert "decode:" not in err.read_text() and "%|" not in err.read_text()  # stderr is no terminal: no bar

    resumed = run(*decode_args(cfg, jobs, out, "--resume"))  # in this process: resuming needs no process start
    assert resumed.exit_code == 0, resumed.stderr[-2000:]
    assert f"resuming: {kept} jobs already in {out} (0 failed), {NJOBS - kept} to decode" in resumed.stderr
    assert f"decoded {NJOBS - kept}/{NJOBS - kept} jobs" in resumed.stdout
    assert out.read_text(encoding="utf-8").splitlines(keepends=True) == expected  # none lost, none twice
    assert "decode:" not in resumed.stderr and "%|" not in resumed.stderr and "job/s" not in resumed.stderr


def test_resume_reads_complete_lines_and_cuts_a_torn_one(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "text": "", "error": null}\n{"id": "b", "text": null, "error": "bad"}\n{"id": "c", "te',
                   encoding="utf-8")
    assert finished_lines(str(out)) == ({"a", "b"}, 1)
    assert out.read_text(encoding="utf-8").endswith('"bad"}\n')
    assert finished_lines(str(tmp_path / "none.jsonl")) == (set(), 0)
    jobs = tmp_path / "jobs.jsonl"  # --out naming the jobs file by mistake: refused, the file kept as it was
    jobs.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "pro', encoding="utf-8")
    with pytest.raises(click.ClickException, match="jobs.jsonl:1: not a decode result line"):
        finished_lines(str(jobs))
    assert jobs.read_text(encoding="utf-8").endswith('"pro')


def test_out_dash_streams_to_stdout(corpus, run, tmp_path):
    cfg, jobs = corpus
    result = run(*decode_args(cfg, jobs, "-"))
    assert result.exit_code == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in got] == [f"job{n:02d}" for n in range(NJOBS)]
    assert f"decoded {NJOBS}/{NJOBS} jobs" in result.stderr and "wrote" not in result.output
    assert "decode:" not in result.stderr  # CliRunner's stderr is no terminal: no progress bar
    refused = run(*decode_args(cfg, jobs, "-", "--resume"))
    assert refused.exit_code == 2 and "--resume needs a file" in refused.stderr


def test_every_field_on_every_line(corpus, run, tmp_path):
    cfg, jobs = corpus
    src = [json.loads(line) for line in open(jobs, encoding="utf-8")][:6] + [{"id": "bad", "prompt": 12}]
    mixed = write_jobs(tmp_path / "mixed.jsonl", src)
    plain, checked = tmp_path / "plain.jsonl", tmp_path / "checked.jsonl"
    assert run(*decode_args(cfg, mixed, plain)).exit_code == 3
    stats = tmp_path / "stats.json"
    result = run(*decode_args(cfg, mixed, checked, "--cache", "--spot-check", "0.5", "--seed", "1",
                              "--stats-json", stats))
    assert result.exit_code == 3 and "end-to-end:" not in result.stderr  # no terminal: no bars
    for line in lines(plain) + lines(checked):
        assert list(line) == FIELDS
    good, bad = lines(plain)[0], lines(plain)[-1]
    assert good["error"] is None and good["token_ids"] and good["cached"] is None and good["spot_checked"] is None
    assert bad["error"] and all(bad[k] is None for k in ("text", "token_ids", "finish_reason", "sha256",
                                                          "prompt_tokens", "cached", "spot_checked"))
    picked = [s["id"] for s in src[:6] if chosen(s["id"], 0.5, 1)]
    assert 0 < len(picked) < 6  # seed 1 picks some of the six
    for line in lines(checked)[:6]:
        assert line["cached"] is False and line["spot_checked"] is (line["id"] in picked)
        assert line["spot_check_identical"] is (True if line["id"] in picked else None)
    spot = json.loads(stats.read_text())["spot_check"]
    assert spot["checked"] == picked and spot["identical"] == len(picked)  # one report over the batches
    assert list(Result("x").to_json()) == FIELDS
