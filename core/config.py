"""The one configuration object every stage takes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from splitvlm.core.errors import SplitVLMError

IMAGE_LOADERS = ("vllm", "scaled")  # splitvlm.core.images: vLLM's pixels, or 16-bit grey scaled to 8 bits

@dataclass
class Config:
    model: str
    store: str | None = None
    profile: str = "exact"  # "exact" or "fast", see splitvlm.core.profiles
    dtype: str = "bfloat16"
    min_pixels: int | None = None
    max_pixels: int | None = None
    image_loader: str = "vllm"  # one of IMAGE_LOADERS; part of the preprocessing identity (the key)
    batch_patches: int = 16384  # vision tower budget per encoder step, in patches
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    max_model_len: int | None = None
    max_num_seqs: int = 256
    batch_jobs: int = 256  # jobs handed to vLLM per generate call (both paths of verify alike)
    max_images_per_prompt: int = 8
    gpu_memory_utilization: float | None = None  # None: 0.3 on the CPU, 0.85 on a GPU
    kv_cache_memory_bytes: int | None = None  # a fixed KV cache instead of sizing it from free memory
    enforce_eager: bool | None = None  # None: eager on the CPU, CUDA graphs on a GPU
    seed: int = 0
    loader_threads: int = 4
    # encode starts vLLM without the language model and its KV cache (True), with them (False), or
    # None: encoder-only unless the family needs the full engine for exactness (core.engine.encoder_only_for)
    encoder_only: bool | None = None
    failures: str | None = None
    overwrite: bool = False
    on_missing: str = "error"  # error | encode | skip
    allow_mismatch: bool = False
    show_progress: bool = True
    cache: bool = False  # decode: answer repeated jobs from the store's "results" database
    lock: str | None = None  # a lock file from `splitvlm env --lock`: refuse other environments
    vllm_args: dict = field(default_factory=dict)  # more engine arguments, vLLM's names (core.vllm_args)
    engine_process: str = "auto"  # auto | inprocess | separate: where vLLM's engine core runs (Engine)

    def __post_init__(self) -> None:
        if self.image_loader not in IMAGE_LOADERS:
            raise SplitVLMError(f"image loader {self.image_loader!r}: not one of {', '.join(IMAGE_LOADERS)}")

    def replace(self, **changes) -> Config:
        return replace(self, **changes)

    @property
    def mm_processor_kwargs(self) -> dict[str, int]:
        kwargs = {}
        if self.min_pixels is not None:
            kwargs["min_pixels"] = self.min_pixels
        if self.max_pixels is not None:
            kwargs["max_pixels"] = self.max_pixels
        return kwargs
