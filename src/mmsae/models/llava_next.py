"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): a base image plus AnyRes crops.

The processor resizes the image to fit the best grid resolution (keeping its aspect ratio),
pads it to that resolution, cuts it into crops, and also squashes the whole image into one
base crop. The model puts the base crop's patches first, then joins the crops' patch grids into
one big grid, removes the rows (or columns) that show only padding ("unpad"), and inserts an
``image_newline`` token after each row. Newline tokens carry no patch and are left out of the
layout; each crop is one tile whose box is the part of the original image its kept cells show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from ..errors import MmsaeError
from .base import ModelInputs, RowMap, Tile, TokenLayout
from .common import ChatAdapter
from .geometry import Box, size_value, resize_output_size


@dataclass
class AnyResGeometry:
    """How one image's high-resolution crops are laid out, in features and in original pixels."""

    side: int  # patch features per crop side
    crops_high: int
    crops_wide: int
    kept_rows: range  # rows of the joined feature grid that survive unpadding
    kept_cols: range
    cell_px: float  # canvas pixels per feature cell
    paste: tuple[int, int]  # (x, y) offset of the resized image on the padded canvas
    scale: tuple[float, float]  # original pixels per canvas pixel (x, y)

    def canvas_to_original(self, x0: float, y0: float, x1: float, y1: float) -> Box:
        px, py = self.paste
        sx, sy = self.scale
        return ((x0 - px) * sx, (y0 - py) * sy, (x1 - px) * sx, (y1 - py) * sy)

    def cells_box(self, rows: range, cols: range) -> Box:
        """The original-image box shown by a block of feature cells of the joined grid."""
        c = self.cell_px
        return self.canvas_to_original(cols.start * c, rows.start * c, cols.stop * c, rows.stop * c)


def anyres_geometry(width: int, height: int, image_processor, grid_pinpoints, vision_image_size: int, vision_patch: int) -> AnyResGeometry:
    """Reproduce the processor's resize-and-pad and the model's unpad for one (width, height) image."""
    best_h, best_w = select_best_resolution((height, width), grid_pinpoints)
    # image_processing_utils.get_patch_output_size: fit inside the best resolution
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), best_w), best_h
    paste = ((best_w - new_w) // 2, (best_h - new_h) // 2)
    side = vision_image_size // vision_patch
    # the model's get_anyres_image_grid_shape divides by the vision tower's image size
    crops_high, crops_wide = best_h // vision_image_size, best_w // vision_image_size
    cur_h, cur_w = crops_high * side, crops_wide * side
    # the model's unpad_image, on the joined feature grid
    kept_rows, kept_cols = range(cur_h), range(cur_w)
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(round(height * (cur_w / width), 7))) // 2
        kept_rows = range(pad, cur_h - pad)
    else:
        pad = (cur_w - int(round(width * (cur_h / height), 7))) // 2
        kept_cols = range(pad, cur_w - pad)
    crop_px = _processor_crop_px(image_processor)
    return AnyResGeometry(side, crops_high, crops_wide, kept_rows, kept_cols, crop_px / side, paste, (width / new_w, height / new_h))


def _processor_crop_px(image_processor) -> int:
    """The crop size in canvas pixels (the processor's ``patch_size`` in ``_preprocess``)."""
    crop, size = image_processor.crop_size, image_processor.size
    return int(size_value(crop, "height") or size_value(size, "height") or size_value(size, "shortest_edge"))


def base_tile_box(width: int, height: int, image_processor) -> Box:
    """The base crop is the whole image squashed to ``size``, then (optionally) centre-cropped."""
    size = image_processor.size
    side_h = size_value(size, "height") or size_value(size, "shortest_edge")
    side_w = size_value(size, "width") or size_value(size, "shortest_edge")
    canvas_w, canvas_h = resize_output_size(side_w, side_h, size)
    box = (0.0, 0.0, float(width), float(height))
    crop = image_processor.crop_size
    if getattr(image_processor, "do_center_crop", False) and crop is not None and size_value(crop, "height"):
        ch, cw = int(size_value(crop, "height")), int(size_value(crop, "width"))
        top, left = int((canvas_h - ch) / 2.0), int((canvas_w - cw) / 2.0)
        sx, sy = width / canvas_w, height / canvas_h
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    return box


def per_crop_cells(geo: AnyResGeometry) -> tuple[list[Tile], list[tuple[int, int, int]], int, int]:
    """Tiles (one per crop, in the processor's crop order), each kept cell's (tile, row, col),
    and the joined grid's rows and columns.

    Cells come in the model's token order: kept rows top to bottom, kept columns left to right.
    """
    tiles, tile_of_band = [], {}
    for i in range(geo.crops_high):
        band_rows = range(max(i * geo.side, geo.kept_rows.start), min((i + 1) * geo.side, geo.kept_rows.stop))
        for j in range(geo.crops_wide):
            band_cols = range(max(j * geo.side, geo.kept_cols.start), min((j + 1) * geo.side, geo.kept_cols.stop))
            tile_of_band[i, j] = (len(tiles), band_rows.start, band_cols.start)
            rows, cols = max(len(band_rows), 0), max(len(band_cols), 0)
            box = geo.cells_box(band_rows, band_cols) if rows and cols else (0.0, 0.0, 0.0, 0.0)
            tiles.append(Tile(box, rows, cols))
    cells = []
    for r in geo.kept_rows:
        for c in geo.kept_cols:
            t, r0, c0 = tile_of_band[r // geo.side, c // geo.side]
            cells.append((t, r - r0, c - c0))
    return tiles, cells, len(geo.kept_rows), len(geo.kept_cols)


class LlavaNextAdapter(ChatAdapter):
    family = "llava_next"
    model_class = LlavaNextForConditionalGeneration

    def vision_sizes(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        return vision.image_size, vision.patch_size

    def high_res_cells(self, geo: AnyResGeometry) -> tuple[list[Tile], list[tuple[int, int, int]], int, int]:
        """Tiles after the base tile, the (tile, row, col) of each high-res token in order, and
        the rows and columns of the high-res token grid (a newline token ends each row)."""
        return per_crop_cells(geo)

    def image_layout(self, positions: torch.Tensor, size: tuple[int, int]) -> tuple[list[Tile], list[tuple[int, int, int]], torch.Tensor]:
        """Tiles, cells and the patch positions (newlines removed) of one image's tokens."""
        image_size, patch = self.vision_sizes()
        width, height = size
        ip = self.processor.image_processor
        geo = anyres_geometry(width, height, ip, self.model.config.image_grid_pinpoints, image_size, patch)
        side = geo.side
        base = [(0, r, c) for r in range(side) for c in range(side)]
        high_tiles, high_cells, n_rows, n_cols = self.high_res_cells(geo)
        expected = len(base) + n_rows * (n_cols + 1)
        if positions.numel() != expected:
            raise MmsaeError(f"{self.model_id}: found {positions.numel()} image tokens for a {width}x{height} image, expected {expected} (one image per sequence)")
        # drop the newline token after each high-res row
        high_positions = positions[len(base) :].reshape(n_rows, n_cols + 1)[:, :n_cols].reshape(-1)
        tiles = [Tile(base_tile_box(width, height, ip), side, side)] + high_tiles
        cells = base + [(t + 1, r, c) for t, r, c in high_cells]
        return tiles, cells, torch.cat([positions[: len(base)], high_positions])

    def image_sequence_layout(self, inputs, image_index, positions, size, text_positions) -> TokenLayout:
        tiles, cells, patch_positions = self.image_layout(positions, size)
        cell = torch.tensor(cells, dtype=torch.long)
        return TokenLayout(patch_positions, cell[:, 0], cell[:, 1], cell[:, 2], tiles, size, text_positions)

    def crop_tiles(self, size: tuple[int, int]) -> list[Tile]:
        """The grids the vision tower sees for one image: the base image, then every AnyRes crop
        (row by row) whole, padding included: a crop's box may reach outside the image."""
        image_size, patch = self.vision_sizes()
        width, height = size
        ip = self.processor.image_processor
        geo = anyres_geometry(width, height, ip, self.model.config.image_grid_pinpoints, image_size, patch)
        side = geo.side
        tiles = [Tile(base_tile_box(width, height, ip), side, side)]
        for i in range(geo.crops_high):
            for j in range(geo.crops_wide):
                tiles.append(Tile(geo.cells_box(range(i * side, (i + 1) * side), range(j * side, (j + 1) * side)), side, side))
        return tiles

    def crop_rows(self, inputs: ModelInputs, prefix: int) -> RowMap:
        """Rows of a per-crop activation [crops of the batch, prefix + side * side, d]."""
        tiles = [self.crop_tiles(layout.image_size) if layout.image_size is not None else [] for layout in inputs.layouts]
        return RowMap.of_frames([(i, t) for i, crops in enumerate(tiles) for t in range(len(crops))], tiles, prefix)

    def vision_rows(self, inputs: ModelInputs) -> RowMap:
        """The tower runs once per crop (base image first): each crop's full patch grid."""
        return self.crop_rows(inputs, self.vision_prefix_tokens())

    def projector_rows(self, inputs: ModelInputs) -> RowMap:
        """The projector maps each crop's features as the tower gave them (CLS dropped by the
        "default" feature strategy): per-crop grids like the vision rows. Unpadding, newline tokens
        (and OneVision's shrinking) happen after the projector, in ``pack_image_features``."""
        drop = 1 if self.model.config.vision_feature_select_strategy == "default" else 0
        return self.crop_rows(inputs, self.vision_prefix_tokens() - drop)
