"""The one module that builds vLLM engines for splitvlm; everything vLLM-facing goes through Engine."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from splitvlm.core.config import Config
from splitvlm.core.errors import EngineStartError, SplitVLMError, whole_line
from splitvlm.core.plugin import VARIABLE
from splitvlm.core.profiles import (
    Profile,
    get_profile,
    process_env,
    process_settings,
    settings_from,
    tower_kernels,
)

ENGINE_PROCESS = ("auto", "inprocess", "separate")
_process_env: dict[str, str] | None = None
_engine_process: str | None = None  # "inprocess" or "separate", once an engine was started here
_starts = 0  # vLLM engines this process has tried to start (an encode run may start at most one)


def engine_starts() -> int:
    """How many vLLM engines this process has tried to start."""
    return _starts


def show_bars(wanted: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal (never in logs)."""
    return wanted and sys.stderr.isatty()


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _runner_env(gpu: bool, encoder_only: bool) -> dict[str, str]:
    """vLLM 0.26's V2 model runner has no encoder-only path: its dummy runs call the language
    model, which mm_encoder_only leaves on the meta device ("Cannot copy out of meta tensor",
    "fake tensor call"). The V1 runner skips the language model's dummy run, sampler and KV
    cache when mm_encoder_only is set (gpu_model_runner.py), so encoder-only engines use it."""
    return {"VLLM_USE_V2_MODEL_RUNNER": "0"} if gpu and encoder_only else {}


def _prepare_process(profile: Profile, gpu: bool, encoder_only: bool = False, separate: bool | None = None) -> None:
    """Set the environment vLLM reads once per process; a second, different profile is refused.

    separate: vLLM's engine core in its own process (vLLM's default) or in this one; None for a
    process that only needs the profile's environment (a tokenizer), not an engine."""
    global _process_env, _engine_process
    given = os.environ.get(VARIABLE)  # the user's, for an experiment, or this process's earlier value
    if given and _process_env is None and settings_from(given).profile != profile.name:
        raise SplitVLMError(f"{VARIABLE}={given!r} names another profile than --profile {profile.name}")
    env = {**process_env(profile, gpu), **_runner_env(gpu, encoder_only)}
    if _process_env is not None and _process_env != env:
        raise SplitVLMError(
            f"this process already runs vLLM with profile settings {_process_env}; "
            f"profile {profile.name!r} needs a new process"
        )
    if separate is not None:
        mode = "separate" if separate else "inprocess"
        if _engine_process not in (None, mode):  # an engine core here caches vLLM's environment
            raise SplitVLMError(f"this process already started an engine {_engine_process}; "
                                f"an engine {mode} needs a new process")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if separate else "0"
        _engine_process = mode
    if not gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # splitvlm prints its own progress
    os.environ.update(env)
    _process_env = env


def separate_process(cfg: Config, gpu: bool, encoder_only: bool, model_access: bool) -> bool:
    """Whether vLLM's engine core runs in its own process. cfg.engine_process "auto": on a GPU,
    when nothing reaches into the model; in this process on the CPU, where the tests compare
    against in-process engines and the engine core's own thread binding could change bytes."""
    choice = cfg.engine_process
    if choice not in ENGINE_PROCESS:
        raise SplitVLMError(f"--engine-process must be one of {', '.join(ENGINE_PROCESS)}, not {choice!r}")
    if encoder_only or model_access:
        return False
    return gpu if choice == "auto" else choice == "separate"


def encoder_only_for(cfg: Config) -> bool:
    """Whether encode starts vLLM's encoder-only engine: cfg.encoder_only when given, else yes, except
    under the exact profile on a GPU for a family whose tower needs the full engine to give the
    decoder's bits (Family.exact_needs_full_engine: Qwen2.5-VL)."""
    if cfg.encoder_only is not None:
        return cfg.encoder_only
    from splitvlm.core.families import family_of_model

    needs_full = family_of_model(cfg.model).exact_needs_full_engine
    return not (needs_full and get_profile(cfg.profile).exact and on_gpu())


def prepare_process(profile_name: str) -> None:
    """Give this process the environment a full engine of this profile would (vLLM reads it once)."""
    _prepare_process(get_profile(profile_name), on_gpu())


def engine_args(cfg: Config, split_arch: str, gpu: bool, encoder_only: bool = False) -> dict[str, Any]:
    """vLLM's engine arguments for a config under its profile: the one place they are built
    (Engine passes them to vLLM's LLM, `splitvlm serve` to vLLM's OpenAI server)."""
    kwargs: dict[str, Any] = dict(
        model=cfg.model,
        hf_overrides={"architectures": [split_arch]},
        dtype=cfg.dtype,
        seed=cfg.seed,
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
        max_num_seqs=cfg.max_num_seqs,
        gpu_memory_utilization=cfg.gpu_memory_utilization or (0.85 if gpu else 0.3),
        enforce_eager=Engine._eager(cfg, encoder_only),
        use_tqdm_on_load=show_bars(cfg.show_progress),  # vLLM's own load and graph-capture bars
    )
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.kv_cache_memory_bytes and not encoder_only:
        kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    if cfg.mm_processor_kwargs:
        kwargs["mm_processor_kwargs"] = cfg.mm_processor_kwargs
    profile = get_profile(cfg.profile)
    kwargs.update(profile.engine_kwargs(gpu, process_settings(profile, gpu)))
    kwargs.update(cfg.vllm_args)  # checked by core.vllm_args.parse_vllm_args: none is pinned by the profile
    if encoder_only:
        # splitvlm sizes the tower's batches itself (--batch-patches), so vLLM's dummy run of
        # the largest possible image, which only sizes a KV cache this engine does not have, is skipped.
        kwargs["mm_encoder_only"] = True
        kwargs["skip_mm_profiling"] = True
    return kwargs


class Engine:
    """A vLLM engine for Qwen2-VL under a splitvlm profile: preprocess, encode, generate."""

    def __init__(self, cfg: Config, encoder_only: bool = False, model_access: bool = True):
        """encoder_only: vLLM's mm_encoder_only mode, the vision tower alone (no language model
        weights, no KV cache), always eager; preprocess and encode work, generate does not.

        model_access=False: nothing will reach into the model (encode, recording), so vLLM's
        engine core may run in its own process, as vLLM's default does (see engine_process).

        Raises EngineStartError, with vLLM's reason on one line, when vLLM cannot start."""
        global _starts
        self.cfg = cfg
        self.encoder_only = encoder_only
        self.profile = get_profile(cfg.profile)
        self.gpu = on_gpu()
        self.separate = separate_process(cfg, self.gpu, encoder_only, model_access)
        _prepare_process(self.profile, self.gpu, encoder_only, self.separate)
        try:
            from vllm import LLM
        except ImportError as exc:
            raise SplitVLMError(f"vLLM is not installed ({exc}); run `make setup` or pip install 'splitvlm[gpu]'") from None
        from splitvlm.core.families import family_of_model
        from splitvlm.core.plugin import register

        self.family = family_of_model(cfg.model)  # one line naming the model when it is not supported
        # vLLM also calls it in each process it starts (the vllm.general_plugins entry point); with
        # the engine core elsewhere, no kernels here: that would start CUDA in this process.
        register(kernels=not self.separate)
        kwargs = engine_args(cfg, self.family.split_arch, self.gpu, encoder_only)
        self.settings = {k: v for k, v in kwargs.items() if k not in ("hf_overrides",)}
        _starts += 1
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:
            mode = "encoder-only" if encoder_only else "full"
            hint = "; try --full-engine" if encoder_only else ""
            raise EngineStartError(
                f"vLLM could not start the {mode} engine for {cfg.model} ({type(exc).__name__}: {whole_line(exc)}){hint}"
            ) from exc
        self.model_config = self.llm.llm_engine.model_config
        hf_config = self.model_config.hf_config
        self.layout = self.family.layout(hf_config.to_dict())  # the family's embedding layout
        self.hidden_size: int = self.layout.hidden  # the language model's hidden size
        self.embed_width: int = self.layout.width  # a stored embedding's width (Qwen3-VL: with deepstack)
        self.merge_size: int = self.layout.merge_size
        self.dtype: torch.dtype = self.model_config.dtype
        self._mm_processor = None

    def expect(self):
        """What a stored entry must be for this engine's model (store.Expect): width, dtype, family."""
        from splitvlm.store import Expect

        return Expect(self.embed_width, self.dtype, self.merge_size, self.family.name, self.layout.deepstack)

    @staticmethod
    def _eager(cfg: Config, encoder_only: bool) -> bool:
        """The tower runs in batches splitvlm builds, so an encoder-only engine gains nothing
        from torch.compile or CUDA graphs (they only serve the language model)."""
        if encoder_only:
            return True
        return (not on_gpu()) if cfg.enforce_eager is None else cfg.enforce_eager

    # -- preprocessing, exactly as vLLM's multimodal processor does it --
    def _processor(self):
        if self._mm_processor is None:
            from vllm.multimodal import MULTIMODAL_REGISTRY

            self._mm_processor = MULTIMODAL_REGISTRY.create_processor(self.model_config)
        return self._mm_processor

    def preprocess(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [patches, dim] and image_grid_thw [1, 3] of one PIL image, as vLLM makes them."""
        info = self._processor().info
        kwargs = self.cfg.mm_processor_kwargs
        image_processor = info.get_hf_processor(**kwargs).image_processor
        out = info.ctx.call_hf_processor(image_processor, {"images": [image]}, kwargs)
        return out["pixel_values"], out["image_grid_thw"].to(torch.int64)

    def preprocess_identity(self) -> dict[str, Any]:
        """Every setting of the image processor that changes pixel_values."""
        info = self._processor().info
        ip = info.get_hf_processor(**self.cfg.mm_processor_kwargs).image_processor
        fields = ip.to_dict()
        fields.pop("processor_class", None)
        fields["class"] = type(ip).__name__
        return fields

    # -- the vision tower --
    def _reach_model(self, what: str) -> None:
        if self.separate:
            raise SplitVLMError(f"{what} reaches into the model, but this engine runs vLLM's engine core in "
                                "another process (Engine(..., model_access=True) keeps it here)")

    def run_tower(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Embeddings of preprocessed images (concatenated patches), one tensor per image, on the CPU."""
        self._reach_model("encode")
        (out,) = self.llm.apply_model(lambda model: model.splitvlm_encode(pixel_values, grid_thw))
        return out

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Collect the embeddings the end-to-end path computes inside vLLM (for tests and checks)."""
        self._reach_model("recording")
        record: list[torch.Tensor] = []

        def start(model):
            model.splitvlm_record = record

        def stop(model):
            model.splitvlm_record = None

        self.llm.apply_model(start)
        try:
            yield record
        finally:
            self.llm.apply_model(stop)

    # -- generation --
    def sampling_params(self, max_tokens: int | None = None, stop: Sequence[str] | None = None):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens or self.cfg.max_tokens,
            stop=list(stop if stop is not None else self.cfg.stop) or None,
            seed=self.cfg.seed,
            detokenize=True,
        )

    def generate(self, prompts: list[dict], params=None, progress: bool = False) -> list:
        """Greedy generation for vLLM prompt dicts; outputs in the prompts' order."""
        if self.encoder_only:
            raise SplitVLMError("this engine holds only the vision tower (encoder_only); it cannot generate")
        return self.llm.generate(prompts, params or self.sampling_params(), use_tqdm=progress)

    def tokenizer(self):
        return self.llm.get_tokenizer()

    def reported(self) -> dict[str, Any]:
        """The engine's settings as vLLM resolved them (not as splitvlm asked for them)."""
        from splitvlm.core.engine_report import reported

        return reported(self)

    def environment(self) -> dict[str, str]:
        from splitvlm.core.identity import environment

        env = environment()
        env["profile"] = self.profile.name
        env["tower_kernels"] = tower_kernels(self.profile.name, self.gpu)
        return env
