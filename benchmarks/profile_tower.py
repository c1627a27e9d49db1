"""Where the vision tower's GPU time goes, kernel by kernel, under vLLM's defaults and under each exact variant.

    python -m benchmarks.profile_tower --model DIR [--variants exact,exact_cublas] [--images 128]
        [--commit SHA] [--out benchmarks/results/profile_tower.json]
    python -m benchmarks.profile_tower --model DIR --smoke      # a few tiny images, for the CPU

Each side (fast first, then each variant of benchmarks.common.VARIANTS) runs in its own process:
one engine, the same synthetic images (224-800 px) preprocessed, the tower run once to warm up,
then once under torch.profiler. The report gives per side the device time per image by kernel
class (matmul, attention, other) and the top kernels, and per variant the time it adds over fast
per class: the class that holds the gap, and what it costs, measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS,
    command,
    encode_batches,
    now,
    run_side,
    sizes_for,
    start_engine,
    variant_setup,
    write_images,
    write_report,
)
from benchmarks.kernel_trace import by_class, gaps, kernel_class  # noqa: F401  (kernel_class: tests read it here)
from splitvlm.core.config import Config
from splitvlm.core.sources import load_image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Local Qwen-VL checkpoint directory.")
    ap.add_argument("--variants", default="exact", help="Exact variants to profile after fast (comma-separated).")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one side, in its own process
    ap.add_argument("--images", type=int, default=None, help="Images profiled (default 128; smoke 4).")
    ap.add_argument("--batch-patches", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--top", type=int, default=15, help="Kernels listed per side.")
    ap.add_argument("--dir", default=None, help="Where the images go (default: a temporary folder).")
    ap.add_argument("--smoke", action="store_true", help="A tiny run for the CPU.")
    ap.add_argument("--commit", default="", help="The commit measured (a device copy has no .git).")
    ap.add_argument("--out", default=str(RESULTS / "profile_tower.json"))
    args = ap.parse_args(argv)
    args.images = args.images or (4 if args.smoke else 128)
    return args


def profile_side(args: argparse.Namespace) -> dict:
    """One side in this process: the tower's kernels over --images images, after a warm-up pass."""
    from torch.profiler import ProfilerActivity, profile

    chosen = variant_setup(args.variant)
    engine, start_s = start_engine(Config(model=args.model, **chosen, max_model_len=args.max_model_len,
                                          enforce_eager=True, batch_patches=args.batch_patches, show_progress=False))
    folder = Path(args.dir or tempfile.mkdtemp(prefix="profile_tower_"))
    paths = write_images(folder / "images", 0, args.images, sizes_for(args.smoke))
    prepared = [engine.preprocess(load_image(p)[1]) for p in paths]
    encode_batches(engine, prepared, args.batch_patches)  # warm-up: kernels compiled and tuned
    gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        _, seconds = encode_batches(engine, prepared, args.batch_patches)
    by_name: dict[str, dict] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) if gpu else event.self_cpu_time_total
        if us > 0 and (not gpu or str(getattr(event, "device_type", "")).endswith("CUDA")):
            by_name[event.key[:160]] = {"ms": us / 1000, "calls": event.count}
    n = len(prepared)
    return {"variant": args.variant, "device": engine.environment()["device"], "engine": engine.reported(),
            "engine_start_s": round(start_s, 1), "images": n, "wall_s": round(seconds, 4),
            "images_per_s": round(n / seconds, 2), "timed": "device (CUDA) time" if gpu else "CPU self time",
            "unit": "image", **by_class(by_name, n, args.top)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.variant:
        return write_report(profile_side(args), args.out) and {}
    passed = list(sys.argv[1:] if argv is None else argv)
    sides, failed = {}, {}
    root = Path(tempfile.mkdtemp(prefix="profile_tower_", dir=args.dir))
    for name in dict.fromkeys(["fast", *args.variants.split(",")]):
        out = root / f"{name}.json"
        run_side(name, [sys.executable, "-m", "benchmarks.profile_tower", *passed, "--variant", name,
                        "--out", str(out)], out, sides, failed)
    report = {"benchmark": "profile_tower", "date": now(), "commit": args.commit,
              "command": command("benchmarks.profile_tower", argv), "sides": sides, "failed_sides": failed,
              "gaps_over_fast": {name: gaps(sides["fast"], side) for name, side in sides.items()
                                 if name != "fast" and "fast" in sides}}  # ms per image by class
    path = write_report(report, args.out)
    for name, side in sides.items():
        print(f"{name}: {side['images_per_s']} images/s; ms per image " +
              ", ".join(f"{k} {v}" for k, v in side["ms_per_unit"].items()))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
