"""CLI habits: python -m splitvlm, --debug after the command, exit statuses 0-4, no progress bars off a terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import config, flip_one_ulp, write_jobs

from splitvlm.cli.main import cli
from splitvlm.core.provenance import KeyMaker
from splitvlm.encoder import Encoder
from splitvlm.tools.samples import save_corpus

COMMON = ["--max-tokens", "6", "--max-model-len", "2048"]


def splitvlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitvlm", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CI": "1"})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_corpus(tmp_path_factory.mktemp("habits") / "imgs", 2, seed=9, sizes=[(64, 64)])


@pytest.fixture()
def cfg(tiny_model, engine, images, tmp_path):
    cfg = config(tiny_model, tmp_path / "store", max_tokens=6)
    Encoder(cfg, engine=engine).encode(images)
    return cfg


@pytest.fixture()
def run(cli_run):
    """The CLI in this process; every vLLM engine it asks for is the session's one (conftest)."""
    return cli_run


@pytest.fixture()
def jobs(images, tmp_path):
    good = [{"id": f"{n}", "images": [path], "prompt": "Describe."} for n, path in enumerate(images)]
    return (write_jobs(tmp_path / "good.jsonl", good),
            write_jobs(tmp_path / "some_bad.jsonl", [*good, {"id": "bad", "images": "x.png", "prompt": "Hi"}]))


def test_python_dash_m_help_lists_the_exit_statuses():
    out = splitvlm("--help")
    assert out.returncode == 0 and out.stdout.startswith("Usage: python -m splitvlm"), out.stderr
    for row in ("0  all done", "1  error", "2  usage error", "3  some inputs, jobs or entries failed", "4  a mismatch found"):
        assert row in out.stdout


def test_debug_after_the_command(tmp_path):
    plain = splitvlm("store", "stats", "--store", str(tmp_path / "none"))
    assert plain.returncode == 1 and plain.stderr.strip() == f"error: {tmp_path / 'none'}: no store there"
    debug = splitvlm("store", "stats", "--store", str(tmp_path / "none"), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "StoreError" in debug.stderr
    for command in (["encode"], ["decode"], ["verify"], ["store", "check"], ["env"], ["demo"], ["make-model"]):
        assert CliRunner().invoke(cli, [*command, "--debug", "--help"]).exit_code == 0, command


def test_decode_exit_statuses(cfg, run, jobs, images, tmp_path):
    good, some_bad = jobs
    args = ["decode", "--model", cfg.model, "--store", cfg.store, *COMMON]
    assert run(*args, "--jobs", good, "--out", tmp_path / "o.jsonl").exit_code == 0
    assert run(*args, "--jobs", some_bad, "--out", tmp_path / "o.jsonl").exit_code == 3
    assert run(*args, "--jobs", good, "--out", tmp_path / "o.jsonl", "--batch-jobs", "0").exit_code == 2
    flip_one_ulp(cfg.store, KeyMaker(cfg)(open(images[0], "rb").read()))
    result = run(*args, "--jobs", some_bad, "--out", tmp_path / "o.jsonl", "--spot-check", "1")
    assert result.exit_code == 4 and "MISMATCH: 0 (" in result.stdout  # a mismatch outranks a failed job


def test_verify_exit_statuses(cfg, run, jobs, images, tmp_path):
    good, some_bad = jobs
    args = ["verify", "--model", cfg.model, "--store", cfg.store, *COMMON]
    result = run(*args, "--jobs", good)
    assert result.exit_code == 0 and "identical 2/2" in result.stdout
    assert "end-to-end:" not in result.stderr and "%|" not in result.stderr  # no terminal: no bars
    assert run(*args, "--jobs", some_bad).exit_code == 3
    flip_one_ulp(cfg.store, KeyMaker(cfg)(open(images[0], "rb").read()))
    assert run(*args, "--jobs", good).exit_code == 4


def test_encode_exit_3_and_no_bars_with_no_progress(tiny_model, images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = splitvlm("encode", "--model", tiny_model, "--store", str(tmp_path / "s"), "--max-model-len", "2048",
                   "--no-progress", images[0], str(bad))
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout.startswith("encoded 1,") and "failed 1" in out.stdout
    assert "%|" not in out.stderr and "img/s" not in out.stderr
    assert "Completed |" not in out.stderr  # vLLM's own weight-loading bar is off too


def test_vllm_option_names_are_accepted():
    """vLLM's spellings of splitvlm's options: --limit-mm-per-prompt (its JSON too) and --mm-encoder-only."""
    from splitvlm.cli.decode_cmd import ImageLimit

    limit = ImageLimit()
    assert limit.convert("3", None, None) == limit.convert('{"image": 3}', None, None) == 3
    assert limit.convert('{"image": 2, "video": 0}', None, None) == 2
    decode_help = CliRunner().invoke(cli, ["decode", "--help"]).output
    encode_help = CliRunner().invoke(cli, ["encode", "--help"]).output
    assert "--limit-mm-per-prompt" in decode_help and "--mm-encoder-only" in encode_help

