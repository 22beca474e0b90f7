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


@dataclass
class Tile:
    """One grid of image tokens and the part of the original image it covers.

    ``box`` is (x0, y0, x1, y1) in pixels of the *original* image (before any resize or pad);
    LLaVA-NeXT's base image is one tile covering the whole image, each AnyRes crop another.
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


@dataclass
class ModelInputs:
    """A padded batch ready for ``adapter.model(**inputs)`` plus its per-sequence layouts."""

    inputs: dict[str, torch.Tensor]
    layouts: list[TokenLayout]
    # [batch, seq] True at the positions of the answer's tokens (when answers were given);
    # logits at position t-1 predict the token at t.
    answer_mask: torch.Tensor | None = None


class ModelAdapter:
    """One model family: loading, the hookable layers, input building and token geometry.

    Subclasses set ``family`` and implement the methods below. ``model`` is the Hugging Face
    model, ``processor`` its processor (or tokenizer, for text-only models).
    """

    family: str = ""

    def __init__(self, model: torch.nn.Module, processor, model_id: str):
        self.model = model
        self.processor = processor
        self.model_id = model_id

    # --- structure -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The language model's decoder layers; the output of layer L is the residual stream."""
        raise NotImplementedError

    def layer_module(self, layer: int) -> torch.nn.Module:
        """The module whose output (first element, if a tuple) is the residual stream after ``layer``."""
        raise NotImplementedError

    def hook_point(self, layer: int) -> str:
        """A stable name for the hook point, recorded in SAE configs and stores."""
        return f"language_model.layers.{layer}"

    # --- inputs ----------------------------------------------------------------------------
    def build_inputs(
        self,
        images: list[Image.Image | None],
        prompts: list[str],
        answers: list[str] | None = None,
        add_generation_prompt: bool = True,
    ) -> ModelInputs:
        """Apply the chat template and processor to a batch (left-padded, on the model's device)."""
        raise NotImplementedError

    def token_layouts(self, inputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int] | None]) -> list[TokenLayout]:
        """The image-token geometry of each sequence of an already-built batch."""
        raise NotImplementedError


def image_heatmap(layout: TokenLayout, values: torch.Tensor | np.ndarray, combine: str = "max") -> np.ndarray:
    """Turn per-image-token values back into a [height, width] map over the original image.

    ``values`` has one entry per entry of ``layout.positions``. Each tile's grid is painted onto
    the pixels of its box; where tiles overlap (base image and AnyRes crops) they are combined by
    ``max`` or ``mean``.
    """
    raise NotImplementedError
