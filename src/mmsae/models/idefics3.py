"""Idefics3 and SmolVLM: image splitting into a grid of sub-images plus one global image.

The processor resizes the image, stretches it to a whole number of ``max_image_size`` squares,
cuts it into rows x cols sub-images, and adds the whole image squashed into one square (the
global image). Each sub-image's patches are pixel-shuffled (``scale_factor`` x ``scale_factor``
blocks into one token), so each frame gives a small square grid of tokens. In the text:
``<fake_token_around_image><row_r_col_c>`` + tokens for each sub-image, then
``<fake_token_around_image><global-img>`` + tokens. Tile 0 is the global image (as LLaVA-NeXT's
base image), tiles 1.. the sub-images row by row.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration, SmolVLMProcessor

from ..errors import MmsaeError
from .base import ModelInputs, RowMap, Tile, TokenLayout
from .common import ChatAdapter, rgb


class Idefics3Adapter(ChatAdapter):
    family = "idefics3"
    model_class = Idefics3ForConditionalGeneration

    def image_token_ids(self) -> list[int]:
        """The patch token, the frame markers and the row/column/global tags (when single tokens)."""
        tokenizer = self.tokenizer
        ids = {self.image_token_id}
        markers = [self.processor.fake_image_token, getattr(self.processor, "global_image_tag", "<global-img>")]
        markers += [f"<row_{r}_col_{c}>" for r in range(1, 9) for c in range(1, 9)]
        for marker in markers:
            token_id = tokenizer.convert_tokens_to_ids(marker)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                ids.add(int(token_id))
        return sorted(ids)

    def tokens_per_frame(self) -> tuple[int, int]:
        """(side, tokens) of one frame's token grid after the pixel shuffle."""
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
        return side, side * side

    def split_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of sub-images the processor cuts this image into (0, 0: global image only)."""
        _, rows, cols = self.processor.image_processor.get_number_of_image_patches(height, width, {})
        return rows, cols

    def image_sequence_layout(self, inputs, image_index, positions, size, text_positions) -> TokenLayout:
        side, per_frame = self.tokens_per_frame()
        width, height = size
        rows, cols = self.split_grid(width, height)
        frames = rows * cols + 1
        if positions.numel() != frames * per_frame:
            raise MmsaeError(f"{self.model_id}: found {positions.numel()} image tokens for a {width}x{height} image, expected {frames * per_frame} (one image per sequence)")
        tiles = [Tile((0.0, 0.0, float(width), float(height)), side, side)]
        for r in range(rows):
            for c in range(cols):
                tiles.append(Tile((c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows), side, side))
        # frames come sub-images first, global image last; tile 0 is the global image
        frame_tile = torch.tensor(list(range(1, frames)) + [0])
        cell = torch.arange(per_frame).repeat(frames)
        tile = frame_tile.repeat_interleave(per_frame)
        return TokenLayout(positions, tile, cell // side, cell % side, tiles, size, text_positions)

    def vision_rows(self, inputs: ModelInputs) -> RowMap:
        """The tower runs once per frame ([frames, patches, d], no CLS): the model drops the
        all-zero padding frames of ``pixel_values`` [B, frames, ...] and runs the rest in order,
        each image's sub-images row by row, then its global image (layout tiles 1.., then 0)."""
        pixels = inputs.inputs["pixel_values"]
        real = pixels.flatten(2).ne(0).any(-1).cpu()  # [B, frames]: as the model's real_images_inds
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        frames, tiles = [], []
        for i, layout in enumerate(inputs.layouts):
            n = int(real[i].sum())
            if n != len(layout.tiles):
                raise MmsaeError(f"{self.model_id}: sequence {i} has {n} image frames but {len(layout.tiles)} tiles of image tokens (one image per sequence)")
            tiles.append([Tile(t.box, side, side) for t in layout.tiles])
            frames += [(i, t) for t in (list(range(1, n)) + [0] if n else [])]
        return RowMap.of_frames(frames, tiles, self.vision_prefix_tokens())


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_class = SmolVLMForConditionalGeneration
    processor_class = SmolVLMProcessor

    def format_prompt(self, prompt: str, has_image: bool, add_generation_prompt: bool = True) -> str:
        # SmolVLMProcessor.apply_chat_template reads video settings even for images; the
        # tokenizer renders the same template without them
        if self._uses_template():
            return self.tokenizer.apply_chat_template(
                self._messages(prompt, has_image), chat_template=self.processor.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return super().format_prompt(prompt, has_image, add_generation_prompt)

    def _process(self, texts: list[str], images: list[Image.Image | None]) -> dict[str, torch.Tensor]:
        # SmolVLMProcessor wants one list of images per text
        nested = [[rgb(im)] if im is not None else [] for im in images]
        kwargs = dict(text=texts, padding=True, return_tensors="pt", add_special_tokens=not self._uses_template())
        if any(nested):
            kwargs["images"] = nested
        return dict(self.processor(**kwargs))
