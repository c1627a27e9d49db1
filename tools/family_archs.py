"""Random-weight Qwen2.5-VL and Qwen3-VL architectures for make-model: the real configs' shapes, and tiny CPU variants."""

from __future__ import annotations

from typing import Any

TINY_TEXT = dict(  # as the Qwen2-VL tiny model: head_dim 32, because CPU attention refuses 16
    hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
)

FAMILY_ARCHS: dict[str, dict[str, Any]] = {
    "tiny-qwen2.5-vl": {
        "family": "qwen2.5-vl",
        "sensitive": True,  # tools/tiny_init.py, checked by tests/test_families.py
        "text": dict(**TINY_TEXT, rope_theta=1e6, mrope_section=[4, 6, 6]),
        # window 112 px = 4x4 merged tokens: images past 112 px get several windows; block 1 attends fully
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=128,
                       window_size=112, fullatt_block_indexes=[1], hidden_act="silu", tokens_per_second=2,
                       patch_size=14),
        "vocab_size": None,
        "tie_word_embeddings": False,
        "min_pixels": 56 * 56,
        "max_pixels": 448 * 448,
    },
    "qwen2.5-vl-3b": {  # Qwen/Qwen2.5-VL-3B-Instruct
        "family": "qwen2.5-vl",
        "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, max_position_embeddings=128000, rope_theta=1e6,
                     mrope_section=[16, 24, 24]),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                       tokens_per_second=2, patch_size=14),
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 16384,
    },
    "tiny-qwen3-vl": {
        "family": "qwen3-vl",
        "sensitive": True,
        # interleaved mrope over head_dim 32: 16 frequencies, as [24, 20, 20] covers the 2B's 64
        "text": dict(**{**TINY_TEXT, "num_hidden_layers": 4}, head_dim=32, rope_theta=5e6, mrope_section=[6, 5, 5]),
        # two deepstack levels, one per language layer: every level reaches the output
        "vision": dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=128,
                       num_position_embeddings=256, deepstack_visual_indexes=[0, 1, 2],
                       hidden_act="gelu_pytorch_tanh", patch_size=16),
        "vocab_size": None,
        "tie_word_embeddings": False,
        "min_pixels": 64 * 64,
        "max_pixels": 448 * 448,
    },
    "qwen3-vl-2b": {  # Qwen/Qwen3-VL-2B-Instruct
        "family": "qwen3-vl",
        "text": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rope_theta=5e6,
                     mrope_section=[24, 20, 20]),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                       num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                       hidden_act="gelu_pytorch_tanh", patch_size=16),
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "min_pixels": 256 * 256,  # the real processor's size: shortest_edge 65536, longest_edge 16777216
        "max_pixels": 4096 * 4096,
    },
}


def build_family_config(spec: dict[str, Any], ids: dict[str, int], vocab_size: int):
    """The transformers config of a Qwen2.5-VL or Qwen3-VL arch spec, with the tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    qwen3 = spec["family"] == "qwen3-vl"
    text = dict(spec["text"])
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": text.pop("mrope_section")}
    if qwen3:
        rope["mrope_interleaved"] = True
    tokens = dict(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    text_config = dict(**text, vocab_size=vocab_size, rope_parameters=rope, rms_norm_eps=1e-6,
                       tie_word_embeddings=spec["tie_word_embeddings"], dtype="bfloat16", **tokens)
    if not qwen3:
        text_config["max_window_layers"] = text["num_hidden_layers"]
    vision_config = dict(**spec["vision"], in_channels=3, spatial_merge_size=2, temporal_patch_size=2)
    config_class, architecture = ((Qwen3VLConfig, "Qwen3VLForConditionalGeneration") if qwen3
                                  else (Qwen2_5_VLConfig, "Qwen2_5_VLForConditionalGeneration"))
    return finish_config(config_class, text_config, vision_config, ids, spec, architecture, tokens)


def finish_config(config_class, text_config: dict, vision_config: dict, ids: dict[str, int], spec: dict[str, Any],
                  architecture: str, tokens: dict[str, int]):
    """A family's transformers config from its parts, with the special token ids where every reader looks."""
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        architectures=[architecture],
        dtype="bfloat16",
    )
    for key, value in tokens.items():  # older readers look at the top level
        setattr(config, key, value)
    return config


def model_class(family: str):
    """The transformers model class that writes a checkpoint of this family."""
    import transformers

    names = {"qwen2-vl": "Qwen2VLForConditionalGeneration", "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
             "qwen3-vl": "Qwen3VLForConditionalGeneration"}
    return getattr(transformers, names[family])


def make_family_processor(family: str, tokenizer, chat_template: str, min_pixels: int, max_pixels: int):
    """The family's own processor class around the synthetic tokenizer, with the given pixel budget."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    if family == "qwen2.5-vl":
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
                                   tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                   chat_template=chat_template)
    # Qwen3-VL: 16-pixel patches, mean and std 0.5, the budget given as size (as its checkpoints do)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(), chat_template=chat_template)
