"""The intervention layer: SAEs spliced in at their sites, and everything done through them.

At a site's output ``x`` an SAE gives latents ``a = encode(x)``; what the model then sees is

    x + (decode(a') - decode(a))            edits: a' is a with features clamped, added to or scaled
    decode(a) + (x - decode(a)).detach()    grad: the same value, with ``a`` a leaf gradients reach
    where(rows, decode(a) or 0, x)          replace: the spliced / zero-ablated model (evaluate)

so with no edit the model is *exactly* the clean model (the SAE's error term is kept). Every
stage goes through here: steer (edits at prefill and at every decode step, on a span), attribute
(grad, and ablation by per-sequence clamps to 0), evaluate (replace), index and the notebook
face (the latents per token with their layout). A site is ``lm:L``, ``vision:L`` or
``projector`` (``mmsae.models.sites``); a ``vision:L`` or ``projector`` SAE edits the image
features the language model then reads, so steering through one changes the answer.

Notebook use::

    import mmsae
    model = mmsae.load_adapter("llava-hf/llava-v1.6-mistral-7b-hf")
    sae = mmsae.load_sae("RUN/sae")
    run = mmsae.run_with_saes(model, [sae], image, "Describe the image.")
    run.latents[sae].top_features()        # [(feature, max activation over the image), ...]
    heat = run.latents[sae].heatmap(123)   # [height, width] over the image
    mmsae.generate(model, image, "What colour is the shape?", {sae: [mmsae.Intervention(123, 40.0)]})
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .errors import MmsaeError
from .hooks import edit
from .models.base import ModelAdapter, ModelInputs, SiteRows, TokenLayout, image_heatmap
from .models.sites import Site, check_sae_site

Mode = Literal["clamp", "add", "scale"]
Span = Literal["all", "image", "text", "prompt", "generated"]
MODES = ("clamp", "add", "scale")
SPANS = ("all", "image", "text", "prompt", "generated")


@dataclass
class Intervention:
    """One feature edit: ``clamp`` sets the activation to ``value``, ``add`` adds ``value``
    (times the feature's decoder direction), ``scale`` multiplies the activation by ``value``.
    ``batch_row`` limits it to one sequence of the batch (None: every sequence)."""

    feature: int
    value: float
    mode: Mode = "clamp"
    batch_row: int | None = None


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (edits of bfloat16 states are computed in float32; float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def sae_device(sae) -> torch.device:
    return next(sae.parameters()).device


def check_features(sae, features: Sequence[int]) -> None:
    n = sae.cfg.num_latents
    for f in features:
        if not 0 <= int(f) < n:
            raise MmsaeError(f"feature {f} is out of range: the SAE has {n} latents (0..{n - 1})")


def decoder_directions(sae, features: Sequence[int]) -> torch.Tensor:
    """Each feature's decoder direction [F, d] in float32, whatever the SAE's parameterisation."""
    onehot = torch.zeros(len(features), sae.cfg.num_latents, device=sae_device(sae))
    onehot[torch.arange(len(features)), torch.as_tensor(list(features), dtype=torch.long)] = 1.0
    with torch.no_grad():
        directions = sae.decode(onehot) - sae.decode(torch.zeros_like(onehot))
    return directions.to(work_dtype(directions.dtype))


def feature_values(values: torch.Tensor, indices: torch.Tensor, features: Sequence[int]) -> torch.Tensor:
    """The activations of ``features`` [.., F] from sparse latents (values, indices) [.., k]."""
    wanted = torch.as_tensor(list(features), dtype=indices.dtype, device=indices.device)
    return (values.unsqueeze(-1) * (indices.unsqueeze(-1) == wanted)).sum(-2)


# --- which rows of a site's activation an operation covers --------------------------------------


class Rows:
    """Which rows of a site's activation are covered, call by call, and which sequence each is.

    At an ``lm`` site the activation is [B, T, d]; across a ``generate`` call a call with more
    than one token is a new pass from position 0 (prefill or a plain forward) and a one-token
    call continues it (a decode step). ``prompt`` [B, T0] marks the covered prompt positions
    (None: all), ``generated`` whether positions past the prompt are covered. At a vision or
    projector site every call is the image encoding of the batch: ``flat`` [R] marks the covered
    rows of the activation flattened to [R, d] and ``flat_sample`` [R] each row's sequence.
    """

    def __init__(self, prompt: torch.Tensor | None = None, generated: bool = True,
                 flat: torch.Tensor | None = None, flat_sample: torch.Tensor | None = None, site: Site | None = None):
        self.prompt, self.generated = prompt, generated
        self.flat, self.flat_sample, self.site = flat, flat_sample, site
        self.position = 0

    @classmethod
    def of_site_rows(cls, rows: SiteRows, copies: int = 1) -> Rows:
        """The rows ``rows`` keeps (a vision or projector site's, for one batch) covered, in each
        of ``copies`` copies of that batch laid one after another (copy c's sequences numbered
        after copy c-1's)."""
        flat = torch.zeros(rows.num_rows, dtype=torch.bool)
        flat[rows.index] = True
        sample = torch.full((rows.num_rows,), -1, dtype=torch.long)
        sample[rows.index] = rows.sample
        sequences = len(rows.layouts)
        copied = torch.cat([torch.where(sample >= 0, sample + c * sequences, sample) for c in range(copies)])
        return cls(flat=flat.repeat(copies), flat_sample=copied, site=rows.site)

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(covered, sequence) for this call, each shaped like ``hidden`` without its last dim."""
        lead, device = hidden.shape[:-1], hidden.device
        if self.flat is not None:
            if self.flat.numel() != lead.numel():
                raise MmsaeError(f"{self.site}: this call has {lead.numel()} rows but the batch the SAE was attached for has "
                                 f"{self.flat.numel()}; attach it for the inputs being run")
            return self.flat.to(device).reshape(lead), self.flat_sample.to(device).reshape(lead)
        if len(lead) != 2:
            raise MmsaeError(f"{self.site}: expected a [batch, tokens, d] activation, got shape {tuple(hidden.shape)}")
        batch, length = lead
        sample = torch.arange(batch, device=device).unsqueeze(1).expand(batch, length)
        start = 0 if length > 1 else self.position
        self.position = start + length
        if self.prompt is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device), sample
        covered = torch.full((batch, length), self.generated, dtype=torch.bool, device=device)
        in_prompt = max(0, min(self.prompt.shape[1], start + length) - start)
        if in_prompt:
            covered[:, :in_prompt] = self.prompt[:, start:start + in_prompt].to(device)
        return covered, sample


def site_rows_mask(adapter: ModelAdapter, site: Site, inputs: ModelInputs | None, span: str = "all") -> Rows:
    """The rows of ``site``'s activation that ``span`` covers for the batch ``inputs``.

    ``lm`` sites: ``all`` (every real prompt token and every generated one), ``image``
    (image-patch tokens), ``text`` (text tokens and generated ones), ``prompt`` (the prefill
    only), ``generated`` (decode steps only); padding is never covered. Vision and projector
    sites hold image patches only: ``all``, ``image`` and ``prompt`` cover every patch row (CLS
    and register rows never). Without ``inputs`` only ``all`` is possible (every row).
    """
    if span not in SPANS:
        raise MmsaeError(f"span '{span}' is not one of {', '.join(SPANS)}")
    if site.kind in ("vision", "projector"):
        if span not in ("all", "image", "prompt"):
            raise MmsaeError(f"span '{span}' covers nothing at {site}, which holds image patches only; use span all or image")
        if inputs is None:
            raise MmsaeError(f"an SAE at {site} needs the batch's inputs to know which rows are image patches")
        return Rows.of_site_rows(adapter.site_rows(site, inputs))
    if inputs is None:
        if span != "all":
            raise MmsaeError(f"span '{span}' needs the batch's inputs (to know which positions are image/text/prompt)")
        return Rows(site=site)
    return Rows(prompt=span_positions(inputs, span).cpu(), generated=span in ("all", "text", "generated"), site=site)


def span_positions(inputs: ModelInputs, span: str) -> torch.Tensor:
    """[batch, seq] True at the positions of the built batch ``inputs`` that ``span`` covers:
    ``all`` / ``prompt`` every real token, ``image`` the image-patch tokens, ``text`` the text
    tokens, ``generated`` none (padding never); on the batch's device."""
    attention = inputs.attention_mask.bool()
    if span in ("all", "prompt"):
        return attention.clone()
    positions = torch.zeros_like(attention)
    if span in ("image", "text"):
        for b, layout in enumerate(inputs.layouts):
            positions[b, (layout.positions if span == "image" else layout.text_positions).to(positions.device)] = True
    return positions & attention


# --- the hook -------------------------------------------------------------------------------------


class SaeSplice:
    """The function run on a site's output: encodes, records, edits, replaces, lets gradients in.

    ``interventions`` are applied on the ``rows`` covered; ``replace`` ("sae" or "zero") puts the
    reconstruction or zeros at the covered rows instead; ``grad`` makes the latents a leaf
    (``latents[-1][0]`` after the call) with the error term detached; ``record`` keeps each
    call's latents (values, indices), shaped like the activation with k last.
    """

    def __init__(self, sae, site: Site, rows: Rows, interventions: Sequence[Intervention] = (),
                 replace: str | None = None, grad: bool = False, record: bool = False):
        for iv in interventions:
            if iv.mode not in MODES:
                raise MmsaeError(f"mode '{iv.mode}' is not one of {', '.join(MODES)}")
        if replace not in (None, "sae", "zero"):
            raise MmsaeError(f"replace={replace!r} is not one of sae, zero")
        check_features(sae, [iv.feature for iv in interventions])
        self.sae, self.site, self.rows = sae, site, rows
        self.interventions = list(interventions)
        self.replace, self.grad, self.record = replace, grad, record
        self.directions = decoder_directions(sae, [iv.feature for iv in interventions]) if interventions else None
        self.latents: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        covered, sample = self.rows(hidden)
        acts_on = bool(self.interventions or self.replace) and bool(covered.any())
        if not (acts_on or self.grad or self.record):
            return hidden  # off-span calls stay bit-exact and cost nothing
        x = hidden.to(work_dtype(hidden.dtype))
        out = x
        if self.grad or self.record or (self.interventions and acts_on):  # (a plain replace needs no codes)
            with torch.no_grad():
                values, indices = self.sae.encode_sparse(x.to(sae_device(self.sae)))
            values, indices = values.to(x), indices.to(x.device)
        if self.grad:
            values = values.detach().requires_grad_(True)
            recon = self.sae.decode_sparse(values, indices).to(x)
            out = recon + (x - recon).detach()
        if self.record or self.grad:
            self.latents.append((values if self.grad else values.detach(), indices))
        if self.replace and acts_on:
            with torch.no_grad():
                new = self.sae(x.to(sae_device(self.sae))).to(x) if self.replace == "sae" else torch.zeros_like(x)
            out = torch.where(covered.unsqueeze(-1), new, out)
        if self.interventions and acts_on:
            old = feature_values(values.detach(), indices, [iv.feature for iv in self.interventions])
            new = old.clone()
            for i, iv in enumerate(self.interventions):
                new[..., i] = iv.value if iv.mode == "clamp" else old[..., i] + iv.value if iv.mode == "add" else old[..., i] * iv.value
            where = covered.unsqueeze(-1).expand_as(old).clone()
            for i, iv in enumerate(self.interventions):
                if iv.batch_row is not None:
                    where[..., i] &= sample == iv.batch_row
            coef = (new - old) * where  # zero off the rows: those hidden states stay bit-exact
            out = out + coef @ self.directions.to(x)
        return out.to(hidden.dtype)


@contextmanager
def spliced(adapter: ModelAdapter, sae, inputs: ModelInputs | None = None, *, site: Site | str | int | None = None,
            interventions: Sequence[Intervention] = (), span: str = "all", rows: Rows | None = None,
            replace: str | None = None, grad: bool = False, record: bool = False) -> Iterator[SaeSplice]:
    """Splice ``sae`` in at its site (checked against the model) for the forward passes run inside.

    ``inputs`` is the batch about to be run (needed for any span but ``all`` at an lm site, and
    at vision and projector sites); ``rows`` overrides ``span`` with an explicit selection. Use
    one block per batch or ``generate`` call.
    """
    site = check_sae_site(sae, adapter, site)
    read = adapter.deepest_vision_block_read() if site.kind == "vision" and (interventions or replace or grad) else None
    if read is not None and site.layer > read:
        raise MmsaeError(f"{site} of {adapter.model_id} comes after vision:{read}, the deepest block the language model reads: "
                         f"an edit there cannot change the answer; use an SAE at vision:{read} or earlier")
    hook = SaeSplice(sae, site, rows if rows is not None else site_rows_mask(adapter, site, inputs, span),
                     interventions, replace, grad, record)
    with edit(adapter.site_module(site), hook):
        yield hook


# --- the notebook face ----------------------------------------------------------------------------


@dataclass
class SiteLatents:
    """An SAE's latents over one batch: ``values``/``indices`` [R, k] for the site's activation
    flattened to rows; ``layouts[i]`` places sequence i's image-patch rows (its ``positions`` are
    rows of R) and ``text_rows[i]`` its text-token rows (none at vision and projector sites)."""

    site: Site
    values: torch.Tensor
    indices: torch.Tensor
    layouts: list[TokenLayout]
    text_rows: list[torch.Tensor]
    num_latents: int

    def feature(self, feature: int) -> torch.Tensor:
        """The feature's activation at every row [R]."""
        return feature_values(self.values, self.indices, [feature])[..., 0]

    def heatmap(self, feature: int, sample: int = 0) -> np.ndarray:
        """The feature's activation over sequence ``sample``'s image, [height, width] in pixels."""
        layout = self.layouts[sample]
        return image_heatmap(layout, self.feature(feature)[layout.positions].float().cpu())

    def top_features(self, sample: int = 0, n: int = 10, on: str = "image") -> list[tuple[int, float]]:
        """The ``n`` features with the largest activation over the sample's image patches (or text)."""
        rows = self.layouts[sample].positions if on == "image" else self.text_rows[sample]
        best = torch.zeros(self.num_latents, dtype=torch.float32)
        best.scatter_reduce_(0, self.indices[rows].flatten().cpu(), self.values[rows].flatten().float().cpu(), "amax")
        order = best.argsort(descending=True)[:n]
        return [(int(f), float(best[f])) for f in order if best[f] > 0]


def site_latents(adapter: ModelAdapter, site: Site, inputs: ModelInputs, values: torch.Tensor, indices: torch.Tensor,
                 num_latents: int) -> SiteLatents:
    """Latents recorded at ``site`` for ``inputs`` (shaped like the activation, k last) with their layout."""
    k = values.shape[-1]
    values, indices = values.detach().reshape(-1, k), indices.reshape(-1, k)
    return SiteLatents(site, values, indices, *flat_layouts(adapter, site, inputs), num_latents)


def flat_layouts(adapter: ModelAdapter, site: Site, inputs: ModelInputs) -> tuple[list[TokenLayout], list[torch.Tensor]]:
    """Where each sequence of ``inputs`` lies among the rows of ``site``'s activation flattened to
    [R, d]: per sequence a TokenLayout of its image patches (``positions`` are rows of R) and its
    text-token rows (none at vision and projector sites)."""
    if site.kind == "lm":
        seq = inputs.input_ids.shape[1]
        layouts = [TokenLayout(lt.positions.cpu() + b * seq, lt.tile, lt.row, lt.col, lt.tiles, lt.image_size)
                   for b, lt in enumerate(inputs.layouts)]
        return layouts, [lt.text_positions.cpu() + b * seq for b, lt in enumerate(inputs.layouts)]
    layouts = adapter.site_rows(site, inputs).layouts
    return layouts, [torch.zeros(0, dtype=torch.long) for _ in layouts]


@dataclass
class Run:
    """One forward pass with SAEs attached: the inputs, the logits, and each SAE's latents."""

    inputs: ModelInputs
    logits: torch.Tensor
    latents: Mapping  # SAE -> SiteLatents (also by site name)


def _build(adapter: ModelAdapter, images, prompts) -> ModelInputs:
    """A batch of ``prompts`` with ``images`` (one each, one for all, or None)."""
    prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    return adapter.build_inputs(images * len(prompts) if len(images) == 1 else images, prompts)


@contextmanager
def attached(adapter: ModelAdapter, saes: Sequence | Mapping, inputs: ModelInputs | None = None, span: str = "all",
             record: bool = False) -> Iterator[list[SaeSplice]]:
    """Several SAEs spliced in at once: ``saes`` is a list (nothing edited) or a mapping from each
    SAE to its interventions."""
    edits = saes if isinstance(saes, Mapping) else {sae: () for sae in saes}
    with ExitStack() as stack:
        yield [stack.enter_context(spliced(adapter, sae, inputs, interventions=list(ivs), span=span, record=record))
               for sae, ivs in edits.items()]


def run_with_saes(adapter: ModelAdapter, saes, images, prompts, span: str = "all") -> Run:
    """Run ``prompts`` (with ``images``: one each, or None) with the SAEs attached; return the
    logits and each SAE's latents per token with their layout. ``saes``: an SAE, a list of them,
    or a mapping from each SAE to the interventions to apply while running."""
    inputs = _build(adapter, images, prompts)
    mapping = saes if isinstance(saes, Mapping) else {sae: () for sae in (saes if isinstance(saes, (list, tuple)) else [saes])}
    with torch.no_grad(), attached(adapter, mapping, inputs, span, record=True) as hooks:
        logits = adapter.model(**inputs.inputs, use_cache=False).logits
    latents: dict = {}
    for sae, hook in zip(mapping, hooks):
        values, indices = hook.latents[0]
        latents[sae] = latents[str(hook.site)] = site_latents(adapter, hook.site, inputs, values, indices, sae.cfg.num_latents)
    return Run(inputs, logits, latents)


@dataclass
class Generation:
    sequences: torch.Tensor  # [B, prompt + new] token ids
    new_tokens: torch.Tensor  # [B, new]
    new_mask: torch.Tensor  # [B, new] True up to and including the first end-of-sequence token
    texts: list[str]


def generate_inputs(adapter: ModelAdapter, inputs: ModelInputs, max_new_tokens: int = 32, saes=None,
                    span: str = "all") -> Generation:
    """Greedy generation for a built batch; ``saes`` maps each SAE to the interventions applied
    (at prefill and every decode step, on ``span``), or is None for the clean model."""
    tok = adapter.tokenizer
    eos = adapter.model.generation_config.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    with torch.no_grad(), attached(adapter, saes or {}, inputs, span):
        seq = adapter.model.generate(**inputs.inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = seq[:, inputs.input_ids.shape[1]:]
    eos_ids = torch.as_tensor(eos if isinstance(eos, list) else [eos] if eos is not None else [], device=new.device)
    is_eos = torch.isin(new, eos_ids) if len(eos_ids) else torch.zeros_like(new, dtype=torch.bool)
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before each position
    new_mask = before == 0
    texts = [tok.decode(row[m], skip_special_tokens=True).strip() for row, m in zip(new, new_mask)]
    return Generation(seq, new, new_mask, texts)


def generate(adapter: ModelAdapter, images, prompts, saes=None, max_new_tokens: int = 32, span: str = "all") -> list[str]:
    """Greedy replies to ``prompts`` (with ``images``: one each, one for all, or None), with the
    interventions ``saes`` maps each SAE to (see :func:`generate_inputs`)."""
    return generate_inputs(adapter, _build(adapter, images, prompts), max_new_tokens, saes, span).texts
