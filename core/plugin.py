"""splitvlm's vLLM general plugin: what every vLLM process needs, engine core and workers included.

vLLM calls `register()` in each process it starts (entry point group `vllm.general_plugins`,
declared in pyproject.toml), before it builds a model. It reads one documented variable,
`SPLITVLM_PROFILE`, which Engine sets from the profile it runs (see `Profile.setting`):

- splitvlm's model classes are registered with vLLM's ModelRegistry, by class (a class named
  by "module:Class" is inspected in a subprocess, ~20 s per start on the H200);
- under a profile with invariant matmuls, on a GPU, aten mm/addmm/matmul/linear are routed
  through vLLM's batch-invariant Triton kernels (core.invariance);
- under the exact profile, on a GPU, the tower's FlashAttention varlen calls run with one split
  (core.invariance.single_split_flash_attention);
- with fused_bias=1 (the exact profile's default on a GPU) / small_m=1 / large_m=1 (experiments),
  on a GPU, vLLM's batch-invariant linear layer adds its bias inside the GEMM / uses smaller tiles
  for few rows / wider tiles for many (core.invariant_linear). quick_gelu=1 is an engine argument
  (Profile.engine_kwargs).

Without the variable the plugin registers the model classes only, so a plain `vllm serve` of a
splitvlm architecture works and nothing else in vLLM changes.
"""

from __future__ import annotations

import os

VARIABLE = "SPLITVLM_PROFILE"
_done: set[str] = set()


def split_architectures() -> dict[str, type]:
    """splitvlm's architecture names and the model classes vLLM builds for them, every family."""
    from splitvlm.core.families import FAMILIES

    return {family.split_arch: family.model_class() for family in FAMILIES}


def register_models() -> None:
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch, cls in split_architectures().items():
        if arch not in known:
            ModelRegistry.register_model(arch, cls)


def register(kernels: bool = True) -> None:
    """The plugin's entry point; safe to call more than once in a process. kernels=False: the
    model classes only (a process that never runs the model, such as a frontend)."""
    from splitvlm.core.profiles import settings_from

    if "models" not in _done:
        register_models()
        _done.add("models")
    settings = settings_from(os.environ.get(VARIABLE))
    if not kernels:
        return
    import torch

    gpu = torch.cuda.is_available()
    if settings.profile == "exact" and "isa" not in _done:
        from splitvlm.core.profiles import exact_cpu_isa

        cap = {} if gpu else exact_cpu_isa()
        for name, value in cap.items():  # before vLLM builds the model: oneDNN has not run here yet
            os.environ.setdefault(name, value)
        # Capped, oneDNN no longer asks Linux for AMX tile state, but vLLM's CPU attention runs AMX
        # tiles itself when the CPU has them (SIGILL without the permission): ask for it here.
        if cap and torch.cpu._is_amx_tile_supported():
            torch.cpu._init_amx()
        _done.add("isa")
    if settings.invariant_matmul and "matmul" not in _done:
        from splitvlm.core.invariance import enable_invariant_matmul

        if enable_invariant_matmul():
            _done.add("matmul")
    if gpu and settings.profile == "exact" and "vision_splits" not in _done:
        from splitvlm.core.invariance import single_split_flash_attention

        if single_split_flash_attention():
            _done.add("vision_splits")
    linear = {name: getattr(settings, name) for name in ("fused_bias", "small_m", "large_m")}
    if gpu and any(linear.values()) and "linear" not in _done:
        from splitvlm.core.invariant_linear import invariant_linear

        if invariant_linear(**linear):
            _done.add("linear")
