"""Qwen2-VL as vLLM runs it, with the vision tower's batching under splitvlm's control.

Registered with vLLM's ModelRegistry by splitvlm.core.engine; imported only inside vLLM.
"""

from __future__ import annotations

import os

import torch
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration


class SplitQwen2VL(Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose vision tower can run one image per call, whatever vLLM batched.

    The tower's output for an image must not depend on which other images share its
    call, or stored embeddings cannot equal the ones vLLM computes end to end.
    """

    splitvlm_record: list[torch.Tensor] | None = None  # set to [] to record every image's embeds

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if image_input["type"] == "pixel_values" and os.environ.get("SPLITVLM_VISION") == "per_image":
            embeds = tuple(self._encode_one_by_one(image_input["pixel_values"], image_input["image_grid_thw"]))
        else:
            embeds = tuple(super()._process_image_input(image_input))
        if self.splitvlm_record is not None and image_input["type"] == "pixel_values":
            self.splitvlm_record.extend(e.detach().to("cpu", copy=True) for e in embeds)
        return embeds

    def _encode_one_by_one(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        patches = grid_thw.prod(-1).tolist()
        for pixels, grid in zip(pixel_values.split(patches), grid_thw.split(1)):
            yield from super()._process_image_input(
                {"type": "pixel_values", "pixel_values": pixels, "image_grid_thw": grid}
            )

    @torch.inference_mode()
    def splitvlm_encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Embeddings of a batch of preprocessed images, exactly as the end-to-end path computes them."""
        device = self.visual.device
        image_input = {
            "type": "pixel_values",
            "pixel_values": pixel_values.to(device),
            "image_grid_thw": grid_thw.to(device),
        }
        return [e.to("cpu") for e in self._process_image_input(image_input)]
