"""Verifier: the seed report's 15 jobs are identical; a one-ulp change in the store is caught and named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import config, flip_one_ulp, write_jobs

from splitvlm.core.provenance import KeyMaker
from splitvlm.decoder import read_jobs
from splitvlm.encoder import Encoder
from splitvlm.tools.samples import blue_circle, rainbow_flag, red_square
from splitvlm.verify import verify

PROMPTS = [
    "Describe this image.",
    "What colours do you see?",
    "请详细描述这张图片的内容，包括颜色、形状和文字。",
    "图片里有什么文字？",
    "Is there a flag, a square or a circle?",
]


@pytest.fixture(scope="module")
def seed_jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    paths = []
    for name, img in [("red_square.png", red_square()), ("rainbow.png", rainbow_flag()), ("circle.png", blue_circle())]:
        img.save(root / name)
        paths.append(str(root / name))
    jobs = [{"id": f"{n}-{p}", "images": [path], "prompt": prompt}
            for n, path in enumerate(paths) for p, prompt in enumerate(PROMPTS)]
    return paths, write_jobs(root / "jobs.jsonl", jobs)


def splitvlm(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "splitvlm.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "CI": "1"})


def test_seed_table_is_identical_through_the_cli(tiny_model, seed_jobs, tmp_path):
    paths, jobs = seed_jobs
    store, report = tmp_path / "store", tmp_path / "report.json"
    # encode starts vLLM in encoder-only mode; verify re-encodes with a full engine: the embeddings must agree
    enc = splitvlm("encode", "--model", tiny_model, "--store", str(store), "--max-model-len", "2048", "--no-progress", *paths)
    assert enc.returncode == 0, enc.stderr[-2000:]
    out = splitvlm("verify", "--model", tiny_model, "--store", str(store), "--jobs", jobs, "--report", str(report),
                   "--max-tokens", "24", "--max-model-len", "2048", "--no-progress")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "identical 15/15" in out.stdout.splitlines()[-2:][0] or "identical 15/15" in out.stdout
    data = json.loads(report.read_text())
    assert data["total"] == 15 and data["identical"] == 15 and data["ok"]
    assert data["embeddings_checked"] == 3 and data["embeddings_identical"] == 3
    assert data["environment"]["vllm"] and data["environment"]["device"] and data["profile"] == "exact"
    assert all(len(j["sha256_split"]) == 64 and j["sha256_split"] == j["sha256_e2e"] for j in data["jobs"])
    # the check has teeth only if the outputs differ between images and prompts
    assert len({j["sha256_split"] for j in data["jobs"]}) >= 12


def test_one_ulp_change_fails_and_names_the_job(tiny_model, engine, seed_jobs, tmp_path):
    paths, jobs = seed_jobs
    cfg = config(tiny_model, tmp_path / "store", max_tokens=24)
    Encoder(cfg, engine=engine).encode(paths)
    good = verify(cfg, read_jobs(jobs), engine=engine)
    assert good.ok and good.identical == 15
    key = KeyMaker(cfg)(open(paths[1], "rb").read())
    flip_one_ulp(cfg.store, key)
    report = verify(cfg, read_jobs(jobs), report_path=str(tmp_path / "r.json"), engine=engine)
    assert not report.ok
    (mismatch,) = report.embedding_mismatches
    assert mismatch["key"] == key and set(mismatch["jobs"]) == {f"1-{p}" for p in range(5)}
    assert "1-0" in report.table()
    assert all(j.identical for j in report.jobs if not j.id.startswith("1-"))


def test_cli_exit_status_on_altered_store(tiny_model, seed_jobs, cli_run, tmp_path):
    """Through the CLI, in this process on the shared engine (test_seed_table_is_identical_through_the_cli
    runs the CLI in its own processes)."""
    paths, jobs = seed_jobs
    store = tmp_path / "store"
    assert cli_run("encode", "--model", tiny_model, "--store", store, "--no-progress",
                   "--max-model-len", "2048", paths[0]).exit_code == 0
    cfg = config(tiny_model, store)
    flip_one_ulp(str(store), KeyMaker(cfg)(open(paths[0], "rb").read()))
    only_first = write_jobs(tmp_path / "jobs.jsonl", [json.loads(line) for line in open(jobs)][:2])
    out = cli_run("verify", "--model", tiny_model, "--store", store, "--jobs", only_first,
                  "--max-tokens", "8", "--max-model-len", "2048", "--no-progress")
    assert out.exit_code == 4  # a mismatch found
    assert "0-0" in out.stdout and "embeddings identical 0/1" in out.stdout


@pytest.mark.slow
def test_the_embedding_check_has_the_model_whatever_on_missing_says(tiny_model, engine, seed_jobs, tmp_path):
    """--on-missing error leaves the decoder free to put vLLM's engine core in its own process (what "auto"
    does on a GPU), but verify's embedding check runs the tower in its engine: before the fix every
    embedding came back as an error (0/256 on the H200 at 8630383)."""
    paths, jobs = seed_jobs
    cfg = config(tiny_model, tmp_path / "store", max_tokens=8)
    Encoder(cfg, engine=engine).encode(paths)
    code = (f"import json; from helpers import config; from splitvlm.decoder import read_jobs; "
            f"from splitvlm.verify import verify; "
            f"cfg = config({tiny_model!r}, {cfg.store!r}, max_tokens=8, on_missing='error', engine_process='separate'); "
            f"r = verify(cfg, read_jobs({jobs!r})[:3]); "
            f"print(json.dumps([r.identical, r.total, r.embeddings_identical, r.embeddings_checked, "
            f"r.engine.get('multiprocessing')]))")
    tests = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [3, 3, 1, 1, "0"]
