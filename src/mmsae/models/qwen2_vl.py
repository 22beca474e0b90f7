"""Qwen2-VL and Qwen2.5-VL: a dynamic grid of patches, each 2x2 block merged into one token.

The processor resizes the image (keeping its aspect ratio roughly, to multiples of
patch x merge pixels) and reports ``image_grid_thw`` = (frames, patch rows, patch columns);
the model merges every ``merge x merge`` block of patches into one token, in row-major order.
The whole (stretched) image is one tile of (rows / merge) x (columns / merge) tokens. The
``<|vision_start|>`` / ``<|vision_end|>`` markers around the image carry no patch.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from ..errors import MmsaeError
from .base import Tile, TokenLayout
from .common import ChatAdapter


class Qwen2VLAdapter(ChatAdapter):
    family = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    processor_class = Qwen2VLProcessor

    def image_token_ids(self) -> list[int]:
        config = self.model.config
        return [self.image_token_id, int(config.vision_start_token_id), int(config.vision_end_token_id)]

    def image_placeholder(self) -> str:
        return "<|vision_start|><|image_pad|><|vision_end|>"

    def image_sequence_layout(self, inputs, image_index, positions, size, text_positions) -> TokenLayout:
        merge = self.model.config.vision_config.spatial_merge_size
        # image_grid_thw has one row per image of the batch, in sequence order
        frames, patch_rows, patch_cols = inputs["image_grid_thw"][image_index].tolist()
        rows, cols = patch_rows // merge, patch_cols // merge
        if frames != 1 or positions.numel() != rows * cols:
            raise MmsaeError(f"{self.model_id}: found {positions.numel()} image tokens for a grid of {frames}x{rows}x{cols}, expected one image per sequence")
        cell = torch.arange(rows * cols)
        width, height = size
        tile = Tile((0.0, 0.0, float(width), float(height)), rows, cols)
        return TokenLayout(positions, torch.zeros_like(cell), cell // cols, cell % cols, [tile], size, text_positions)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor
