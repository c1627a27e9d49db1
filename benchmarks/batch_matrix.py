"""Batch-invariance matrix through splitvlm's Decoder: batch 1, 8, 256, 1024 and shuffled, in one engine.

python -m benchmarks.batch_matrix --model DIR --store S --jobs jobs.jsonl --out matrix.json
    [--sample 32] [--max-tokens 32] [--kv-cache-memory-bytes N] [--gpu-memory-utilization F] [--max-model-len N]
    [--save-outputs batch_256.jsonl]

Every output is compared with batch 256 (token ids and text bytes). Batch 1 runs a sample of
the jobs, batch 8 the first 256, the others all of them. --save-outputs writes batch 256's
results as decode writes them, to compare with a `splitvlm decode` run in another process.
Exit status 1 on any difference or failed job.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from splitvlm.core.config import Config
from splitvlm.core.identity import environment
from splitvlm.decoder import Decoder, read_jobs


def outputs(results) -> dict[str, tuple]:
    return {r.id: (tuple(r.token_ids), r.text, r.error) for r in results}


def parser() -> argparse.ArgumentParser:
    """The command line (gpu_check builds its lane from it; a test checks they agree)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sample", type=int, default=32, help="Jobs run alone (batch 1).")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--profile", default="exact")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--save-outputs", help="Write batch 256's results here as JSONL.")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main() -> None:
    args = parser().parse_args()

    jobs = read_jobs(args.jobs)
    cfg = Config(model=args.model, store=args.store, profile=args.profile, max_tokens=args.max_tokens,
                 kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                 gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                 show_progress=False)
    t0 = time.perf_counter()
    decoder = Decoder(cfg)
    engine = decoder.engine
    report: dict = {"command": sys.argv, "jobs": len(jobs), "engine_start_s": time.perf_counter() - t0,
                    "environment": environment(), "engine": engine.reported(), "settings": {}}
    rng = random.Random(args.seed)
    shuffled = jobs[:]
    rng.shuffle(shuffled)
    plan = {  # name: (batch, jobs)
        "batch_256": (256, jobs),
        "batch_1": (1, rng.sample(jobs, min(args.sample, len(jobs)))),
        "batch_8": (8, jobs[:256]),
        "batch_1024": (1024, jobs),
        "shuffled_256": (256, shuffled),
    }
    runs: dict[str, dict[str, tuple]] = {}
    for name, (batch, subset) in plan.items():
        decoder.cfg = cfg.replace(batch_jobs=batch)
        t = time.perf_counter()
        results = decoder.generate(subset)
        runs[name] = outputs(results)
        if name == "batch_256" and args.save_outputs:
            Path(args.save_outputs).write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n"
                                                       for r in results), encoding="utf-8")
        seconds = time.perf_counter() - t
        ref = runs["batch_256"]
        differ = [job_id for job_id, out in runs[name].items() if out != ref[job_id]]
        same = len(subset) - len(differ)
        failed = sum(out[2] is not None for out in runs[name].values())
        report["settings"][name] = {"batch": batch, "jobs": len(subset), "identical_to_batch_256": same,
                                    "failed": failed, "seconds": round(seconds, 3), "differ": differ[:20]}
        print(f"{name}: {same}/{len(subset)} identical to batch 256, {failed} failed, {seconds:.1f} s", flush=True)
    settings = report["settings"].values()
    report["ok"] = all(s["identical_to_batch_256"] == s["jobs"] and s["failed"] == 0 for s in settings)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"batch matrix: {'all identical' if report['ok'] else 'DIFFERENCES'}; wrote {args.out}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
