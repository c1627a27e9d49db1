"""More vLLM engine arguments, by vLLM's own names (`--vllm-arg NAME=VALUE`), checked before any engine starts."""

from __future__ import annotations

import dataclasses
import functools
import json

from splitvlm.core.errors import SplitVLMError
from splitvlm.core.profiles import get_profile

# Set by splitvlm itself: they decide what the engine is (the model class, embeddings in, the tower alone).
RESERVED = {"model", "hf_overrides", "enable_mm_embeds", "mm_encoder_only", "skip_mm_profiling", "tokenizer"}
# Arguments that have a splitvlm option of their own: one place to set each.
OWN_OPTIONS = {"dtype": "--dtype", "max_model_len": "--max-model-len", "gpu_memory_utilization": "--gpu-memory-utilization",
               "kv_cache_memory_bytes": "--kv-cache-memory-bytes", "enforce_eager": "--enforce-eager/--cuda-graphs",
               "seed": "--seed", "limit_mm_per_prompt": "--limit-images", "mm_processor_kwargs": "--min-pixels/--max-pixels"}


@functools.lru_cache(maxsize=1)
def engine_arg_names() -> frozenset[str]:
    """The fields of vLLM's EngineArgs in the installed vLLM (what `LLM(**kwargs)` takes)."""
    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


def _value(text: str):
    """JSON where it parses (numbers, booleans, null, lists, objects), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_vllm_args(items: tuple[str, ...] | list[str], profile: str, gpu: bool) -> dict:
    """{name: value} from NAME=VALUE items; SplitVLMError naming the item for an unknown name, one
    splitvlm sets itself, one with a splitvlm option, or one the profile pins (under exact)."""
    pinned = get_profile(profile).engine_kwargs(gpu) if get_profile(profile).exact else {}
    out: dict = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise SplitVLMError(f"--vllm-arg {item!r}: expected NAME=VALUE, for example max_num_batched_tokens=8192")
        if name in RESERVED:
            raise SplitVLMError(f"--vllm-arg {name}: splitvlm sets it itself")
        if name in OWN_OPTIONS:
            raise SplitVLMError(f"--vllm-arg {name}: use {OWN_OPTIONS[name]}")
        if name in pinned:
            raise SplitVLMError(f"--vllm-arg {name}: the exact profile pins it to {json.dumps(pinned[name])} "
                                "(that is what keeps split == end to end); use --profile fast to change it")
        if name not in engine_arg_names():
            raise SplitVLMError(f"--vllm-arg {name}: not an engine argument of this vLLM")
        out[name] = _value(raw)
    return out
