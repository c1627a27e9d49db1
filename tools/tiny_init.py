"""Initialise a tiny Qwen-VL model so that its greedy output reacts to the image, the prompt and small noise.

With the usual N(0, 0.02) initialisation the residual stream is dominated by the last token's
embedding, attention is nearly uniform and the model repeats itself. Here matrices are drawn with
fan-in scaling (std = gain / sqrt(fan_in)), token embeddings with unit variance, and the query and
key projections with a large gain, so attention is sharp: a 1% change of an image embedding moves
attention weights enough to change some greedy token. Qwen3 normalises queries and keys per head
(q_norm, k_norm), which would undo that gain, so those norms' weights carry it instead. See
docs/tiny-model.md for the figures.
"""

from __future__ import annotations

import math

import torch

RESIDUAL_GAIN = 2.0  # language and vision blocks: each layer changes the residual stream strongly
QK_GAIN = 10.0  # query/key projections: attention logits of tens, so attention is sharp
EMBED_STD = 1.0  # text token embeddings, comparable in size to the image embeddings
UNIT_GAIN_PARTS = ("lm_head", "patch_embed", "merger")  # variance-preserving: std 1 / sqrt(fan_in)
DEEPSTACK_GAIN = 4.0  # Qwen3-VL's deepstack mergers (last layer): their levels move the output as the main part does


def weight_std(name: str, fan_in: int) -> float:
    if "deepstack_merger_list" in name and "fc2" in name:
        gain = DEEPSTACK_GAIN
    elif any(part in name for part in UNIT_GAIN_PARTS):
        gain = 1.0
    elif "q_proj" in name or "k_proj" in name:
        gain = QK_GAIN
    else:
        gain = RESIDUAL_GAIN
    return gain / math.sqrt(fan_in)


@torch.no_grad()
def init_sensitive(model: torch.nn.Module, seed: int, special_ids: list[int]) -> None:
    """Draw every parameter of `model` (on the CPU, in a fixed order) from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            values = torch.zeros(param.shape)
        elif param.dim() == 1 and ("q_norm" in name or "k_norm" in name):  # Qwen3: after the projection
            values = torch.full(param.shape, QK_GAIN)
        elif param.dim() == 1:  # norm weights
            values = torch.ones(param.shape)
        elif name.endswith("embed_tokens.weight"):
            values = torch.randn(param.shape, generator=gen) * EMBED_STD
        else:
            values = torch.randn(param.shape, generator=gen) * weight_std(name, math.prod(param.shape[1:]))
        param.copy_(values.to(param.dtype))
    # a zero row gives logit 0, which never wins greedy against ~500 random logits: the model never
    # emits <|im_end|> or <|endoftext|>, so every output runs to max_tokens
    model.lm_head.weight[special_ids] = 0
