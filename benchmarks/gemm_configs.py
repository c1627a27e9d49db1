"""Tile configs for vLLM's batch-invariant Triton GEMM: are a row's bits the same under each, and how fast is each.

    python -m benchmarks.gemm_configs [--commit SHA] [--out benchmarks/results/gemm_configs.json]

GPU only. For each linear layer shape of the 2B Qwen2-VL (language model and tower), a 4,096-row
input is multiplied by vLLM's own `matmul_persistent` (its fixed 128×128×64 tile): the reference.
Then the first M rows (M = 1 ... 4,096) go through `matmul_kernel_persistent` under each candidate
tile config (core.invariant_linear.persistent_gemm), with and without the bias inside, and every
output row is compared bit for bit with the same row of the reference. A config whose rows always
match can be chosen by M without changing any answer (core.invariant_linear's small_m and
large_m); the report gives each config's verdict and its time per call against vLLM's tile at
M = 8 and 64 (a decode step) and 4,096 and 16,384 (the tower's batches).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from benchmarks.common import RESULTS, command, now, write_report
from splitvlm.core.invariant_linear import LARGE_M_CONFIG, SMALL_M_CONFIG, persistent_gemm

# (name, K, N) of the 2B model's linear layers: language model (hidden 1536, MLP 8960, 2 KV heads of
# 128) and tower (1280 wide, MLP 5120)
SHAPES = (("lm.qkv", 1536, 2048), ("lm.o_proj", 1536, 1536), ("lm.gate_up", 1536, 17920),
          ("lm.down", 8960, 1536), ("tower.qkv", 1280, 3840), ("tower.proj", 1280, 1280),
          ("tower.fc1", 1280, 5120), ("tower.fc2", 5120, 1280))
ROWS = (1, 8, 32, 64, 256, 1024, 4096)
TIMED_ROWS = (8, 64, 4096, 16384)


def tile(m: int, n: int, k: int, stages: int, warps: int) -> dict:
    return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": 8,
            "num_stages": stages, "num_warps": warps}


CANDIDATES = {
    "vllm_128x128x64": tile(128, 128, 64, 3, 8),  # vLLM's own, launched by splitvlm: must match itself
    "small_m": SMALL_M_CONFIG,
    "64x32x64": tile(64, 32, 64, 4, 4),
    "64x128x64": tile(64, 128, 64, 4, 4),
    "128x64x64": tile(128, 64, 64, 3, 8),
    "64x64x128": tile(64, 64, 128, 3, 4),  # another BLOCK_SIZE_K: kept vLLM's bits too at fb75764
    "large_m": LARGE_M_CONFIG,
    "256x128x64": tile(256, 128, 64, 3, 8),
    "128x256x64_s4": tile(128, 256, 64, 4, 8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50, help="Timed calls per shape, rows and config.")
    ap.add_argument("--commit", default="", help="The commit measured (a device copy has no .git).")
    ap.add_argument("--out", default=str(RESULTS / "gemm_configs.json"))
    return ap.parse_args(argv)


def timed_us(fn, iters: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_configs needs a CUDA device (vLLM's Triton GEMM)", file=sys.stderr)
        raise SystemExit(2)
    from splitvlm.core.identity import environment
    from splitvlm.core.invariance import _kernels

    kernels, gen = _kernels(), torch.Generator(device="cuda").manual_seed(0)
    verdicts = {name: {"rows_identical": True, "mismatches": []} for name in CANDIDATES}
    times: dict[str, dict] = {}
    for shape, k, n in SHAPES:
        a = torch.randn(max(ROWS[-1], *TIMED_ROWS), k, device="cuda", dtype=torch.bfloat16, generator=gen)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen).t()  # a weight, transposed as vLLM does
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref, ref_bias = persistent_gemm(kernels, a[:ROWS[-1]], b), persistent_gemm(kernels, a[:ROWS[-1]], b, bias)
        for name, config in CANDIDATES.items():
            for m in ROWS:
                for with_bias, want in ((False, ref), (True, ref_bias)):
                    got = persistent_gemm(kernels, a[:m], b, bias if with_bias else None, config)
                    if not torch.equal(got, want[:m]):
                        verdicts[name]["rows_identical"] = False
                        verdicts[name]["mismatches"].append(f"{shape} M={m}{' +bias' if with_bias else ''}")
        for m in TIMED_ROWS:
            row = times.setdefault(f"{shape} M={m}", {})
            row["vllm_us"] = round(timed_us(partial(persistent_gemm, kernels, a[:m], b), args.iters), 2)
            for name, config in CANDIDATES.items():
                call = partial(persistent_gemm, kernels, a[:m], b, None, config)
                row[name + "_us"] = round(timed_us(call, args.iters), 2)
    totals = {m: {name: sum(t[name + "_us"] for key, t in times.items() if key.endswith(f"M={m}"))
                  for name in ["vllm", *CANDIDATES]} for m in TIMED_ROWS}
    report = {"benchmark": "gemm_configs", "date": now(), "commit": args.commit,
              "command": command("benchmarks.gemm_configs", argv), "environment": environment(),
              "configs": CANDIDATES, "verdicts": verdicts, "times_us": times,
              "all_shapes_us": {str(m): {k: round(v, 2) for k, v in t.items()} for m, t in totals.items()}}
    path = write_report(report, args.out)
    for name, verdict in verdicts.items():
        speed = ", ".join(f"M={m} {totals[m]['vllm'] / totals[m][name]:.2f}x" for m in TIMED_ROWS)
        print(f"{name}: rows identical {verdict['rows_identical']} ({len(verdict['mismatches'])} mismatches); "
              f"speed against vLLM's tile {speed}")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
