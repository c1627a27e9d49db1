"""Engine profiles: the settings under which split == end-to-end holds ("exact"), or vLLM's defaults ("fast")."""

from __future__ import annotations

from dataclasses import dataclass

from splitvlm.core.errors import SplitVLMError


@dataclass(frozen=True)
class Profile:
    name: str
    exact: bool
    vision: str  # "per_image": the tower sees one image per call; "batched": vLLM's batching
    prefix_caching: bool
    description: str

    def engine_kwargs(self, gpu: bool) -> dict:
        if not self.exact:
            return {"enable_prefix_caching": self.prefix_caching}
        kwargs: dict = {
            "enable_prefix_caching": False,
            "mm_processor_cache_gb": 0,
            "mm_encoder_attn_backend": "TORCH_SDPA",
        }
        if gpu:
            kwargs["attention_config"] = {"backend": "TRITON_ATTN"}
            # vLLM picks its custom ops (quick_gelu, apply_rotary_emb, conv3d, mm_encoder_attn, ...)
            # by compilation mode: native torch under torch.compile, CUDA kernels when eager. The
            # tower is never compiled, so an eager encoder and a compiled decoder would compute it
            # with different ops and different bits (seen on the H200: 0/264 embeddings equal).
            # Pinning the choice makes the tower's bytes independent of eager vs compiled.
            kwargs["compilation_config"] = {"custom_ops": ["none"]}
        return kwargs

    def env(self, gpu: bool) -> dict[str, str]:
        env = {"SPLITVLM_VISION": self.vision}
        if self.exact and gpu:
            env.update({
                "VLLM_BATCH_INVARIANT": "1",
                "CUBLAS_WORKSPACE_CONFIG": ":16:8",
                "CUBLASLT_WORKSPACE_SIZE": "1",
                "SPLITVLM_INVARIANT_MATMUL": "1",
            })
        return env


PROFILES = {
    "exact": Profile(
        name="exact",
        exact=True,
        vision="batched",
        prefix_caching=False,
        description="prefix caching off, SDPA vision attention, no processor cache; "
        "on a GPU also Triton attention, VLLM_BATCH_INVARIANT=1 and batch-invariant Triton matmuls",
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
