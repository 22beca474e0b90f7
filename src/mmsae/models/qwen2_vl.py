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
from .base import ModelInputs, RowMap, Tile, TokenLayout
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

    # --- sites: the tower is the ``visual`` model; its ``merger`` is the projector -----------
    def projector(self) -> torch.nn.Module:
        return self.vision_tower().merger

    def vision_width(self) -> int:
        return int(self.model.config.vision_config.embed_dim)

    def vision_rows(self, inputs: ModelInputs) -> RowMap:
        """The tower sees all images' patches as one sequence [patches, d], in ``image_grid_thw``
        order; each image's patches come merge x merge block by block (blocks row by row, patches
        row by row inside a block), permuted by :meth:`vision_order`. One tile per image: its
        unmerged patch grid over the whole (stretched) image."""
        grid = inputs.inputs["image_grid_thw"].cpu()
        merge = self.model.config.vision_config.spatial_merge_size
        samples = [i for i, layout in enumerate(inputs.layouts) if layout.image_size is not None]
        if len(samples) != grid.shape[0]:
            raise MmsaeError(f"{self.model_id}: the batch has {grid.shape[0]} images but {len(samples)} sequences with image tokens (one image per sequence)")
        tiles = [[] for _ in inputs.layouts]
        parts = []
        for i, (frames, rows, cols) in zip(samples, grid.tolist()):
            if frames != 1:
                raise MmsaeError(f"{self.model_id}: an image with {frames} frames; mmsae places single images only")
            width, height = inputs.layouts[i].image_size
            tiles[i] = [Tile((0.0, 0.0, float(width), float(height)), rows, cols)]
            patch = torch.arange(rows * cols)
            block, inner = patch // merge**2, patch % merge**2  # its merge block, and its place inside it
            block_row, block_col = block // (cols // merge), block % (cols // merge)
            parts.append((torch.full_like(patch, i), block_row * merge + inner // merge, block_col * merge + inner % merge))
        out = RowMap.empty(int(grid.prod(-1).sum()), tiles)
        if parts:
            sample, row, col = (torch.cat(p) for p in zip(*parts))
            order = self.vision_order(grid)
            if order is not None:
                sample, row, col = sample[order], row[order], col[order]
            out.sample, out.row, out.col = sample, row, col
            out.tile = torch.zeros_like(sample)
        return out

    def vision_order(self, grid: torch.Tensor) -> torch.Tensor | None:
        """Which patch (in ``image_grid_thw`` order) each tower row holds (None: the same order)."""
        return None


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor

    def vision_width(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    def window_index(self, grid: torch.Tensor) -> torch.Tensor:
        """The tower's window order: row k of its blocks holds merge unit ``window_index[k]``."""
        from transformers.vision_utils import get_vision_window_index  # (recent transformers only; Qwen2.5-VL needs it alone)

        tower = self.vision_tower()
        index, _ = get_vision_window_index(grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size, patch_size=tower.patch_size)
        return index.cpu()

    def vision_order(self, grid: torch.Tensor) -> torch.Tensor:
        # the blocks run on merge units permuted into attention windows (the merger's output is
        # put back in order only after the merger)
        unit = self.model.config.vision_config.spatial_merge_size ** 2
        return (self.window_index(grid)[:, None] * unit + torch.arange(unit)).flatten()

    def projector_order(self, inputs: ModelInputs) -> torch.Tensor:
        return self.window_index(inputs.inputs["image_grid_thw"].cpu())
