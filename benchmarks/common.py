"""Helpers shared by bench_encode and bench_decode: images, FLOPs, the matmul peak, reports."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from splitvlm.core.profiles import get_profile  # no vLLM: the profiles are plain settings

# splitvlm's heavier parts are imported inside the functions that need them: the peak's child process
# needs torch alone.
RESULTS = Path(__file__).parent / "results"
SMOKE_SIZES = [(64, 64), (96, 128), (128, 96), (112, 112)]  # small enough for a 2-core CPU


def sizes_for(smoke: bool) -> list[tuple[int, int]]:
    """The image sizes (width, height) of a run: 224-800 px, or a few tiny ones for --smoke."""
    from splitvlm.tools.samples import SIZES

    return list(SMOKE_SIZES if smoke else SIZES)


def size_label(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def write_images(folder: Path, first: int, n: int, sizes: Sequence[tuple[int, int]],
                 seed: int = 7, threads: int = 8) -> list[str]:
    """PNG files of synthetic images first..first+n-1, size cycling through sizes; their paths."""
    from splitvlm.tools.samples import synthetic_image

    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> str:
        path = folder / f"img{i:06d}.png"
        synthetic_image(i, tuple(sizes[i % len(sizes)]), seed).save(path, compress_level=1)
        return str(path)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(write, range(first, first + n)))


@dataclass(frozen=True)
class VisionShape:
    """What the vision tower's FLOPs depend on, read from the model's config.json."""

    depth: int
    embed_dim: int
    mlp_ratio: float
    merge: int
    out_hidden: int
    patch: int
    temporal_patch: int
    channels: int

    @classmethod
    def from_model(cls, model: str) -> VisionShape:
        from splitvlm.core.errors import SplitVLMError
        from splitvlm.core.identity import resolve_model_dir

        root = resolve_model_dir(model)
        if root is None or not (root / "config.json").is_file():
            raise SplitVLMError(f"{model}: no local config.json to read the vision tower's shape from")
        vc = json.loads((root / "config.json").read_text())["vision_config"]
        # Qwen2-VL names the tower's width embed_dim and its output hidden_size; Qwen2.5-VL and
        # Qwen3-VL name them hidden_size and out_hidden_size, with an intermediate_size for the MLP.
        embed = int(vc.get("embed_dim") or vc["hidden_size"])
        return cls(
            depth=int(vc["depth"]),
            embed_dim=embed,
            mlp_ratio=float(vc.get("mlp_ratio") or vc.get("intermediate_size", 4 * embed) / embed),
            merge=int(vc.get("spatial_merge_size", 2)),
            out_hidden=int(vc.get("out_hidden_size") or vc["hidden_size"]),
            patch=int(vc.get("patch_size", 14)),
            temporal_patch=int(vc.get("temporal_patch_size", 2)),
            channels=int(vc.get("in_channels", vc.get("in_chans", 3))),
        )

    def flops(self, grid_thw: Sequence[int]) -> float:
        """Estimated FLOPs of one image (t, h, w in patches), attention full within each frame."""
        t, h, w = (int(v) for v in grid_thw)
        p, d, m2 = t * h * w, self.embed_dim, self.merge**2
        block = 2 * p * (4 * d * d + 2 * self.mlp_ratio * d * d) + t * 4 * (h * w) ** 2 * d
        embed = 2 * p * (self.channels * self.temporal_patch * self.patch**2) * d
        merger = 2 * (p / m2) * ((m2 * d) ** 2 + (m2 * d) * self.out_hidden)
        return self.depth * block + embed + merger


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_tflops(n: int, repeats: int = 3, min_seconds: float = 0.3) -> dict:
    """The best bf16 n x n x n matmul rate of this device, in TFLOP/s (best of repeats)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = a @ b  # warm-up, and the iteration count for about min_seconds a repeat
    sync()
    t0 = time.perf_counter()
    c = a @ b
    sync()
    iters = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        sync()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12)
    del a, b, c
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tflops": best, "n": n, "dtype": "bfloat16", "iterations": iters, "repeats": repeats}


PEAK_ENV_DROPPED = ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE", "VLLM_BATCH_INVARIANT")


def measure_peak(n: int) -> dict:
    """The bf16 matmul peak; on a GPU in a child process with plain cuBLAS settings.

    The exact profile routes aten::mm through Triton kernels and pins cuBLAS workspaces for
    the whole process, so the peak is measured where neither applies.
    """
    if not torch.cuda.is_available():
        return {**matmul_peak_tflops(n), "where": "this process"}
    env = {k: v for k, v in os.environ.items() if k not in PEAK_ENV_DROPPED}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.common import matmul_peak_tflops; "
            "print(json.dumps(matmul_peak_tflops(int(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1]), str(n)],
                         env=env, capture_output=True, text=True)
    if out.returncode == 0:
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "where": "a child process, plain cuBLAS"}
    print(f"peak in a child process failed, measuring here instead:\n{out.stderr[-2000:]}", file=sys.stderr)
    return {**matmul_peak_tflops(n), "where": "this process (the child failed)"}


def encode_batches(engine, prepared: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   batch_patches: int) -> tuple[list[torch.Tensor], float]:
    """vLLM's vision tower on preprocessed images, batched by patches as the Encoder does; (embeds, seconds)."""
    from splitvlm.core.batching import by_budget

    out: list[torch.Tensor] = []
    sync()
    t0 = time.perf_counter()
    for batch in by_budget(prepared, lambda item: int(item[1].prod()), batch_patches):
        out.extend(engine.run_tower(torch.cat([p for p, _ in batch]), torch.cat([g.reshape(1, 3) for _, g in batch])))
    sync()
    return out, time.perf_counter() - t0


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command(module: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, *args])


def report_header(name: str, engine, args) -> dict:
    """What every benchmark report starts with: which run, where, under which versions and profile."""
    env = engine.environment()
    return {
        "benchmark": name,
        "date": now(),
        "smoke": args.smoke,
        "profile": engine.profile.name,
        "splitvlm_profile": os.environ.get("SPLITVLM_PROFILE", ""),
        "device": env["device"],
        "vllm": env["vllm"],
        "torch": env["torch"],
        "environment": env,
        "model": engine.cfg.model,
        "engine": engine.reported(),  # the settings as vLLM resolved them (attention backends, compilation)
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }


def start_engine(cfg) -> tuple[object, float]:
    """A new Engine for cfg and the seconds it took to start."""
    from splitvlm.core.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(cfg)
    return engine, time.perf_counter() - t0


def publish(report: dict, module: str, argv: Sequence[str] | None, out: str, start_s: float | None,
            summary) -> dict:
    """Stamp the command and engine start on a report, write it, print its summary."""
    report["command"] = command(module, argv)
    report["engine_start_s"] = start_s
    path = write_report(report, out)
    print(summary(report))
    print(f"wrote {path}")
    return report


def run_side(name: str, cmd: list[str], out: Path, sides: dict, failed: dict) -> bool:
    """One side of a comparison in its own process: its report (written to out) into sides[name], or why
    it failed into failed[name]; whether it ran."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        failed[name] = f"exit {done.returncode}: {done.stderr[-1500:]}"
        print(f"{name} side failed ({done.returncode})", flush=True)
        return False
    sides[name] = json.loads(Path(out).read_text())
    print(f"{name} side done", flush=True)
    return True


def write_report(report: dict, out: str) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def goal(value: float, target: float, at_least: bool = True) -> dict:
    """A goal as it came out in this run: the measured value, the target and whether it was met."""
    met = value >= target if at_least else value < target
    return {"value": round(value, 4), "target": f"{'>=' if at_least else '<'} {target}", "met": met}


def exact_value(**changes) -> str:
    """SPLITVLM_PROFILE for the exact profile on a GPU (its default levers on) with some settings changed."""
    return replace(get_profile("exact").settings(gpu=True), **changes).value()


# The exact profile with one lever changed (docs/exactness.md says what each buys), or fast; shared by
# bench_vs_vllm (decode) and bench_encode --vs-default (the tower). profile_value: SPLITVLM_PROFILE, the
# plugin's one variable; vllm_args: engine arguments over the profile's own.
VARIANTS: dict[str, dict] = {
    "exact": {},
    "exact_cublas": {"profile_value": exact_value(invariant_matmul=False)},  # no aten matmul overrides
    "exact_fa3": {"vllm_args": {"attention_config": {"backend": "FLASH_ATTN"}}},  # LM attention FA3 (num_splits=1)
    # the tower's attention as before 2026-12: per-image SDPA (on the GPU the exact profile runs FA varlen, one split)
    "exact_vision_sdpa": {"vllm_args": {"mm_encoder_attn_backend": "TORCH_SDPA"}},
    "exact_vision_per_image": {"profile_value": exact_value(vision="per_image")},  # the tower one image per call
    # the tower levers on by default on a GPU since fb75764 (core.profiles.EXACT_GPU_LEVERS), off
    "exact_no_levers": {"profile_value": exact_value(fused_bias=False, quick_gelu=False)},  # the exact tower before
    "exact_no_fused_bias": {"profile_value": exact_value(fused_bias=False)},  # the bias in a separate bf16 add
    "exact_no_quick_gelu": {"profile_value": exact_value(quick_gelu=False)},  # native torch QuickGELU
    "exact_small_m": {"profile_value": exact_value(small_m=True)},  # smaller GEMM tiles for few rows (experiment)
    "exact_large_m": {"profile_value": exact_value(large_m=True)},  # a wider GEMM tile for the tower (experiment)
    "fast": {"profile": "fast"},  # vLLM's defaults behind splitvlm's Engine
}


def variant_setup(name: str) -> dict:
    """Config fields for a variant (profile, vllm_args); sets SPLITVLM_PROFILE in this process when it changes a lever."""
    variant = VARIANTS[name]
    if "profile_value" in variant:
        os.environ["SPLITVLM_PROFILE"] = variant["profile_value"]
    return {"profile": variant.get("profile", "exact"), "vllm_args": dict(variant.get("vllm_args", {}))}

