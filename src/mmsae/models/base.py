"""The interface every model family implements, and the image-token geometry it reports.

Everything model-specific lives in an adapter (one module per family under ``mmsae.models``).
The rest of mmsae only talks to :class:`ModelAdapter`, :class:`ModelInputs` and
:class:`TokenLayout`; there are no ``if "llava" in name`` branches anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import MmsaeError


@dataclass
class Tile:
    """One grid of image tokens and the part of the original image it covers.

    ``box`` is (x0, y0, x1, y1) in pixels of the *original* image (before any resize or pad);
    LLaVA-NeXT's base image is one tile covering the whole image, each AnyRes crop another.
    A box may reach outside the image where the processor padded it; those cells paint nothing.
    """

    box: tuple[float, float, float, float]
    rows: int
    cols: int


@dataclass
class TokenLayout:
    """Where the image tokens of one sequence sit, in the sequence and in the image.

    ``positions`` are sequence positions of image *patch* tokens (separator and newline tokens
    that carry no patch are excluded); ``tile``, ``row`` and ``col`` give each one's tile index
    and grid cell. ``text_positions`` are the non-image, non-padding positions.
    """

    positions: torch.Tensor  # long [P]
    tile: torch.Tensor  # long [P]
    row: torch.Tensor  # long [P]
    col: torch.Tensor  # long [P]
    tiles: list[Tile]
    image_size: tuple[int, int] | None  # (width, height) of the original image; None if no image
    text_positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def num_image_tokens(self) -> int:
        return int(self.positions.numel())


@dataclass
class ModelInputs:
    """A padded batch ready for ``adapter.model(**inputs)`` plus its per-sequence layouts."""

    inputs: dict[str, torch.Tensor]
    layouts: list[TokenLayout]
    # [batch, seq] True at the positions of the answer's tokens (when answers were given);
    # logits at position t-1 predict the token at t.
    answer_mask: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]


class ModelAdapter:
    """One model family: loading, the hookable layers, input building and token geometry.

    Subclasses set ``family`` and implement ``build_inputs`` and ``token_layouts``. ``model`` is
    the Hugging Face model, ``processor`` its processor (or tokenizer, for text-only models).
    """

    family: str = ""
    # Hugging Face model class the family loads with (set by subclasses).
    model_class: type | None = None
    # its processor class, for loading without the parts that need torchvision (videos)
    processor_class: type | None = None
    has_vision: bool = True
    # every sequence must carry an image (PaliGemma)
    requires_image: bool = False

    def __init__(self, model: torch.nn.Module, processor, model_id: str):
        self.model = model
        self.processor = processor
        self.model_id = model_id

    # --- structure -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def language_model(self) -> torch.nn.Module:
        """The text decoder (the module that owns ``layers``)."""
        return self.model.get_decoder()

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The language model's decoder layers; the output of layer L is the residual stream."""
        return self.language_model().layers

    def check_layer(self, layer: int) -> int:
        """``layer`` itself if it is a valid decoder layer index, else a one-line MmsaeError."""
        n = self.num_layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise MmsaeError(f"layer {layer!r} is out of range for {self.model_id}: it has {n} decoder layers, use 0..{n - 1}")
        return layer

    def layer_module(self, layer: int) -> torch.nn.Module:
        """The module whose output is the residual stream after decoder ``layer``.

        Its output equals ``output_hidden_states[layer + 1]`` (before the final norm).
        """
        return self.decoder_layers()[self.check_layer(layer)]

    def vision_layers(self) -> torch.nn.ModuleList:
        """The vision tower's transformer blocks (the first ModuleList inside the tower)."""
        inner = getattr(self.model, "model", self.model)
        for name in ("vision_tower", "visual", "vision_model"):
            tower = getattr(inner, name, None)
            if tower is not None:
                for module in tower.modules():
                    if isinstance(module, torch.nn.ModuleList):
                        return module
        raise MmsaeError(f"{self.model_id} ({self.family}) has no vision tower to hook")

    def vision_layer_module(self, layer: int) -> torch.nn.Module:
        """The module whose output is the vision tower's residual stream after block ``layer``."""
        layers = self.vision_layers()
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(layers):
            raise MmsaeError(f"vision layer {layer!r} is out of range for {self.model_id}: its vision tower has {len(layers)} blocks, use 0..{len(layers) - 1}")
        return layers[layer]

    def hook_point(self, layer: int) -> str:
        """A stable name for the hook point, recorded in SAE configs and stores."""
        return f"language_model.layers.{layer}"

    def logits(self, inputs: ModelInputs | dict, **kwargs) -> torch.Tensor:
        """The model's logits [B, T, V] for a built batch."""
        batch = inputs.inputs if isinstance(inputs, ModelInputs) else inputs
        return self.model(**batch, **kwargs).logits

    # --- inputs ----------------------------------------------------------------------------
    def build_inputs(
        self,
        images: list[Image.Image | None],
        prompts: list[str],
        answers: list[str] | None = None,
        add_generation_prompt: bool = True,
    ) -> ModelInputs:
        """Apply the chat template and processor to a batch (left-padded, on the model's device).

        With ``answers``, each answer's tokens follow the generation prompt and ``answer_mask``
        marks them. ``images[i]`` may be None for a text-only sequence.
        """
        raise NotImplementedError

    def token_layouts(self, inputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int] | None]) -> list[TokenLayout]:
        """The image-token geometry of each sequence of an already-built batch.

        ``image_sizes`` are the (width, height) of each sequence's original image (None: no image).
        """
        raise NotImplementedError


def image_heatmap(layout: TokenLayout, values: torch.Tensor | np.ndarray, combine: str = "max") -> np.ndarray:
    """Turn per-image-token values back into a [height, width] map over the original image.

    ``values`` has one entry per entry of ``layout.positions``. Each tile's grid is painted onto
    the pixels of its box (a pixel belongs to the cell its centre falls in); where tiles overlap
    (base image and AnyRes crops) they are combined by ``max`` or ``mean``. Pixels no tile
    covers are 0.
    """
    if layout.image_size is None:
        raise MmsaeError("image_heatmap needs a sequence with an image; this layout has none")
    if combine not in ("max", "mean"):
        raise MmsaeError(f"image_heatmap combine={combine!r} is not supported; use 'max' or 'mean'")
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != layout.num_image_tokens:
        raise MmsaeError(f"image_heatmap got {values.shape[0]} values for a layout with {layout.num_image_tokens} image tokens")
    width, height = layout.image_size
    tile_idx = layout.tile.cpu().numpy()
    rows_idx = layout.row.cpu().numpy()
    cols_idx = layout.col.cpu().numpy()

    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    best = np.full((height, width), -np.inf, dtype=np.float64)
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    for t, tile in enumerate(layout.tiles):
        if tile.rows == 0 or tile.cols == 0:  # a crop that unpadding removed entirely
            continue
        grid = np.full((tile.rows, tile.cols), np.nan)
        sel = tile_idx == t
        grid[rows_idx[sel], cols_idx[sel]] = values[sel]
        x0, y0, x1, y1 = tile.box
        col_of_x = np.floor((xs - x0) / (x1 - x0) * tile.cols).astype(np.int64)
        row_of_y = np.floor((ys - y0) / (y1 - y0) * tile.rows).astype(np.int64)
        x_in = (col_of_x >= 0) & (col_of_x < tile.cols)
        y_in = (row_of_y >= 0) & (row_of_y < tile.rows)
        if not x_in.any() or not y_in.any():
            continue
        ylo, yhi = np.flatnonzero(y_in)[[0, -1]]
        xlo, xhi = np.flatnonzero(x_in)[[0, -1]]
        patch = grid[np.ix_(row_of_y[ylo : yhi + 1], col_of_x[xlo : xhi + 1])]
        known = ~np.isnan(patch)
        region = (slice(ylo, yhi + 1), slice(xlo, xhi + 1))
        total[region] += np.where(known, patch, 0.0)
        count[region] += known
        best[region] = np.where(known, np.maximum(best[region], patch), best[region])
    covered = count > 0
    out = np.zeros((height, width), dtype=np.float32)
    if combine == "max":
        out[covered] = best[covered]
    else:
        out[covered] = total[covered] / count[covered]
    return out
