"""Single-process `encode` vs `encode --ray` on one machine: images/s of each, and their stores compared entry for entry.

    python -m benchmarks.bench_ray_encode --model DIR --gpus 2 [--images 512] [--ray-batch 256[,1024...]]
        [--verify-jobs 256] [--dir DIR] [--commit SHA] [--out benchmarks/results/bench_ray_encode.json]
    python -m benchmarks.bench_ray_encode --model DIR --gpus 0 --workers 2 --smoke   # tiny model, CPU

Writes one corpus of synthetic images (224-800 px; --smoke: a few tiny sizes), then runs the CLI
twice, one right after the other, each into a fresh store: `splitvlm encode` and `splitvlm encode
--ray --gpus N`. Each run's figures come from its --stats-json (images/s over the run, engine and
Ray start included) and its wall time as a process. The stores must hold the same keys with the
same tensor bytes; metadata may differ only in `created` (and `meta_checksum`, which covers it).
Both rates come twice: over the whole run, and after the first stored entry (engine and Ray start,
a fixed cost per run, left out: `images_per_s_after_start`). With --verify-jobs N, `splitvlm verify`
then runs N jobs (one per image) on the --ray store. Exit status 1 when the stores differ or verify
does not pass. The JSON holds the exact commands, both rates and their ratios.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bytecode import compile_site
from benchmarks.common import RESULTS, command, now, sizes_for, write_images
from splitvlm.encoder.ray_pipeline import RayOptions

ALLOWED_META = {"created", "meta_checksum"}  # set at write time by the store; see docs/store-format.md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Local Qwen2-VL checkpoint directory.")
    ap.add_argument("--gpus", type=int, required=True, help="encode --ray --gpus N (0: CPU workers).")
    ap.add_argument("--workers", type=int, default=None, help="CPU workers with --gpus 0.")
    ap.add_argument("--ray-batch", default=None,
                    help="Inputs per call to a worker; several, comma-separated, run --ray once each (the first is "
                         "'ray'). Default: encode's (256 with --gpus N, 32 with --gpus 0).")
    ap.add_argument("--address", default=None, help="A Ray cluster to join (default: a local one).")
    ap.add_argument("--images", type=int, default=None, help="Corpus size (default 512; smoke 16).")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=7, help="Seed of the synthetic images.")
    ap.add_argument("--dir", default=None, help="Where the images and stores go, kept afterwards (default: a temporary folder).")
    ap.add_argument("--verify-jobs", type=int, default=0, help="Then run `splitvlm verify` on this many jobs of the --ray store.")
    ap.add_argument("--max-tokens", type=int, default=32, help="Output tokens per verify job.")
    ap.add_argument("--commit", default="", help="The commit measured, recorded in the report.")
    ap.add_argument("--smoke", action="store_true", help="Tiny images and a small corpus, for the CPU.")
    ap.add_argument("--out", default=str(RESULTS / "bench_ray_encode.json"))
    args = ap.parse_args(argv)
    args.images = args.images or (16 if args.smoke else 512)
    try:
        args.ray_batches = [int(b) for b in (args.ray_batch or str(RayOptions.default_batch(args.gpus))).split(",")]
    except ValueError:
        ap.error(f"--ray-batch: whole numbers, comma-separated, not {args.ray_batch!r}")
    if any(b < 1 for b in args.ray_batches):
        ap.error("--ray-batch: each at least 1")
    return args


def run_encode(args: argparse.Namespace, images: Path, store: Path, extra: list[str]) -> dict:
    """One `splitvlm encode` as its own process: the command, wall time, exit status and --stats-json figures."""
    stats = store.with_suffix(".stats.json")
    cmd = [sys.executable, "-m", "splitvlm", "encode", "--model", args.model, "--store", str(store),
           "--max-model-len", str(args.max_model_len), "--no-progress", "--stats-json", str(stats), *extra, str(images)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    figures = json.loads(stats.read_text())
    after = figures["seconds"] - (figures["first_stored_s"] or 0.0)
    return {"command": shlex.join(cmd), "wall_s": round(wall, 3), "encoded": figures["encoded"],
            "images_per_s": figures["images_per_s"], "images_per_s_wall": figures["encoded"] / wall,
            "images_per_s_after_start": figures["encoded"] / after if after > 0 else None,
            "seconds": figures["seconds"], "engine_start_s": figures["engine_start_s"],
            "first_stored_s": figures["first_stored_s"], "ray": figures.get("ray")}


def run_verify(args: argparse.Namespace, images: Path, store: Path) -> dict:
    """`splitvlm verify` of the first --verify-jobs images (one job each) against the store: split == end to end."""
    from splitvlm.tools.samples import PROMPTS

    paths = sorted(str(p) for p in images.iterdir())[:args.verify_jobs]
    jobs = store.with_suffix(".jobs.jsonl")
    jobs.write_text("".join(json.dumps({"id": f"j{i}", "images": [p], "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n"
                            for i, p in enumerate(paths)))
    report = store.with_suffix(".verify.json")
    cmd = [sys.executable, "-m", "splitvlm", "verify", "--model", args.model, "--store", str(store), "--jobs", str(jobs),
           "--max-model-len", str(args.max_model_len), "--max-tokens", str(args.max_tokens), "--on-missing", "error",
           "--no-progress", "--report", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    out = {"command": shlex.join(cmd), "rc": done.returncode, "jobs": len(paths)}
    if report.exists():
        figures = json.loads(report.read_text())
        out.update({k: figures.get(k) for k in ("ok", "identical", "total", "embeddings_identical", "embeddings_checked")})
        # the first mismatches and the engine as vLLM reported it: at 15e1d86 the report stayed on the device
        out["embedding_mismatches"] = figures.get("embedding_mismatches", [])[:5]
        out["engine"] = figures.get("engine")
    if done.returncode != 0:
        out["stderr"] = done.stderr.strip()[-1500:]
    return out


def compare_stores(a: Path, b: Path) -> dict:
    """Entry for entry, with the store's own checked reads: keys, tensor bytes, metadata fields that differ."""
    from splitvlm.store import EmbeddingStore

    with EmbeddingStore(a, readonly=True) as x, EmbeddingStore(b, readonly=True) as y:
        ka, kb = set(x.keys()), set(y.keys())
        tensors_differ, meta = [], set()
        for key in sorted(ka & kb):
            ea, eb = x.get(key), y.get(key)
            if not (_bytes(ea.image_embeds) == _bytes(eb.image_embeds) and _bytes(ea.image_grid_thw) == _bytes(eb.image_grid_thw)):
                tensors_differ.append(key)
            meta |= {f for f in set(ea.meta) | set(eb.meta) if ea.meta.get(f) != eb.meta.get(f)}
    equal = ka == kb and not tensors_differ and meta <= ALLOWED_META
    return {"equal": equal, "entries": len(ka), "only_single": len(ka - kb), "only_ray": len(kb - ka),
            "tensors_differ": tensors_differ[:10], "meta_fields_differ": sorted(meta)}


def _bytes(tensor) -> bytes:
    import torch

    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _ratio(run: dict, single: dict, field: str) -> float | None:
    return run[field] / single[field] if run.get(field) and single.get(field) else None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from splitvlm.core.identity import environment

    if args.dir:  # kept afterwards, to look into
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="bench_ray_")
    try:
        root = Path(tempfile.mkdtemp(prefix="bench_ray_", dir=args.dir) if args.dir else tmp.name)
        write_images(root / "images", 0, args.images, sizes_for(args.smoke), seed=args.seed)
        # vLLM's and Ray's bytecode first, as pip makes it at install: the GPU bundles are unpacked, and
        # otherwise each side's first process would compile what it imports (benchmarks.bytecode)
        bytecode = [compile_site(package) for package in ("vllm", "ray")]
        single = run_encode(args, root / "images", root / "single", [])
        extra = ["--workers", str(args.workers)] if args.workers else []
        extra += ["--address", args.address] if args.address else []
        runs = []  # one per --ray-batch value, each into its own store; the first is "ray"
        for batch in args.ray_batches:
            name = f"ray_b{batch}" if runs else "ray"
            run = run_encode(args, root / "images", root / name,
                             ["--ray", "--gpus", str(args.gpus), "--ray-batch", str(batch), *extra])
            run.update(ray_batch=batch, stores=compare_stores(root / "single", root / name),
                       ratio_after_start=_ratio(run, single, "images_per_s_after_start"))
            runs.append(run)
        on_ray, more = runs[0], runs[1:]
        stores = on_ray["stores"]
        verify = run_verify(args, root / "images", root / "ray") if args.verify_jobs else None
        if verify and verify["rc"] != 0:  # the store or this machine? the single store, verified the same way
            verify["single_store"] = run_verify(args, root / "images", root / "single")
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = {
        "benchmark": "bench_ray_encode", "date": now(), "commit": args.commit,
        "command": command("benchmarks.bench_ray_encode", argv), "environment": environment(),
        "model": args.model, "images": args.images, "smoke": args.smoke, "gpus": args.gpus, "bytecode": bytecode,
        "workers": on_ray["ray"]["workers"] if on_ray["ray"] else None,
        "single": single, "ray": on_ray, "stores": stores,
        "ratio": on_ray["images_per_s"] / single["images_per_s"] if single["images_per_s"] else None,
        "ratio_wall": on_ray["images_per_s_wall"] / single["images_per_s_wall"] if single["images_per_s_wall"] else None,
        "ratio_after_start": on_ray["ratio_after_start"],
        "verify": verify, "kept": str(root) if args.dir else None, "other_ray_batches": more,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"single {single['images_per_s']:.2f} images/s, --ray {on_ray['images_per_s']:.2f} images/s "
          f"({report['workers']} workers): ratio {report['ratio']:.2f}; stores "
          f"{'equal' if stores['equal'] else 'DIFFER'} ({stores['entries']} entries); wrote {path}")
    if verify:
        print(f"verify of the --ray store: exit {verify['rc']}, identical {verify.get('identical')}/{verify.get('total')}, "
              f"embeddings {verify.get('embeddings_identical')}/{verify.get('embeddings_checked')}")
        if "single_store" in verify:
            again = verify["single_store"]
            print(f"verify of the single store: exit {again['rc']}, identical {again.get('identical')}/"
                  f"{again.get('total')}, embeddings {again.get('embeddings_identical')}/{again.get('embeddings_checked')}")
    for run in more:
        print(f"--ray-batch {run['ray_batch']}: {run['images_per_s']:.2f} images/s, after start "
              f"{run['images_per_s_after_start'] or 0:.2f} (ratio {run['ratio_after_start'] or 0:.2f}); stores "
              f"{'equal' if run['stores']['equal'] else 'DIFFER'}")
    if not all(r["stores"]["equal"] for r in runs) or (verify and verify["rc"] != 0):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
