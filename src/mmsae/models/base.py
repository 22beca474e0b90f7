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
from .sites import Site, parse_site


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


@dataclass
class RowMap:
    """Where every row of a site's activation (flattened to [R, d]) lies, for one batch.

    Per row: ``sample``, ``tile``, ``row``, ``col`` (``row``/``col`` -1 where the row is no image
    patch; ``sample``/``tile`` -1 where it belongs to no image, e.g. text) and ``special``
    (a CLS/register token of its sample's tile). ``tiles[i]`` are sample i's grids.
    """

    sample: torch.Tensor  # long [R]
    tile: torch.Tensor  # long [R]
    row: torch.Tensor  # long [R]
    col: torch.Tensor  # long [R]
    special: torch.Tensor  # bool [R]
    tiles: list[list[Tile]]

    @classmethod
    def empty(cls, num_rows: int, tiles: list[list[Tile]]) -> RowMap:
        minus = lambda: torch.full((num_rows,), -1, dtype=torch.long)  # noqa: E731
        return cls(minus(), minus(), minus(), minus(), torch.zeros(num_rows, dtype=torch.bool), tiles)

    @classmethod
    def of_frames(cls, frames: list[tuple[int, int]], tiles: list[list[Tile]], prefix: int) -> RowMap:
        """Rows of a tower run on a batch of frames (one image or crop each), [frames, tokens, d].

        ``frames`` gives each frame's (sample, tile) in batch order; a frame holds ``prefix``
        special tokens, then its tile's grid row by row.
        """
        if prefix < 0:
            raise MmsaeError(f"the vision features drop {-prefix} patch token(s) of each tile (a 'default' feature strategy on a tower with no CLS token); mmsae cannot place them")
        out = cls.empty(0, tiles)
        parts = []
        for sample, tile in frames:
            grid = tiles[sample][tile]
            cell = torch.arange(grid.rows * grid.cols)
            n = prefix + cell.numel()
            none = torch.full((prefix,), -1, dtype=torch.long)
            parts.append((torch.full((n,), sample), torch.full((n,), tile), torch.cat([none, cell // grid.cols]), torch.cat([none, cell % grid.cols]),
                          torch.arange(n) < prefix))
        if parts:
            out.sample, out.tile, out.row, out.col, out.special = (torch.cat(p) for p in zip(*parts))
        return out

    @classmethod
    def of_sequences(cls, inputs: ModelInputs) -> RowMap:
        """Rows of a language-model activation [B, T, d]: row b * T + t is token t of sequence b."""
        batch, seq = inputs.input_ids.shape
        out = cls.empty(batch * seq, [layout.tiles for layout in inputs.layouts])
        for i, layout in enumerate(inputs.layouts):
            rows = i * seq + layout.positions
            out.sample[rows], out.tile[rows], out.row[rows], out.col[rows] = i, layout.tile, layout.row, layout.col
        return out


@dataclass
class SiteRows:
    """The image-patch rows of one site's activation for one batch, and where each lies.

    The activation captured at a site has the site's own shape (``lm:L``: [B, T, d]; a tower run
    per tile: [tiles, tokens, d]; Qwen2-VL's tower: [patches, d]); flattened to [R, d],
    ``index`` are the rows kept (image patches, plus CLS/register rows when asked for, marked by
    ``special`` and with row = col = -1), each with its ``sample``, ``tile``, ``row``, ``col``.
    ``layouts[i]`` is sample i's patches as a :class:`TokenLayout` whose ``positions`` are rows
    of the flattened activation, so ``image_heatmap(layouts[i], values)`` paints them.
    """

    site: Site
    num_rows: int  # R, the flattened activation's rows
    index: torch.Tensor  # long [N]
    sample: torch.Tensor  # long [N]
    tile: torch.Tensor  # long [N]
    row: torch.Tensor  # long [N]
    col: torch.Tensor  # long [N]
    special: torch.Tensor  # bool [N]
    layouts: list[TokenLayout]

    @classmethod
    def build(cls, site: Site, rows: RowMap, inputs: ModelInputs, include_special: bool = False) -> SiteRows:
        patch = rows.row >= 0
        index = torch.nonzero(patch | (rows.special if include_special else torch.zeros_like(patch))).flatten()
        layouts = []
        for i, layout in enumerate(inputs.layouts):
            mine = torch.nonzero(patch & (rows.sample == i)).flatten()
            layouts.append(TokenLayout(mine, rows.tile[mine], rows.row[mine], rows.col[mine], rows.tiles[i] if mine.numel() else [], layout.image_size))
        return cls(site, int(patch.numel()), index, rows.sample[index], rows.tile[index], rows.row[index], rows.col[index], rows.special[index], layouts)

    def take(self, activation: torch.Tensor) -> torch.Tensor:
        """The kept rows [N, d] of ``activation``, the site's activation for this batch."""
        flat = activation.reshape(-1, activation.shape[-1])
        if flat.shape[0] != self.num_rows:
            raise MmsaeError(f"{self.site}: the activation has {flat.shape[0]} rows but this batch has {self.num_rows} at that site; pass the activation captured at {self.site} for the same inputs")
        return flat[self.index.to(flat.device)]


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

    def vision_tower(self) -> torch.nn.Module:
        """The vision encoder (a one-line MmsaeError for a model without one)."""
        inner = getattr(self.model, "model", self.model)
        for name in ("vision_tower", "visual", "vision_model"):
            tower = getattr(inner, name, None)
            if tower is not None:
                return tower
        raise MmsaeError(f"{self.model_id} ({self.family}) has no vision tower to hook")

    def vision_layers(self) -> torch.nn.ModuleList:
        """The vision tower's transformer blocks (the first ModuleList inside the tower)."""
        for module in self.vision_tower().modules():
            if isinstance(module, torch.nn.ModuleList):
                return module
        raise MmsaeError(f"{self.model_id} ({self.family}) has no vision tower blocks to hook")

    def vision_layer_module(self, layer: int) -> torch.nn.Module:
        """The module whose output is the vision tower's residual stream after block ``layer``
        (the site ``vision:layer``)."""
        return self.site_module(Site.vision(layer))

    def hook_point(self, layer: int) -> str:
        """A stable name for the hook point, recorded in SAE configs and stores."""
        return f"language_model.layers.{layer}"

    # --- sites (see mmsae.models.sites) ------------------------------------------------------
    def projector(self) -> torch.nn.Module:
        """The multimodal projector: its output is the image features in the language model's width."""
        inner = getattr(self.model, "model", self.model)
        for name in ("multi_modal_projector", "connector"):
            module = getattr(inner, name, None)
            if module is not None:
                return module
        raise MmsaeError(f"projector: {self.model_id} ({self.family}) has no multimodal projector; its sites are {self.describe_sites()}")

    def deepest_vision_block_read(self) -> int:
        """The deepest vision-tower block whose output reaches the language model: the last one,
        unless the config selects earlier hidden states (LLaVA's ``vision_feature_layer``, an
        index into ``hidden_states``, whose entry i is the output of block i - 1)."""
        blocks = len(self.vision_layers())
        selected = getattr(self.model.config, "vision_feature_layer", None)
        if selected is None:
            return blocks - 1
        indices = selected if isinstance(selected, (list, tuple)) else [selected]
        return max((i if i >= 0 else blocks + 1 + i) - 1 for i in indices)

    def vision_width(self) -> int:
        """The width of the vision tower's residual stream."""
        return int(self.model.config.vision_config.hidden_size)

    def vision_prefix_tokens(self) -> int:
        """Tokens the vision tower puts before the patches of each image it sees: a CLS token
        (CLIP's ``class_embedding``, DINOv2's and ViT's ``cls_token``) and register tokens
        (DINOv2 with registers); SigLIP, Idefics3 and Qwen2-VL towers have none."""
        has_cls = any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in self.vision_tower().modules())
        return int(has_cls) + int(getattr(self.model.config.vision_config, "num_register_tokens", 0) or 0)

    def describe_sites(self) -> str:
        """The named sites this model has, for messages: "lm:0 to lm:31, vision:0 to vision:23, projector"."""
        parts = [f"lm:0 to lm:{self.num_layers - 1}"]
        if self.has_vision:
            parts += [f"vision:0 to vision:{len(self.vision_layers()) - 1}", "projector"]
        return ", ".join(parts)

    def _submodule(self, path: str) -> torch.nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def _module_of(self, site: Site) -> torch.nn.Module:
        """The module of a parsed site, or a one-line MmsaeError naming the site and what the model has."""
        if site.kind == "lm":
            n = self.num_layers
            if site.layer >= n:
                raise MmsaeError(f"{site} is out of range: the language model of {self.model_id} has {n} decoder layers (lm:0 to lm:{n - 1})")
            return self.decoder_layers()[site.layer]
        if site.kind in ("vision", "projector") and not self.has_vision:
            raise MmsaeError(f"{site}: {self.model_id} ({self.family}) is a text-only model with no vision tower or projector; its sites are {self.describe_sites()}")
        if site.kind == "vision":
            layers = self.vision_layers()
            if site.layer >= len(layers):
                raise MmsaeError(f"{site} is out of range: the vision tower of {self.model_id} has {len(layers)} blocks (vision:0 to vision:{len(layers) - 1})")
            return layers[site.layer]
        if site.kind == "projector":
            return self.projector()
        return self.model.get_submodule(site.path)  # (resolve_site has checked that it exists)

    def named_site_modules(self) -> dict[str, Site]:
        """The qualified module name of every named site of this model (decoder layers, vision
        blocks, projector) -> its site."""
        sites = [Site.lm(i) for i in range(self.num_layers)]
        if self.has_vision:
            sites += [Site.vision(i) for i in range(len(self.vision_layers()))] + [Site.projector()]
        wanted = {id(self._module_of(site)): site for site in sites}
        return {name: wanted[id(m)] for name, m in self.model.named_modules() if id(m) in wanted}

    def site_of_module(self, path: str) -> Site:
        """The site a module path of this model stands for.

        A path of this model names ``lm:L`` (decoder layer L), ``vision:L`` (vision block L),
        ``projector``, or else a module site. A path recorded against another root (an SAE saved
        on LLaVA-NeXT's ``model.layers.24``, or transformers 4's ``vision_tower.vision_model.
        encoder.layers.3`` where transformers 5 says ``model.vision_tower...``) is mapped by
        :func:`parse_site`'s released namings, else by a unique dotted-suffix match with a named
        site's module path. Anything else is a one-line MmsaeError.
        """
        named = self.named_site_modules()
        module = self._submodule(path)
        if module is not None:
            for name, site in named.items():
                if self.model.get_submodule(name) is module:
                    return site
            return Site.module(path)
        site = parse_site(path)
        if site.kind != "module":
            self._module_of(site)
            return site
        matches = {site for name, site in named.items() if name.endswith("." + path) or path.endswith("." + name)}
        if len(matches) == 1:
            return matches.pop()
        raise MmsaeError(f"{path!r} is not a module of {self.model_id}; use {self.describe_sites()} or a path from model.named_modules()")

    def resolve_site(self, site: Site | str | int) -> Site:
        """The canonical site ``site`` names in this model, checked to exist.

        Takes a :class:`Site`, a canonical name (``lm:24``, ``vision:3``, ``projector``), a layer
        number, a released SAE's recorded hook point (``model.layers.24``,
        ``blocks.24.hook_resid_post``) or a module path of this model (``model.language_model.
        layers.24`` -> ``lm:24``). Compare an SAE's recorded hook point with a site by
        ``adapter.resolve_site(recorded) == adapter.resolve_site(site)``.
        """
        if isinstance(site, str) and self._submodule(site.strip()) is not None:
            return self.site_of_module(site.strip())
        site = parse_site(site)
        if site.kind == "module":
            return self.site_of_module(site.path)
        self._module_of(site)
        return site

    def site_module(self, site: Site | str | int) -> torch.nn.Module:
        """The module whose output is ``site``'s activations (hook it with ``mmsae.hooks``)."""
        return self._module_of(self.resolve_site(site))

    def site_width(self, site: Site | str | int) -> int | None:
        """d at ``site``: the language model's hidden size for ``lm:L`` and ``projector``, the
        vision tower's for ``vision:L``; None for another module (take it from a captured activation)."""
        site = self.resolve_site(site)
        if site.kind in ("lm", "projector"):
            return self.hidden_size
        return self.vision_width() if site.kind == "vision" else None

    def site_rows(self, site: Site | str | int, inputs: ModelInputs, include_special: bool = False) -> SiteRows:
        """Which rows of ``site``'s activation for the batch ``inputs`` are image patches, and where.

        The activation captured at a site (``mmsae.hooks.run_sites``) is flattened to [R, d];
        see :class:`SiteRows`. ``include_special`` also returns the CLS/register rows (marked).
        """
        site = self.resolve_site(site)
        if site.kind == "lm":
            rows = RowMap.of_sequences(inputs)
        elif site.kind == "vision":
            rows = self.vision_rows(inputs)
        elif site.kind == "projector":
            rows = self.projector_rows(inputs)
        else:
            raise MmsaeError(f"{site}: mmsae knows no token geometry for this module; use one of {self.describe_sites()}")
        return SiteRows.build(site, rows, inputs, include_special)

    def vision_rows(self, inputs: ModelInputs) -> RowMap:
        """The row map of a vision block's activation for ``inputs`` (family-specific)."""
        raise MmsaeError(f"{self.model_id} ({self.family}) reports no vision-tower geometry")

    def projector_rows(self, inputs: ModelInputs) -> RowMap:
        """The row map of the projector's activation for ``inputs`` (family-specific)."""
        raise MmsaeError(f"{self.model_id} ({self.family}) reports no projector geometry")

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
