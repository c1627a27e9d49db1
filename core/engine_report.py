"""What a running engine reports: its settings as vLLM resolved them, and how its tower's attention runs."""

from __future__ import annotations

import os
from typing import Any

from splitvlm.core.plugin import VARIABLE


def _text(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def reported(engine) -> dict[str, Any]:
    """An Engine's settings as vLLM resolved them (not as splitvlm asked for them)."""
    vc = engine.llm.llm_engine.vllm_config
    mm = engine.model_config.multimodal_config
    comp, cache, sched = vc.compilation_config, vc.cache_config, vc.scheduler_config
    fields = {
        "mm_encoder_only": getattr(mm, "mm_encoder_only", None),
        "mm_encoder_attn_backend": getattr(mm, "mm_encoder_attn_backend", None),
        "enforce_eager": engine.model_config.enforce_eager,
        "compilation_mode": getattr(comp, "mode", None),
        "cudagraph_mode": getattr(comp, "cudagraph_mode", None),
        "custom_ops": ",".join(getattr(comp, "custom_ops", []) or []),
        "v2_model_runner": getattr(vc, "use_v2_model_runner", None),
        "attention_backend": getattr(getattr(vc, "attention_config", None), "backend", None),
        "ir_op_priority": getattr(getattr(vc, "kernel_config", None), "ir_op_priority", None),
        "enable_prefix_caching": cache.enable_prefix_caching,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "gpu_memory_utilization": cache.gpu_memory_utilization,
        "max_model_len": engine.model_config.max_model_len,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "dtype": engine.model_config.dtype,
        "batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT", "0"),
        "splitvlm_profile": os.environ.get(VARIABLE, ""),
        "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),
        # with the engine core in another process the model is out of reach
        "vision_attention": None if engine.separate else vision_attention(engine.llm),
    }
    return {name: _text(value) for name, value in fields.items()}


def vision_attention(llm) -> str | None:
    """How the tower's attention runs in the built model: "METHOD BACKEND" (a custom op that is
    turned off runs forward_native, per-image SDPA, whatever backend was asked for)."""

    def probe(model) -> str | None:
        for module in model.modules():
            if type(module).__name__ == "MMEncoderAttention":
                method = getattr(module, "_forward_method", None)
                backend = getattr(module, "attn_backend", None)
                return f"{getattr(method, '__name__', method)} {getattr(backend, 'name', backend)}"
        return None

    (found,) = llm.apply_model(probe)
    return found
