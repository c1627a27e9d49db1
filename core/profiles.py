"""Engine profiles: the settings under which split == end-to-end holds ("exact"), or vLLM's defaults ("fast")."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from splitvlm.core.errors import SplitVLMError

# The exact profile's oneDNN ISA on the CPU. Whether oneDNN may use AMX is decided per process: the kernel
# grants AMX tile state only if no live thread has a sigaltstack too small for AMX's larger signal frame
# when oneDNN first asks, and oneDNN silently falls back to AVX-512 BF16 when refused. The two paths
# round differently (seen: one image of the Ray test corpus, 1 run in ~6), so the exact profile caps every
# process at AVX-512 BF16: the same bytes with or without AMX. oneDNN (torch's copy and vLLM's) reads the
# cap once, at its first primitive in the process: set it before any bf16/f32 matmul runs, not before import.
EXACT_CPU_ISA = ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")


def exact_cpu_isa() -> dict[str, str]:
    """The exact profile's oneDNN cap on this CPU: EXACT_CPU_ISA on x86 (its value is an x86 ISA name), else none."""
    return dict([EXACT_CPU_ISA]) if platform.machine().lower() in ("x86_64", "amd64") else {}


# What the exact tower's attention runs on (Profile.tower_attention). Entries made before the field existed
# ran SDPA on every device (LEGACY_TOWER_KERNELS).
TOWER_SDPA = "sdpa-per-image"
TOWER_FA_SINGLE_SPLIT = "flash-attn-varlen-splits1"
LEGACY_TOWER_KERNELS = TOWER_SDPA


@dataclass(frozen=True)
class Profile:
    name: str
    exact: bool
    vision: str  # "per_image": the tower sees one image per call; "batched": vLLM's batching
    prefix_caching: bool
    description: str

    def engine_kwargs(self, gpu: bool, settings: ProcessSettings | None = None) -> dict:
        """vLLM engine arguments under this profile; settings: the process's (process_settings; by
        default the profile's own on this device)."""
        settings = settings or self.settings(gpu)
        if not self.exact:
            return {"enable_prefix_caching": self.prefix_caching}
        kwargs: dict = {
            "enable_prefix_caching": False,
            "mm_processor_cache_gb": 0,
            "mm_encoder_attn_backend": "FLASH_ATTN" if gpu else "TORCH_SDPA",
        }
        if gpu:
            kwargs["attention_config"] = {"backend": "TRITON_ATTN"}
            # vLLM picks its custom ops (quick_gelu, apply_rotary_emb, conv3d, mm_encoder_attn, ...)
            # by compilation mode: native torch under torch.compile, CUDA kernels when eager. The
            # tower is never compiled, so an eager encoder and a compiled decoder would compute it
            # with different ops and different bits (seen on the H200: 0/264 embeddings equal).
            # Pinning the choice makes the tower's bytes independent of eager vs compiled. The one op
            # kept on is the tower's attention: disabled, it falls back to per-image SDPA whatever
            # mm_encoder_attn_backend says; on, it is FlashAttention varlen, one call for all of a
            # batch's images, with the plugin fixing num_splits at 1 (core.invariance).
            custom_ops = ["none", "+mm_encoder_attn"]
            if settings.quick_gelu:  # vLLM's CUDA QuickGELU in Qwen2-VL's tower (EXACT_GPU_LEVERS)
                custom_ops.append("+quick_gelu")
            kwargs["compilation_config"] = {"custom_ops": custom_ops}
            # vLLM 0.26 picks RMSNorm's kernel apart from custom_ops, by "IR op priority": vLLM's CUDA
            # kernel when eager, native torch (batch-invariant mean under VLLM_BATCH_INVARIANT) when
            # compiled. Qwen2.5-VL's tower uses RMSNorm, so the eager encoder and the compiled decoder
            # gave other bits (seen on the H200: 0/264 embeddings equal, verify 174/1,057).
            kwargs["ir_op_priority"] = {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}
        return kwargs

    def settings(self, gpu: bool = False) -> ProcessSettings:
        """The settings vLLM's processes run under: on a GPU, exact turns on EXACT_GPU_LEVERS."""
        levers = dict.fromkeys(EXACT_GPU_LEVERS, True) if gpu and self.exact else {}
        return ProcessSettings(self.name, self.vision, self.exact, **levers)

    def tower_attention(self, gpu: bool) -> str:
        """The kernels behind the tower's attention under this profile: the first part of what each
        stored entry records as its tower_kernels (the module's tower_kernels adds the levers)."""
        if not self.exact:
            return "vllm-default"
        return TOWER_FA_SINGLE_SPLIT if gpu else TOWER_SDPA

    def env(self, gpu: bool) -> dict[str, str]:
        """What vLLM's processes need in their environment: splitvlm's one variable, read by the
        plugin (core.plugin) in every vLLM process, vLLM's own batch-invariant switches on a GPU and
        oneDNN's ISA cap on the CPU (EXACT_CPU_ISA)."""
        env = {"SPLITVLM_PROFILE": self.settings(gpu).value()}
        if self.exact and not gpu:
            env.update(exact_cpu_isa())
        if self.exact and gpu:
            env.update({
                "VLLM_BATCH_INVARIANT": "1",
                "CUBLAS_WORKSPACE_CONFIG": ":16:8",
                "CUBLASLT_WORKSPACE_SIZE": "1",
            })
        return env


# The exact profile's kernel levers on a GPU (docs/exactness.md): each changes the tower's bits, so
# entries made under one record it in tower_kernels. EXACT_GPU_LEVERS are on by default on a GPU since
# the GPU check passed every exactness check under them (fb75764, H200; the tower went from 0.67 to
# 0.82 of vLLM's default on the 512-image mix); small_m (no gain measured) and large_m (the tile
# check passed, not yet run inside the engines) are experiments. A SPLITVLM_PROFILE value names the
# levers it turns on: "exact" alone runs none of them (the exact GPU tower before 2026-12-01).
LEVERS = ("fused_bias", "small_m", "quick_gelu", "large_m")
EXACT_GPU_LEVERS = ("fused_bias", "quick_gelu")


@dataclass(frozen=True)
class ProcessSettings:
    """A profile's settings as vLLM's processes read them: the value of SPLITVLM_PROFILE,
    "NAME" or "NAME;vision=per_image;invariant_matmul=0;fused_bias=1;small_m=1;quick_gelu=1;large_m=1".
    The value names every lever that is on (Profile.settings(gpu) turns some on by default on a GPU)."""

    profile: str = ""
    vision: str = "batched"  # "per_image": the tower sees one image per call
    invariant_matmul: bool = False  # batch-invariant Triton matmuls (GPU only)
    fused_bias: bool = False  # vLLM's batch-invariant linear adds its bias inside the GEMM (GPU only)
    small_m: bool = False  # experiment: smaller GEMM tiles for few rows (core.invariant_linear; GPU only)
    quick_gelu: bool = False  # vLLM's CUDA QuickGELU (Qwen2-VL's tower), not native torch (GPU only)
    large_m: bool = False  # experiment: a wider GEMM tile for many rows (the tower; core.invariant_linear; GPU only)

    def value(self) -> str:
        value = f"{self.profile};vision={self.vision};invariant_matmul={int(self.invariant_matmul)}"
        for name in LEVERS:  # off, the value (and cache keys) as before the levers
            value += f";{name}=1" if getattr(self, name) else ""
        return value


def settings_from(value: str | None) -> ProcessSettings:
    """Parse SPLITVLM_PROFILE; unset gives no profile (plain vLLM behaviour)."""
    if not value:
        return ProcessSettings()
    name, *overrides = [part.strip() for part in value.split(";")]
    base = get_profile(name).settings()
    fields = {"vision": base.vision, "invariant_matmul": base.invariant_matmul,
              **{name: getattr(base, name) for name in LEVERS}}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise SplitVLMError(f"SPLITVLM_PROFILE={value!r}: unknown setting {item!r} "
                                "(use NAME;vision=batched|per_image;invariant_matmul=0|1;"
                                + ";".join(f"{name}=0|1" for name in LEVERS) + ")")
        fields[key] = raw if key == "vision" else raw == "1"
    if fields["vision"] not in ("batched", "per_image"):
        raise SplitVLMError(f"SPLITVLM_PROFILE={value!r}: vision must be batched or per_image")
    return ProcessSettings(name, **fields)


def _given_for(profile: Profile) -> str | None:
    """SPLITVLM_PROFILE as set in this process when it names this profile (an experiment's levers,
    which win over the profile's own), else None."""
    given = os.environ.get("SPLITVLM_PROFILE")
    return given if given and settings_from(given).profile == profile.name else None


def process_settings(profile: Profile, gpu: bool) -> ProcessSettings:
    """The settings this process's vLLM runs under for a profile: SPLITVLM_PROFILE's when it names
    the same profile, else the profile's own on this device."""
    given = _given_for(profile)
    return settings_from(given) if given else profile.settings(gpu)


def process_env(profile: Profile, gpu: bool) -> dict[str, str]:
    """The environment a profile gives vLLM in this process: Profile.env, with SPLITVLM_PROFILE as
    given where it names the same profile."""
    env = profile.env(gpu)
    given = _given_for(profile)
    if given:
        env["SPLITVLM_PROFILE"] = given
    return env


def tower_kernels(profile_name: str, gpu: bool) -> str:
    """What stored entries record as their tower's kernels in this process: Profile.tower_attention, and
    on a GPU the levers it runs under (LEVERS; by default EXACT_GPU_LEVERS), each of which changes the
    tower's bits: "flash-attn-varlen-splits1+fused_bias+quick_gelu" for the exact GPU default."""
    profile = get_profile(profile_name)
    settings = process_settings(profile, gpu)
    levers = [name for name in LEVERS if getattr(settings, name)] if gpu and profile.exact else []
    return "+".join([profile.tower_attention(gpu), *levers])


def vision_mode() -> str:
    """How the tower batches images in this process (the model reads it at each call)."""
    return settings_from(os.environ.get("SPLITVLM_PROFILE")).vision


PROFILES = {
    "exact": Profile(
        name="exact",
        exact=True,
        vision="batched",
        prefix_caching=False,
        description="prefix caching off, no processor cache, per-image SDPA vision attention on the CPU; "
        "on a GPU FlashAttention varlen vision attention with num_splits=1, Triton attention, "
        "VLLM_BATCH_INVARIANT=1, batch-invariant Triton matmuls with the bias inside the GEMM "
        "and vLLM's CUDA QuickGELU",
    ),
    "fast": Profile(
        name="fast",
        exact=False,
        vision="batched",
        prefix_caching=True,
        description="vLLM's defaults; split and end-to-end outputs may differ",
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise SplitVLMError(
            f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}"
        ) from None
