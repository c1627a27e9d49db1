"""The Qwen-VL families as vLLM runs them, with the vision tower's batching under splitvlm's control.

Registered with vLLM's ModelRegistry (splitvlm.core.families names them); imported only inside vLLM.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from splitvlm.core.profiles import vision_mode


class SplitTower:
    """The split behaviour, for a vLLM Qwen-VL model class whose `_process_image_input` takes
    {"type", "pixel_values" | "image_embeds", "image_grid_thw"} and returns one tensor per image
    (Qwen2-VL, Qwen2.5-VL and Qwen3-VL alike, in vLLM 0.26 and 0.32).

    The tower's output for an image must not depend on which other images share its call, or
    stored embeddings cannot equal the ones vLLM computes end to end. Whatever the tower returns
    per image is recorded and stored whole: for Qwen3-VL that is the main embedding and its
    deepstack levels side by side, which vLLM splits again when the embedding comes back.
    """

    splitvlm_record: list[torch.Tensor] | None = None  # set to [] to record every image's embeds

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if image_input["type"] == "pixel_values" and vision_mode() == "per_image":
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


class SplitQwen2VL(SplitTower, Qwen2VLForConditionalGeneration):
    """Qwen2-VL: one tower output per image, the language model's hidden size wide."""


class SplitQwen2_5VL(SplitTower, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL: window attention inside the tower (each image's own windows, put back in
    order by reverse_indices before the tower returns); the same [tokens, hidden] output."""


class SplitQwen3VL(SplitTower, Qwen3VLForConditionalGeneration):
    """Qwen3-VL: the tower returns [tokens, hidden × (1 + deepstack levels)], stored whole."""
