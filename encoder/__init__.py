"""Encoder stage: pre-encode image corpora with vLLM's own Qwen2-VL vision tower into the store."""

from splitvlm.encoder.pipeline import Encoder, Stats

__all__ = ["Encoder", "Stats"]
