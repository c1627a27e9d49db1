"""One process, one engine, one profile: verify >=1,000 jobs, then bench_encode and bench_decode.

python -m benchmarks.gpu_suite --model DIR --profile exact|fast --out-dir OUT [--images 256 --prompts 4]

Engine start dominates short GPU sessions, so everything for one profile shares one engine.
The bf16 matmul peak is measured before the engine exists (the exact profile reroutes aten::mm).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import bench_decode, bench_encode
from benchmarks.common import measure_peak
from splitvlm.core.config import Config
from splitvlm.decoder.jobs import read_jobs
from splitvlm.encoder import Encoder
from splitvlm.tools.samples import PROMPTS, save_corpus
from splitvlm.verify import verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", default="exact")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--bench", default="encode,decode", help="Which benchmarks follow the verify run ('' for none).")
    ap.add_argument("--skip-verify", action="store_true")
    args = ap.parse_args()
    out = Path(args.out_dir)
    work = Path("/tmp/splitvlm-suite") / args.profile
    out.mkdir(parents=True, exist_ok=True)
    peak = measure_peak(8192 if torch.cuda.is_available() else 512)
    from splitvlm.core.engine import Engine

    t0 = time.perf_counter()
    cfg = Config(model=args.model, store=str(work / "store"), profile=args.profile, max_tokens=args.max_tokens,
                 max_model_len=4096, batch_jobs=256, show_progress=False)
    engine = Engine(cfg)
    summary: dict = {"profile": args.profile, "engine_start_s": time.perf_counter() - t0, "peak": peak}
    paths = save_corpus(work / "imgs", args.images, seed=21)
    jobs_file = work / "jobs.jsonl"
    with open(jobs_file, "w", encoding="utf-8") as f:
        for p in range(args.prompts):
            for i, path in enumerate(paths):
                f.write(json.dumps({"id": f"{i}-{p}", "images": [path], "prompt": PROMPTS[p % len(PROMPTS)]},
                                   ensure_ascii=False) + "\n")
    stats = Encoder(cfg, engine=engine).encode(paths)
    summary["encode"] = stats.to_dict()
    if not args.skip_verify:
        run_verify(cfg, engine, jobs_file, out, summary)
    if "encode" in args.bench:
        bench_encode.main(["--model", args.model, "--profile", args.profile, "--out",
                           str(out / f"bench_encode_{args.profile}.json")], engine=engine)
    if "decode" in args.bench:
        bench_decode.main(["--model", args.model, "--profile", args.profile, "--out",
                           str(out / f"bench_decode_{args.profile}.json")], engine=engine)


def run_verify(cfg: Config, engine, jobs_file: Path, out: Path, summary: dict) -> None:
    report = verify(cfg, read_jobs(str(jobs_file)), report_path=str(out / f"verify_{cfg.profile}.json"), engine=engine)
    summary["verify"] = {"total": report.total, "identical": report.identical, "ok": report.ok,
                         "embeddings": f"{report.embeddings_identical}/{report.embeddings_checked}",
                         "seconds": report.seconds,
                         "split_requests_per_s": report.total / report.seconds["split"],
                         "e2e_requests_per_s": report.total / report.seconds["end_to_end"],
                         "distinct_outputs": len({j.tokens_sha256 for j in report.jobs})}
    (out / f"suite_{cfg.profile}.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary["verify"], indent=1))


if __name__ == "__main__":
    main()
