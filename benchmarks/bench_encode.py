"""Encoder throughput: images/s, patches/s and TFLOP/s against the bf16 matmul peak, store share.

    python -m benchmarks.bench_encode --model DIR [--profile exact|fast] [--images 64,512]
        [--per-size 32] [--batch-patches 16384] [--out benchmarks/results/bench_encode.json]
    python -m benchmarks.bench_encode --model DIR --smoke     # tiny sizes for the CPU
    python -m benchmarks.bench_encode --model DIR --vs-default [--variants exact,exact_cublas,exact_vision_sdpa]
        [--commit SHA]   # issue #16

--vs-default runs the benchmark once per side, each in its own process, one right after the other:
first under the fast profile (vLLM's default tower: its attention backend, its kernels), then
each --variants side (default: exact; the others are the exact profile with one lever changed,
benchmarks.common.VARIANTS); one report holds every side and its ratios to fast per mix and size.

Each mix of synthetic images (sizes 224-800 px) goes through the real Encoder into a fresh
store in a temporary folder (reading, preprocessing, vision tower and store writes all timed),
then through vLLM's batched vision tower alone on the same preprocessed images as the
reference. One batch of each image size is timed on its own for the rate by size. FLOPs are
estimated from the model's vision config; the bf16 matmul peak is measured in the same process.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS,
    VARIANTS,
    VisionShape,
    command,
    encode_batches,
    goal,
    measure_peak,
    now,
    publish,
    report_header,
    run_side,
    size_label,
    sizes_for,
    start_engine,
    variant_setup,
    write_images,
    write_report,
)
from splitvlm.core.config import Config
from splitvlm.core.sources import load_image

GOAL_SHARE_OF_PEAK = 0.65
GOAL_STORE_SHARE = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Local Qwen2-VL checkpoint directory.")
    ap.add_argument("--profile", default="exact", choices=["exact", "fast"])
    ap.add_argument("--images", default=None, help="Comma-separated mix sizes (default 64,512; smoke 8,16).")
    ap.add_argument("--per-size", type=int, default=None, help="Images timed per image size (default 32; smoke 2).")
    ap.add_argument("--batch-patches", type=int, default=Config.batch_patches, help="Tower budget per step.")
    ap.add_argument("--loader-threads", type=int, default=Config.loader_threads)
    ap.add_argument("--peak-n", type=int, default=None, help="Matmul size for the peak (default 8192 GPU, 1024 CPU).")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--cuda-graphs", action="store_true", help="Capture CUDA graphs (the tower runs eager either way).")
    ap.add_argument("--seed", type=int, default=7, help="Seed of the synthetic images.")
    ap.add_argument("--dir", default=None, help="Where the temporary images and stores go.")
    ap.add_argument("--smoke", action="store_true", help="A tiny run for the CPU.")
    ap.add_argument("--vs-default", action="store_true",
                    help="Run fast (vLLM's default tower) then each --variants side, each in its own process; "
                         "one report with their ratios to fast.")
    ap.add_argument("--variants", default="exact",
                    help=f"With --vs-default: the sides after fast, comma-separated: {', '.join(VARIANTS)}.")
    ap.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                    help="Run as this variant (overrides --profile; --vs-default sets it per side).")
    ap.add_argument("--commit", default="", help="The commit measured (a device copy has no .git).")
    ap.add_argument("--out", default=str(RESULTS / "bench_encode.json"))
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; one of {', '.join(VARIANTS)}")
    args.images = args.images or ("8,16" if args.smoke else "64,512")
    args.per_size = args.per_size or (2 if args.smoke else 32)
    args.peak_n = args.peak_n or (8192 if torch.cuda.is_available() else (512 if args.smoke else 1024))
    return args


def preprocess_all(engine, paths: list[str], threads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: engine.preprocess(load_image(p)[1]), paths))


def rates(images: int, patches: int, flops: float, seconds: float, peak: float) -> dict:
    tflops = flops / seconds / 1e12
    return {"seconds": seconds, "images_per_s": images / seconds, "patches_per_s": patches / seconds,
            "tflops": tflops, "share_of_peak": tflops / peak}


def measure_mix(engine, args, shape: VisionShape, paths: list[str], store: Path, peak: float) -> dict:
    """One mix: the real Encoder into a fresh store, then vLLM's batched tower alone on the same images."""
    from splitvlm.encoder import Encoder

    cfg = engine.cfg.replace(store=str(store), batch_patches=args.batch_patches,
                             loader_threads=args.loader_threads, show_progress=False, overwrite=False)
    stats = Encoder(cfg, engine=engine).encode(paths)
    if stats.encoded != len(paths):
        raise RuntimeError(f"encoded {stats.encoded} of {len(paths)} images: {stats.failures[:3]}")
    prepared = preprocess_all(engine, paths, args.loader_threads)
    _, tower_s = encode_batches(engine, prepared, args.batch_patches)
    patches = sum(int(g.prod()) for _, g in prepared)
    flops = sum(shape.flops(g.reshape(-1).tolist()) for _, g in prepared)
    encoder = rates(len(paths), patches, flops, stats.seconds, peak)
    encoder.update(tower_seconds=stats.tower_seconds, store_seconds=stats.store_seconds,
                   store_share=stats.store_seconds / stats.seconds)
    tower = rates(len(paths), patches, flops, tower_s, peak)
    return {"images": len(paths), "patches": patches, "tflop": flops / 1e12, "encoder": encoder,
            "tower": tower, "encoder_vs_tower": encoder["images_per_s"] / tower["images_per_s"]}


def measure_sizes(engine, args, shape: VisionShape, root: Path, peak: float) -> list[dict]:
    """vLLM's batched tower on one batch of each image size, timed on its own."""
    rows = []
    for k, size in enumerate(sizes_for(args.smoke)):
        paths = write_images(root / f"size{k}", 2_000_000 + k * 1000, args.per_size, [size], args.seed)
        prepared = preprocess_all(engine, paths, args.loader_threads)
        encode_batches(engine, prepared[:1], args.batch_patches)  # warm-up at this shape
        _, seconds = encode_batches(engine, prepared, args.batch_patches)
        grid = prepared[0][1].reshape(-1).tolist()
        patches = sum(int(g.prod()) for _, g in prepared)
        flops = sum(shape.flops(g.reshape(-1).tolist()) for _, g in prepared)
        rows.append({"size": size_label(size), "width": size[0], "height": size[1], "grid_thw": grid,
                     "patches_per_image": patches // len(prepared), "images": len(prepared),
                     **rates(len(prepared), patches, flops, seconds, peak)})
    return rows


def run(engine, args: argparse.Namespace, peak: dict | None = None) -> dict:
    """The whole benchmark on an existing engine; returns the report (main writes it)."""
    shape = VisionShape.from_model(engine.cfg.model)
    sizes = sizes_for(args.smoke)
    counts = [int(n) for n in args.images.split(",")]
    peak = peak or {**measure_peak(args.peak_n), "when": "after engine start"}
    root = Path(tempfile.mkdtemp(prefix="bench_encode_", dir=args.dir))
    try:
        warm = write_images(root / "warm", 1_000_000, len(sizes), sizes, args.seed)
        measure_mix(engine, args, shape, warm, root / "warm.lmdb", peak["tflops"])  # warm-up
        paths = write_images(root / "mix", 0, max(counts), sizes, args.seed)
        mixes = {str(n): measure_mix(engine, args, shape, paths[:n], root / f"store{n}.lmdb", peak["tflops"])
                 for n in counts}
        per_size = measure_sizes(engine, args, shape, root, peak["tflops"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    largest = mixes[str(max(counts))]
    return {
        **report_header("bench_encode", engine, args),
        "vision_shape": asdict(shape),
        "peak": peak,
        "mixes": mixes,
        "per_size": per_size,
        "goals": {
            "encoder_share_of_peak": goal(largest["encoder"]["share_of_peak"], GOAL_SHARE_OF_PEAK),
            "store_share_of_wall": goal(max(m["encoder"]["store_share"] for m in mixes.values()),
                                        GOAL_STORE_SHARE, at_least=False),
        },
    }


def summary(report: dict) -> str:
    peak = report["peak"]
    lines = [f"bench_encode  {report['device']}  vLLM {report['vllm']}  profile {report['profile']}  "
             f"bf16 peak {peak['tflops']:.3g} TFLOP/s ({peak['n']}^3)",
             f"{'images':>7} {'enc img/s':>10} {'patch/s':>10} {'TFLOP/s':>8} {'peak':>6} "
             f"{'store':>6} {'tower img/s':>12} {'peak':>6} {'enc/tower':>9}"]
    for n, m in report["mixes"].items():
        e, t = m["encoder"], m["tower"]
        lines.append(f"{n:>7} {e['images_per_s']:>10.1f} {e['patches_per_s']:>10.0f} {e['tflops']:>8.3g} "
                     f"{e['share_of_peak']:>6.1%} {e['store_share']:>6.1%} {t['images_per_s']:>12.1f} "
                     f"{t['share_of_peak']:>6.1%} {m['encoder_vs_tower']:>9.2f}")
    lines.append("by size (tower): " + ", ".join(f"{r['size']} {r['images_per_s']:.1f} img/s"
                                                 for r in report["per_size"]))
    lines.append("goals: " + ", ".join(f"{k} {g['value']:.3g} {g['target']} {'met' if g['met'] else 'NOT met'}"
                                       for k, g in report["goals"].items()))
    return "\n".join(lines)


def vs_default(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """fast, then each variant, each in a fresh process on the same machine; ratios side / fast (goal >= 0.90)."""
    passed = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--vs-default"]  # --variant, --out: last wins
    sides, failed = {}, {}
    root = Path(tempfile.mkdtemp(prefix="bench_encode_vs_", dir=args.dir))
    for name in dict.fromkeys(["fast", *args.variants.split(",")]):  # a failed side: the others still run
        out = root / f"{name}.json"
        run_side(name, [sys.executable, "-m", "benchmarks.bench_encode", *passed, "--variant", name, "--out", str(out)],
                 out, sides, failed)
    ablation = {name: side_ratios(sides["fast"], side) for name, side in sides.items() if name != "fast"} \
        if "fast" in sides else {}
    report = {"benchmark": "bench_encode_vs_default", "date": now(), "commit": args.commit,
              "command": command("benchmarks.bench_encode", argv), "sides": sides, "failed_sides": failed,
              "ratios": ablation.get("exact"), "ablation": ablation}
    shutil.rmtree(root, ignore_errors=True)
    path = write_report(report, args.out)
    for name, ratios in ablation.items():
        print(f"{name}/fast: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(f"wrote {path}")
    return report


def side_ratios(fast: dict, side: dict) -> dict[str, float]:
    """side / fast images per second: the encoder and the tower alone per mix, the tower per image size."""
    ratios = {}
    for n, m in side["mixes"].items():
        for part in ("encoder", "tower"):
            ratios[f"mix{n}_{part}"] = round(m[part]["images_per_s"] / fast["mixes"][n][part]["images_per_s"], 4)
    for e, f in zip(side["per_size"], fast["per_size"]):
        ratios[f"size_{e['size']}_tower"] = round(e["images_per_s"] / f["images_per_s"], 4)
    return ratios


def main(argv: list[str] | None = None, engine=None) -> dict:
    args = parse_args(argv)
    if args.vs_default:
        return vs_default(args, argv)
    peak = start_s = None
    if engine is None:
        peak = {**measure_peak(args.peak_n), "when": "before engine start"}
        chosen = variant_setup(args.variant) if args.variant else {"profile": args.profile}
        engine, start_s = start_engine(Config(
            model=args.model, **chosen, max_model_len=args.max_model_len,
            enforce_eager=not args.cuda_graphs, batch_patches=args.batch_patches,
            loader_threads=args.loader_threads, show_progress=False))
    return publish(run(engine, args, peak), "benchmarks.bench_encode", argv, args.out, start_s, summary)


if __name__ == "__main__":
    main()
