"""LLaVA-OneVision: LLaVA-NeXT's base image + AnyRes crops, with the crop grid shrunk when large.

After unpadding, a joined crop grid with more than about ``anyres_max_N`` crops' worth of
features is bilinearly resized (``vision_aspect_ratio``); its tokens then no longer belong to
single crops, so the whole high-resolution grid becomes one tile over the unpadded region.
Otherwise the layout is LLaVA-NeXT's, one tile per crop. One image per sequence (the
multi-image mode, base image only, is not used by mmsae).
"""

from __future__ import annotations

import math

from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

from .base import Tile
from .llava_next import AnyResGeometry, LlavaNextAdapter, per_crop_cells


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor

    def high_res_cells(self, geo: AnyResGeometry) -> tuple[list[Tile], list[tuple[int, int, int]], int, int]:
        kept_h, kept_w = len(geo.kept_rows), len(geo.kept_cols)
        # the model's pack_image_features: shrink when the grid exceeds max_num_patches crops
        max_num_patches = int(self.model.config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(kept_h * kept_w / (max_num_patches * geo.side**2))
        if ratio <= 1.1:
            return per_crop_cells(geo)
        rows, cols = int(kept_h // ratio), int(kept_w // ratio)
        tile = Tile(geo.cells_box(geo.kept_rows, geo.kept_cols), rows, cols)
        return [tile], [(0, r, c) for r in range(rows) for c in range(cols)], rows, cols
