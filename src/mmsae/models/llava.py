"""LLaVA 1.5 (``LlavaForConditionalGeneration``): one square grid of patch tokens per image."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from ..errors import MmsaeError
from .base import Tile, TokenLayout
from .common import ChatAdapter
from .geometry import processed_canvas_box


class LlavaAdapter(ChatAdapter):
    family = "llava"
    model_class = LlavaForConditionalGeneration

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of patches the vision tower makes of one processed image."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def token_layouts(self, inputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int] | None]) -> list[TokenLayout]:
        rows, cols = self.patch_grid()
        image_id = self.image_token_id
        layouts = []
        for ids, mask, size in zip(inputs["input_ids"], inputs["attention_mask"], image_sizes):
            positions = torch.nonzero(ids == image_id).flatten().cpu()
            if size is None or positions.numel() == 0:
                layouts.append(self.empty_layout(ids, mask))
                continue
            if positions.numel() == rows * cols + 1:  # "full" feature strategy keeps the CLS token first
                positions = positions[1:]
            if positions.numel() != rows * cols:
                raise MmsaeError(f"{self.model_id}: found {positions.numel()} image tokens in a sequence, expected {rows * cols} (one image per sequence)")
            cell = torch.arange(rows * cols)
            box = processed_canvas_box(size[0], size[1], self.processor.image_processor)
            layouts.append(
                TokenLayout(positions, torch.zeros_like(cell), cell // cols, cell % cols, [Tile(box, rows, cols)], tuple(size), self.text_positions(ids, mask))
            )
        return layouts
