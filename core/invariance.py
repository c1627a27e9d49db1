"""Batch-invariant matmuls where vLLM's batch-invariant mode leaves them to cuBLAS (Hopper and newer)."""

from __future__ import annotations

import torch

_library = None


def enable_invariant_matmul() -> bool:
    """Route aten mm/addmm/matmul/linear on CUDA through vLLM's fixed-tile Triton kernels.

    vLLM does this itself only on SM80; on SM90 it relies on cuBLAS without split-K, which
    still lets a row's result depend on how many rows share the GEMM. Returns True when installed.
    """
    global _library
    if _library is not None:
        return True
    if not torch.cuda.is_available():
        return False
    from vllm.model_executor.layers import batch_invariant as bi

    if torch.cuda.get_device_capability()[0] == 8:
        return False  # vLLM installs the same kernels itself there
    _library = torch.library.Library("aten", "IMPL")
    for op, fn in (
        ("aten::mm", bi.mm_batch_invariant),
        ("aten::addmm", bi.addmm_batch_invariant),
        ("aten::matmul", bi.matmul_batch_invariant),
        ("aten::linear", bi.linear_batch_invariant),
    ):
        _library.impl(op, fn, "CUDA")
    return True
