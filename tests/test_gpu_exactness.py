"""Exactness on a GPU (skipped without CUDA): split == end to end and batch 1 == batch 8 on the 2B
architecture, through the CLI; the fast profile runs as a control that may differ.

On the CPU the same properties are tested on the tiny model (test_verify, test_batch_invariance),
but the CPU build's kernels do not change with the batch, so only a GPU can make these fail for
the reason they exist. Each step is its own process, as users run them (one profile per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_jobs

from splitvlm.tools.samples import save_corpus

pytestmark = pytest.mark.gpu
PROMPTS = ("Describe this image.", "What colours are in it?")
ENGINE = ["--max-model-len", "4096", "--gpu-memory-utilization", "0.3", "--max-tokens", "16"]


def splitvlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitvlm", *map(str, args)], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "CI": "1"})


def outputs(path: Path) -> dict[str, list[int]]:
    return {row["id"]: row["token_ids"] for row in map(json.loads, path.read_text().splitlines())}


def check_exactness(model: str, root: Path) -> dict:
    """Encode, decode at batch 1 and 8, verify (exact); encode and verify under fast. Returns what was seen."""
    images = save_corpus(root / "images", 16, seed=11, sizes=[(224, 224), (448, 336), (336, 560), (640, 480)])
    jobs = write_jobs(root / "jobs.jsonl", [{"id": f"{n}-{p}", "images": [image], "prompt": prompt}
                                             for n, image in enumerate(images) for p, prompt in enumerate(PROMPTS)])
    store = root / "store"
    done = splitvlm("encode", "--model", model, "--store", store, "--no-progress", *images)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {}
    for batch in (1, 8):
        out = root / f"b{batch}.jsonl"
        done = splitvlm("decode", "--model", model, "--store", store, "--jobs", jobs, "--out", out, "--no-progress",
                        "--batch-jobs", batch, *ENGINE)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[batch] = outputs(out)
    verify = splitvlm("verify", "--model", model, "--store", store, "--jobs", jobs, "--no-progress",
                      "--report", root / "verify.json", *ENGINE)
    fast_store = root / "fast_store"
    fast = splitvlm("encode", "--profile", "fast", "--model", model, "--store", fast_store, "--no-progress", *images)
    assert fast.returncode == 0, fast.stderr[-2000:]
    fast_verify = splitvlm("verify", "--profile", "fast", "--model", model, "--store", fast_store, "--jobs", jobs,
                           "--no-progress", "--report", root / "verify_fast.json", *ENGINE)
    return {"runs": runs, "verify": verify, "report": json.loads((root / "verify.json").read_text()),
            "fast_verify": fast_verify}


def test_split_equals_end_to_end_and_batch_1_equals_8_on_the_gpu(tmp_path):
    from splitvlm.tools.make_model import make_model

    model = make_model("qwen2-vl-2b", str(tmp_path / "model"), device="cuda")
    seen = check_exactness(str(model), tmp_path)
    b1, b8 = seen["runs"][1], seen["runs"][8]
    assert len(b1) == 32 and b1 == b8
    assert len({tuple(t) for t in b1.values()}) > 16  # the answers react to image and prompt
    assert seen["verify"].returncode == 0, seen["verify"].stdout[-2000:]
    report = seen["report"]
    assert report["identical"] == report["total"] == 32
    assert report["embeddings_identical"] == report["embeddings_checked"] == 16
    assert seen["fast_verify"].returncode in (0, 4), seen["fast_verify"].stderr[-2000:]  # a control: may differ
