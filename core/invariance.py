"""Batch-invariant matmuls where vLLM's batch-invariant mode leaves them to cuBLAS (Hopper and newer)."""

from __future__ import annotations

import importlib

import torch

_library = None
# where vLLM keeps its batch-invariant kernels: 0.26 and 0.32
_MODULES = ("vllm.model_executor.layers.batch_invariant", "vllm.model_executor.determinism.batch_invariant")
_OPS = (
    ("aten::mm", "mm_batch_invariant"),
    ("aten::addmm", "addmm_batch_invariant"),
    ("aten::mm.out", "mm_out_batch_invariant"),
    ("aten::addmm.out", "addmm_out_batch_invariant"),
    ("aten::matmul", "matmul_batch_invariant"),
    ("aten::linear", "linear_batch_invariant"),
)


def _kernels():
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {', '.join(_MODULES)} in this vLLM")


def enable_invariant_matmul() -> bool:
    """Route aten mm/addmm/matmul/linear on CUDA through vLLM's fixed-tile Triton kernels.

    vLLM does this itself only on SM80; on SM90 it relies on cuBLAS without split-K, which
    still lets a row's result depend on how many rows share the GEMM. Returns True when installed.
    """
    global _library
    if _library is not None:
        return True
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] == 8:
        return False  # no GPU, or SM80 where vLLM installs the same kernels itself
    kernels = _kernels()
    _library = torch.library.Library("aten", "IMPL")
    for op, fn in _OPS:
        if hasattr(kernels, fn):  # the .out variants exist from vLLM 0.32 on
            _library.impl(op, getattr(kernels, fn), "CUDA")
    return True
