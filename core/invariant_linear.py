"""Levers on vLLM's batch-invariant linear layer: the bias inside the GEMM, and tile shapes chosen by M.

Under VLLM_BATCH_INVARIANT=1, vLLM 0.26 runs every unquantized linear layer through
`linear_batch_invariant`: its Triton persistent GEMM with one fixed tile (128×128×64 for bf16),
then the bias in a separate bf16 add. On the H200 at 069763f that was 1.79 of the 2.13 ms per
image the exact tower spends over vLLM's default tower (docs/exactness.md). The levers
(SPLITVLM_PROFILE "...;fused_bias=1;small_m=1;large_m=1"):

- fused_bias (the exact profile's default on a GPU since the GPU check passed under it at
  fb75764): the bias added to the fp32 accumulator inside the GEMM (other bits than the unfused
  add, and as independent of the batch: a row is still its own row of the GEMM);
- small_m (experiment; no gain at batch 8, fb75764): for M <= SMALL_M rows, tiles of SMALL_M_CONFIG;
- large_m (experiment: the tile check passed at 81aca7b, not yet run inside the engines): for
  M >= LARGE_M rows (the tower's batches), tiles of LARGE_M_CONFIG.
A row's bits stay the same under another tile only if it does not change how each output element
is reduced over K (the same K order and MMA instruction); `benchmarks/gemm_configs.py` checks that
bit for bit on the GPU (every tile tried at fb75764 kept vLLM's bits).
"""

from __future__ import annotations

from typing import Any

import torch

from splitvlm.core.invariance import _kernels, wrap_once

_LINEAR_MODULE = "vllm.model_executor.layers.linear"  # UnquantizedLinearMethod.apply calls linear_batch_invariant
SMALL_M = 64
SMALL_M_CONFIG = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                  "num_stages": 4, "num_warps": 4}
# large_m: a wider tile for the tower's GEMMs (thousands of patch rows per call). Every tile tried gives
# each row vLLM's bits (the K loop feeds the same MMA accumulation whatever the tile); this one was
# 1.21x / 1.33x faster than vLLM's at 4,096 / 16,384 rows (benchmarks/results/gemm_configs_h200_81aca7b.json).
LARGE_M = 1024
LARGE_M_CONFIG = {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                  "num_stages": 3, "num_warps": 8}


def tile_for(rows: int, small_m: bool = False, large_m: bool = False) -> dict | None:
    """The tile config the levers give a GEMM of this many rows; None: vLLM's own fixed tile."""
    if small_m and rows <= SMALL_M:
        return SMALL_M_CONFIG
    if large_m and rows >= LARGE_M:
        return LARGE_M_CONFIG
    return None


def _compute_units(device: int) -> int:
    """The SM count, as vLLM's own matmul_persistent reads it (a cached call, fine inside torch.compile)."""
    try:
        from vllm.utils.platform_utils import num_compute_units
    except ImportError:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return num_compute_units(device)


def persistent_gemm(kernels: Any, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                    config: dict | None = None) -> torch.Tensor:
    """a @ b (+ bias, inside the GEMM) by vLLM's matmul_kernel_persistent with the given tile config;
    config None: vLLM's own matmul_persistent (its fixed config)."""
    if config is None:
        return kernels.matmul_persistent(a, b, bias=bias)
    kernel = kernels.matmul_kernel_persistent
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    sms = _compute_units(a.device.index or 0)
    meta = {**config, "NUM_SMS": sms, "A_LARGE": a.numel() > 2**31, "B_LARGE": b.numel() > 2**31,
            "C_LARGE": c.numel() > 2**31, "HAS_BIAS": bias is not None}
    args = [a, b, c, bias, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1)]
    if "stride_bias" in getattr(kernel, "arg_names", ()):  # vLLM 0.32 has it, 0.26 not
        args.append(bias.stride(0) if bias is not None else 0)
    tiles = -(-m // config["BLOCK_SIZE_M"]) * -(-n // config["BLOCK_SIZE_N"])
    kernel[(min(sms, tiles),)](*args, **meta)
    return c


def invariant_linear(module=None, kernels=None, fused_bias: bool = False, small_m: bool = False,
                     large_m: bool = False) -> bool:
    """Put a linear_batch_invariant with the levers asked for in place of vLLM's (in module,
    vllm.model_executor.layers.linear unless given); kernels: vLLM's batch-invariant module. True
    when in place (now or before); False when nothing was asked for, or vLLM has no such layer or
    kernels. Entries encoded under a lever record it (core.profiles.tower_kernels)."""
    if not (fused_bias or small_m or large_m):
        return False
    try:
        gemm_kernels = kernels or _kernels()  # resolved here: no import inside a compiled model's call
    except ImportError:
        return False

    def make(original):
        def linear_batch_invariant(input, weight, bias=None):
            if input.dim() < 2:
                return original(input, weight, bias)
            rows = input.reshape(-1, input.shape[-1])
            config = tile_for(rows.shape[0], small_m, large_m)
            inside = bias if fused_bias else None
            if config is None and inside is None:
                return original(input, weight, bias)  # vLLM's own: its tile, its bias add
            out = persistent_gemm(gemm_kernels, rows, weight.t(), inside, config)
            out = out.reshape(*input.shape[:-1], weight.shape[0])
            return out + bias if bias is not None and inside is None else out  # vLLM's separate add, as it does it

        return linear_batch_invariant

    levers = {"fused_bias": fused_bias, "small_m": small_m, "large_m": large_m}
    return wrap_once(module, _LINEAR_MODULE, "linear_batch_invariant", make, levers)
