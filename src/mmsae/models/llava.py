"""LLaVA 1.5 (``LlavaForConditionalGeneration``): one square grid of patch tokens per image.

The processor either resizes the short side and crops the centre (CLIP) or pads the image to a
square first (``LlavaImageProcessor(do_pad=True)``); the grid's box in the original image
follows that (see ``geometry.processed_canvas_box``).
"""

from __future__ import annotations

import math

import torch
from transformers import LlavaForConditionalGeneration

from ..errors import MmsaeError
from .base import Tile, TokenLayout
from .common import ChatAdapter
from .geometry import processed_canvas_box


class LlavaAdapter(ChatAdapter):
    family = "llava"
    model_class = LlavaForConditionalGeneration

    def patch_grid(self, count: int) -> tuple[int, int, int]:
        """(rows, cols, skip) of the square token grid behind ``count`` image tokens.

        Normally the vision tower's patch grid; a projector that pools patches (as the demo
        model's may) gives a smaller square grid over the same canvas. ``skip`` is 1 when a CLS
        token comes first (the "full" feature strategy with a CLIP tower).
        """
        for skip in (0, 1):
            side = math.isqrt(count - skip)
            if side > 0 and side * side == count - skip:
                return side, side, skip
        raise MmsaeError(f"{self.model_id}: found {count} image tokens in a sequence, which is not a square grid (one image per sequence)")

    def token_layouts(self, inputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int] | None]) -> list[TokenLayout]:
        image_id = self.image_token_id
        layouts = []
        for ids, mask, size in zip(inputs["input_ids"], inputs["attention_mask"], image_sizes):
            positions = torch.nonzero(ids == image_id).flatten().cpu()
            if size is None or positions.numel() == 0:
                layouts.append(self.empty_layout(ids, mask))
                continue
            rows, cols, skip = self.patch_grid(positions.numel())
            positions = positions[skip:]
            cell = torch.arange(rows * cols)
            box = processed_canvas_box(size[0], size[1], self.processor.image_processor)
            layouts.append(
                TokenLayout(positions, torch.zeros_like(cell), cell // cols, cell % cols, [Tile(box, rows, cols)], tuple(size), self.text_positions(ids, mask))
            )
        return layouts
