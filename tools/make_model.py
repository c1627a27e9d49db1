"""Write local random-weight Qwen-VL checkpoints (tiny ones for CPU tests, the real architectures for GPUs)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from splitvlm.core.errors import SplitVLMError
from splitvlm.tools.family_archs import (
    FAMILY_ARCHS,
    build_family_config,
    finish_config,
    make_family_processor,
    model_class,
)
from splitvlm.tools.tokenizer_maker import (
    CHAT_TEMPLATE,
    make_processor,
    make_tokenizer,
    special_token_ids,
)

MARKER = "splitvlm-model.json"  # written last; marks a directory as make-model output

ARCHS: dict[str, dict[str, Any]] = {
    "tiny": {  # Qwen2-VL
        "family": "qwen2-vl",
        "sensitive": True,  # tools/tiny_init.py, checked by tests/test_sensitivity.py
        "text": dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,  # head_dim 32: CPU attention refuses 16
            max_position_embeddings=4096, rope_theta=1e6, mrope_section=[4, 6, 6],
        ),
        "vision": dict(depth=2, embed_dim=32, num_heads=1, mlp_ratio=4),
        "vocab_size": None,  # the tokenizer's size
        "tie_word_embeddings": False,
        "min_pixels": 56 * 56,
        "max_pixels": 448 * 448,
    },
    "qwen2-vl-2b": {
        "family": "qwen2-vl",
        "text": dict(
            hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2,
            max_position_embeddings=32768, rope_theta=1e6, mrope_section=[16, 24, 24],
        ),
        "vision": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 16384,
    },
    **FAMILY_ARCHS,  # tiny-qwen2.5-vl, qwen2.5-vl-3b, tiny-qwen3-vl, qwen3-vl-2b
}


def arch_spec(arch: str) -> dict[str, Any]:
    try:
        return ARCHS[arch]
    except KeyError:
        raise SplitVLMError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}") from None


def build_config(arch: str, tokenizer=None):
    """The transformers config of an arch, with the special token ids of the synthetic tokenizer."""
    from transformers import Qwen2VLConfig

    spec = arch_spec(arch)
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    ids = special_token_ids(tokenizer)
    if spec["family"] != "qwen2-vl":
        return build_family_config(spec, ids, spec["vocab_size"] or len(tokenizer))
    text = dict(spec["text"])
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": text.pop("mrope_section")}
    tokens = dict(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    text_config = dict(
        **text,
        vocab_size=spec["vocab_size"] or len(tokenizer),
        rope_parameters=rope,
        rms_norm_eps=1e-6,
        max_window_layers=text["num_hidden_layers"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        dtype="bfloat16",
        **tokens,
    )
    vision_config = dict(
        **spec["vision"],
        hidden_size=text["hidden_size"],
        in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    )
    return finish_config(Qwen2VLConfig, text_config, vision_config, ids, spec, "Qwen2VLForConditionalGeneration",
                         tokens)


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) matrices, unit norms, zero biases; drawn with torch on the model's device."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:  # norm weights
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_model(arch: str, out: str, seed: int = 0, device: str = "cpu") -> str:
    """Write a complete random-weight checkpoint of `arch` (its family's layout) into `out`; returns `out`."""
    from transformers import GenerationConfig

    spec = arch_spec(arch)
    start = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)

    tokenizer = make_tokenizer()
    config = build_config(arch, tokenizer)
    with torch.device(device):
        model = model_class(spec["family"])._from_config(config, dtype=torch.bfloat16)
    ids = special_token_ids(tokenizer)
    if spec.get("sensitive"):
        from splitvlm.tools.tiny_init import init_sensitive

        init_sensitive(model, seed, sorted(set(ids.values())))
    else:
        init_random_weights(model, seed, std=config.text_config.initializer_range)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=[ids["eos_token_id"], ids["endoftext_id"]],
        pad_token_id=ids["pad_token_id"],
    )
    with quiet_progress():
        model.save_pretrained(out_dir, max_shard_size="50GB")  # one model.safetensors, original key names
    write_processor(out_dir, tokenizer, spec["min_pixels"], spec["max_pixels"], spec["family"])

    parameters = count_parameters(model)
    info = {
        "made_by": "splitvlm make-model",
        "arch": arch,
        "family": spec["family"],
        "seed": seed,
        "parameters": parameters,
        "vocab_size": config.text_config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return str(out_dir)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' progress bars (they clutter the CLI's one-line report)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def write_processor(out_dir: Path, tokenizer, min_pixels: int, max_pixels: int, family: str = "qwen2-vl") -> None:
    """processor_config.json (transformers 5) plus the older preprocessor_config.json and tokenizer files."""
    if family == "qwen2-vl":
        processor = make_processor(tokenizer, min_pixels, max_pixels)
    else:
        processor = make_family_processor(family, tokenizer, CHAT_TEMPLATE, min_pixels, max_pixels)
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    path = out_dir / "preprocessor_config.json"
    fields = json.loads(path.read_text())
    fields.update(min_pixels=min_pixels, max_pixels=max_pixels)  # Qwen's own keys, for older readers
    path.write_text(json.dumps(fields, indent=2) + "\n")


def read_marker(out: str | os.PathLike) -> dict[str, Any] | None:
    """The make-model record of a directory, or None if it is not make-model output."""
    path = Path(out) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def human_count(n: int) -> str:
    if n < 1000:
        return str(n)
    exp = min(int(math.log10(n) // 3), 3)
    return f"{n / 1000 ** exp:.2f}{' KMB'[exp]}"
