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
from .base import ModelInputs, RowMap, Tile, TokenLayout
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

    def image_sequence_layout(self, inputs, image_index, positions, size, text_positions) -> TokenLayout:
        rows, cols, skip = self.patch_grid(positions.numel())
        cell = torch.arange(rows * cols)
        box = processed_canvas_box(size[0], size[1], self.processor.image_processor)
        return TokenLayout(positions[skip:], torch.zeros_like(cell), cell // cols, cell % cols, [Tile(box, rows, cols)], size, text_positions)

    def vision_rows(self, inputs: ModelInputs) -> RowMap:
        """The tower runs once per image ([images, tokens, d]): its patch grid over the processed
        canvas, whose box in the original image is the layout's tile, after the CLS token if any."""
        pixels = inputs.inputs["pixel_values"]
        patch = self.model.config.vision_config.patch_size
        rows, cols = pixels.shape[-2] // patch, pixels.shape[-1] // patch
        samples = [i for i, layout in enumerate(inputs.layouts) if layout.image_size is not None]
        if len(samples) != pixels.shape[0]:
            raise MmsaeError(f"{self.model_id}: the batch has {pixels.shape[0]} images but {len(samples)} sequences with image tokens (one image per sequence)")
        tiles = [[Tile(layout.tiles[0].box, rows, cols)] if layout.image_size is not None else [] for layout in inputs.layouts]
        return RowMap.of_frames([(i, 0) for i in samples], tiles, self.vision_prefix_tokens())
