"""Batch invariance vLLM leaves out: Triton matmuls where it uses cuBLAS (Hopper and newer), one split for the tower's FlashAttention."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

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


_FA_MODULE = "vllm.v1.attention.backends.fa_utils"  # where vLLM's ViT wrapper looks up flash_attn_varlen_func per call


def wrap_once(module: Any, module_name: str, attr: str, make: Callable, tag: Any = True) -> bool:
    """Put make(original) in place of module.attr (module_name imported when module is None), once,
    marked splitvlm_wrap=tag. True when in place, now or before; False when the module or attr is missing."""
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return False
    original = getattr(module, attr, None)
    if original is None:
        return False
    if getattr(original, "splitvlm_wrap", None) is not None:
        return True
    wrapper = make(original)
    wrapper.splitvlm_wrap = tag
    wrapper.__wrapped__ = original
    setattr(module, attr, wrapper)
    return True


def single_split_flash_attention(module=None) -> bool:
    """Make FlashAttention varlen calls that go through vLLM's fa_utils use num_splits=1.

    vLLM's ViT wrapper (vit_attn_wrappers.flash_attn_maxseqlen_wrapper, 0.26 and 0.32) imports
    flash_attn_varlen_func from fa_utils at each call and passes no num_splits, so FA3 picks the
    split count from the call's size: an image alone could be reduced in another order than in a
    batch. One split makes each image's attention independent of the others in its call (what
    VLLM_BATCH_INVARIANT does for the language model's FlashAttention). module: fa_utils (tests
    pass their own). Returns True when installed (now or before); False without FlashAttention."""

    def make(original):
        def flash_attn_varlen_func(*args, **kwargs):
            kwargs["num_splits"] = 1
            return original(*args, **kwargs)

        return flash_attn_varlen_func

    return wrap_once(module, _FA_MODULE, "flash_attn_varlen_func", make)
