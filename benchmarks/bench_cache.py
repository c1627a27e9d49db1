"""Result cache: a repeated decode answered from the store's result cache vs decoded again in vLLM.

    python -m benchmarks.bench_cache --model DIR [--jobs 256] [--max-tokens 64]
        [--out benchmarks/results/bench_cache.json]
    python -m benchmarks.bench_cache --model DIR --smoke     # a few jobs for the CPU

One engine; the store is filled by the Encoder beforehand (not timed). The same jobs, one image
each, are decoded four times with Decoder.generate (key the images, read and check the entries,
then vLLM or the cache): without the cache (the baseline), with it cold (decode, then write the
results), with it warm in the engine's Decoder, and with it warm in a Decoder given no engine, as
a new `splitvlm decode --cache` process runs it: no vLLM engine is ever started. Both warm runs
must give the cold run's results byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.bench_decode import make_jobs
from benchmarks.common import (
    RESULTS,
    publish,
    report_header,
    sizes_for,
    start_engine,
    write_images,
)
from splitvlm.core.config import Config

FIELDS = ("text", "token_ids", "finish_reason", "sha256", "prompt_tokens", "keys")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Local Qwen2-VL checkpoint directory.")
    ap.add_argument("--jobs", type=int, default=None, help="Jobs decoded (default 256; smoke 8).")
    ap.add_argument("--max-tokens", type=int, default=None, help="Output tokens per job (default 64; smoke 8).")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=13, help="Seed of the synthetic images.")
    ap.add_argument("--dir", default=None, help="Where the temporary images and store go.")
    ap.add_argument("--smoke", action="store_true", help="A tiny run for the CPU.")
    ap.add_argument("--out", default=str(RESULTS / "bench_cache.json"))
    args = ap.parse_args(argv)
    args.jobs = args.jobs or (8 if args.smoke else 256)
    args.max_tokens = args.max_tokens or (8 if args.smoke else 64)
    return args


def timed_decode(cfg: Config, jobs: list, engine) -> tuple[dict, list]:
    from splitvlm.decoder import Decoder

    decoder = Decoder(cfg, engine=engine)
    t0 = time.perf_counter()
    results = decoder.generate(jobs)
    seconds = time.perf_counter() - t0
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed: {failed[:3]}")
    row = {"seconds": seconds, "requests_per_s": len(jobs) / seconds,
           "cached": sum(bool(r.cached) for r in results), "engine_started": decoder._engine is not None}
    return row, results


def run(engine, args: argparse.Namespace) -> dict:
    """The whole benchmark on an existing engine; returns the report (main writes it)."""
    from splitvlm.encoder import Encoder

    root = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.dir))
    try:
        paths = write_images(root / "img", 0, args.jobs, sizes_for(args.smoke), args.seed)
        cfg = engine.cfg.replace(store=str(root / "store.lmdb"), show_progress=False, max_tokens=args.max_tokens)
        stats = Encoder(cfg, engine=engine).encode(paths)
        if stats.encoded != len(paths):
            raise RuntimeError(f"encoded {stats.encoded} of {len(paths)} images: {stats.failures[:3]}")
        jobs = make_jobs(paths, 0)
        timed_decode(cfg, jobs[:2], engine)  # warm-up, outside the cache
        rows, outputs = {}, {}
        for name, cache, with_engine in (("no_cache", False, True), ("cache_cold", True, True),
                                         ("cache_warm", True, True), ("cache_warm_no_engine", True, False)):
            rows[name], outputs[name] = timed_decode(cfg.replace(cache=cache), jobs, engine if with_engine else None)
        identical = all(
            all(getattr(a, f) == getattr(b, f) for f in FIELDS)
            for name in ("cache_warm", "cache_warm_no_engine", "no_cache")
            for a, b in zip(outputs["cache_cold"], outputs[name], strict=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows["no_cache"]["seconds"]
    return {
        **report_header("bench_cache", engine, args),
        "jobs": args.jobs,
        "max_tokens": args.max_tokens,
        "results": rows,
        "speedup_warm": base / rows["cache_warm"]["seconds"],
        "speedup_warm_no_engine": base / rows["cache_warm_no_engine"]["seconds"],
        "cold_overhead": rows["cache_cold"]["seconds"] / base - 1,
        "identical": identical,
        "goals": {"identical": {"value": identical, "target": "true", "met": identical},
                  "all_cached": {"value": rows["cache_warm_no_engine"]["cached"], "target": f"== {args.jobs}",
                                 "met": rows["cache_warm_no_engine"]["cached"] == args.jobs
                                 and not rows["cache_warm_no_engine"]["engine_started"]}},
    }


def summary(report: dict) -> str:
    lines = [f"bench_cache  {report['device']}  vLLM {report['vllm']}  profile {report['profile']}  "
             f"{report['jobs']} jobs x {report['max_tokens']} tokens",
             f"{'run':<22} {'seconds':>9} {'req/s':>10} {'cached':>7} {'engine':>7}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<22} {r['seconds']:>9.3f} {r['requests_per_s']:>10.1f} {r['cached']:>7} "
                     f"{'yes' if r['engine_started'] else 'no':>7}")
    lines.append(f"warm vs no cache: {report['speedup_warm']:.1f}x (without an engine {report['speedup_warm_no_engine']:.1f}x); "
                 f"cold run overhead {100 * report['cold_overhead']:+.1f}%; identical: {report['identical']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, engine=None) -> dict:
    args = parse_args(argv)
    start_s = None
    if engine is None:
        engine, start_s = start_engine(Config(model=args.model, max_model_len=args.max_model_len, show_progress=False))
    return publish(run(engine, args), "benchmarks.bench_cache", argv, args.out, start_s, summary)


if __name__ == "__main__":
    main()
