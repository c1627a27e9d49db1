"""The Qwen-VL families splitvlm runs: how vLLM builds each, and how its stored embeddings are laid out."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitvlm.core.errors import SplitVLMError


@dataclass(frozen=True)
class Layout:
    """One image's embedding as the tower returns it and the store keeps it: [tokens, width].

    width = hidden × (1 + deepstack): the language model's input embedding, then (Qwen3-VL) one
    block of the same width per deepstack level, which vLLM adds to the first language layers.
    """

    hidden: int  # the language model's hidden size: the width of the main part
    deepstack: int  # deepstack levels after the main part (Qwen3-VL), 0 otherwise
    merge_size: int  # tokens = t·h·w patches / merge_size²
    patch_size: int

    @property
    def width(self) -> int:
        return self.hidden * (1 + self.deepstack)

    def describe(self) -> str:
        if self.deepstack:
            return f"width {self.width} ({self.hidden} x (1 + {self.deepstack} deepstack))"
        return f"width {self.width}"

    def fields(self) -> dict[str, int]:
        return {"width": self.width, "deepstack": self.deepstack}


@dataclass(frozen=True)
class Family:
    """A model family: the HF architectures it matches and the split model class vLLM runs for it."""

    name: str  # "qwen2-vl": what provenance, entry metadata and messages call it
    hf_architectures: tuple[str, ...]  # config.json "architectures" it matches
    model_types: tuple[str, ...]  # config.json "model_type" it matches when architectures say nothing
    split_arch: str  # the architecture name splitvlm registers with vLLM (hf_overrides)
    split_class: str  # "module:Class", a subclass of vLLM's own model class
    out_width_field: str  # the vision_config field holding the merger's output width
    has_deepstack: bool = False  # the tower appends deepstack_visual_indexes levels (Qwen3-VL)
    # Exact profile on a GPU: encode with the full engine, as the decoder runs the tower. vLLM 0.26's
    # eager encoder-only engine computes Qwen2.5-VL's tower with other bits than its compiled full
    # engine (H200, 15e1d86: 0/24 embeddings equal; with --full-engine 24/24 and verify 24/24).
    exact_needs_full_engine: bool = False

    def model_class(self) -> type:
        """The split model class (imports vLLM)."""
        module, _, name = self.split_class.partition(":")
        return getattr(importlib.import_module(module), name)

    def layout(self, config: dict[str, Any]) -> Layout:
        """The embedding layout of a checkpoint of this family, from its config.json fields."""
        vision = config.get("vision_config") or {}
        text = config.get("text_config") or config
        hidden = int(vision.get(self.out_width_field) or text.get("hidden_size") or 0)
        if not hidden:
            raise SplitVLMError(f"{self.name} config: no vision_config.{self.out_width_field} and no hidden_size")
        if int(text.get("hidden_size", hidden)) != hidden:
            raise SplitVLMError(f"{self.name} config: the tower's output width {hidden} is not the "
                                f"language model's hidden size {text.get('hidden_size')}")
        deepstack = len(vision.get("deepstack_visual_indexes") or []) if self.has_deepstack else 0
        return Layout(hidden, deepstack, int(vision.get("spatial_merge_size", 2)),
                      int(vision.get("patch_size", 14)))

    def matches(self, config: dict[str, Any]) -> bool:
        architectures = config.get("architectures") or []
        if architectures:
            return any(a in self.hf_architectures or a == self.split_arch for a in architectures)
        return config.get("model_type") in self.model_types


QWEN2_VL = Family(
    name="qwen2-vl",
    hf_architectures=("Qwen2VLForConditionalGeneration",),
    model_types=("qwen2_vl",),
    split_arch="SplitVLMQwen2VL",
    split_class="splitvlm.core.model:SplitQwen2VL",
    out_width_field="hidden_size",  # Qwen2-VL's vision_config names the merger's output hidden_size
)
QWEN2_5_VL = Family(
    name="qwen2.5-vl",
    hf_architectures=("Qwen2_5_VLForConditionalGeneration",),
    model_types=("qwen2_5_vl",),
    split_arch="SplitVLMQwen2_5VL",
    split_class="splitvlm.core.model:SplitQwen2_5VL",
    out_width_field="out_hidden_size",
    exact_needs_full_engine=True,
)
QWEN3_VL = Family(
    name="qwen3-vl",
    hf_architectures=("Qwen3VLForConditionalGeneration",),
    model_types=("qwen3_vl",),
    split_arch="SplitVLMQwen3VL",
    split_class="splitvlm.core.model:SplitQwen3VL",
    out_width_field="out_hidden_size",
    has_deepstack=True,
)
FAMILIES: tuple[Family, ...] = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL)
LEGACY = QWEN2_VL  # the family of stores made before families existed: its keys hold no family name


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise SplitVLMError(f"unknown model family {name!r}; splitvlm supports {', '.join(f.name for f in FAMILIES)}")


def read_config(model: str | Path) -> dict[str, Any]:
    """config.json of a local checkpoint, or of a hub id (fetched into the local cache if need be)."""
    from splitvlm.core.identity import resolve_model_dir

    root = resolve_model_dir(str(model), download=True)
    path = Path(root) / "config.json" if root is not None else None
    if path is None or not path.is_file():
        raise SplitVLMError(f"model {model}: no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SplitVLMError(f"model {model}: unreadable config.json ({type(exc).__name__})") from None


def family_of_config(config: dict[str, Any], model: str | Path = "model") -> Family:
    for family in FAMILIES:
        if family.matches(config):
            return family
    found = ", ".join(config.get("architectures") or []) or config.get("model_type") or "none given"
    supported = ", ".join(a for f in FAMILIES for a in f.hf_architectures)
    raise SplitVLMError(f"model {model}: architecture {found} is not supported; splitvlm runs {supported}")


def family_of_model(model_dir: str | Path) -> Family:
    """The family of a checkpoint (a folder or a hub id), from its config.json."""
    return family_of_config(read_config(model_dir), model_dir)


def layout_of_model(model_dir: str | Path) -> tuple[Family, Layout]:
    """The family of a checkpoint and the layout of the embeddings its tower makes."""
    config = read_config(model_dir)
    family = family_of_config(config, model_dir)
    return family, family.layout(config)
