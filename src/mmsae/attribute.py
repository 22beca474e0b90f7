"""Attribution: which features, at which image patches and text tokens, drive an answer.

One forward and one backward pass. At the SAE's hook point the hidden state ``x`` is replaced by
``decode(latents) + (x - decode(latents)).detach()``: the same value (the error term is kept),
but the latents are a leaf the gradient reaches. The attribution of feature ``f`` at position
``t`` is ``a[t, f] * d objective / d a[t, f]``, the first-order estimate of what zeroing it
there would remove. The objective is the answer's log-probability (summed over its tokens) or,
with a contrast answer, the logit difference between the two answers' first tokens.

The released code ran two forwards and one backward *per feature*; here every feature at every
position comes from the same pass (``bench/bench_attribute.py`` measures the difference), and
the top features' estimates are checked against really ablating each one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import check_config
from .errors import MmsaeError
from .intervene import Intervention, Rows, site_latents, spliced, work_dtype
from .io import atomic_path, check_own_file, ensure_dir, write_json
from .models.sites import check_sae_site, site_record
from .runtime import out_of_memory_guard
from .steer import load_images, load_model_and_sae

ATTRIBUTION_KEYS = ("objective", "top_features")  # every attribution.json carries these


# --- the objective ----------------------------------------------------------------------------


@dataclass
class AnswerObjective:
    """What is differentiated: built from the answer (and optional contrast) tokens of ``inputs``."""

    inputs: object  # ModelInputs of prompt + answer, batch 1
    answer_positions: torch.Tensor  # [A] sequence positions of the answer's tokens
    answer_tokens: torch.Tensor  # [A]
    contrast_token: int | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T, V] logits -> [B] objective (rows may be copies of the same sequence)."""
        pred = logits[:, self.answer_positions - 1].to(work_dtype(logits.dtype))  # logits at t-1 predict the token at t
        if self.contrast_token is not None:
            return pred[:, 0, int(self.answer_tokens[0])] - pred[:, 0, self.contrast_token]
        logp = torch.log_softmax(pred, dim=-1)
        return logp.gather(-1, self.answer_tokens.view(1, -1, 1).expand(len(logp), -1, 1)).squeeze(-1).sum(-1)

    @property
    def kind(self) -> str:
        return "logit_difference" if self.contrast_token is not None else "log_probability"


def _answer_span(inputs, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    mask = inputs.answer_mask
    if mask is None or not bool(mask[0].any()):
        raise MmsaeError(f"the answer {answer!r} tokenises to nothing; give a non-empty answer")
    positions = mask[0].nonzero().flatten()
    return positions, inputs.inputs["input_ids"][0, positions]


def build_objective(adapter, image, prompt: str, answer: str, contrast: str | None = None) -> AnswerObjective:
    """Inputs with the answer appended, and the objective over them."""
    if not answer.strip():
        raise MmsaeError("the answer is empty; give the answer whose probability to attribute (--answer)")
    inputs = adapter.build_inputs([image], [prompt], answers=[answer])
    positions, tokens = _answer_span(inputs, answer)
    contrast_token = None
    if contrast is not None:
        if not contrast.strip():
            raise MmsaeError("the contrast answer is empty; give a different answer or none")
        other = adapter.build_inputs([image], [prompt], answers=[contrast])
        other_positions, other_tokens = _answer_span(other, contrast)
        if int(other_positions[0]) != int(positions[0]):
            raise MmsaeError(f"answers {answer!r} and {contrast!r} start at different positions; use answers after the same prompt")
        contrast_token = int(other_tokens[0])
        if contrast_token == int(tokens[0]):
            raise MmsaeError(f"answers {answer!r} and {contrast!r} start with the same token; their logit difference is 0")
        positions, tokens = positions[:1], tokens[:1]
    return AnswerObjective(inputs, positions.to(adapter.device), tokens.to(adapter.device), contrast_token)


# --- one forward + one backward ---------------------------------------------------------------


@dataclass
class Attribution:
    """Per-row, per-active-feature attributions of one answer (batch 1, sparse over features).

    Rows are the rows of the SAE site's activation: the sequence's tokens at an ``lm`` site, the
    tower's or projector's rows at a ``vision``/``projector`` site; ``image_rows`` are the rows of
    the image's patches, in the order of ``layout`` (whose positions they are), ``text_rows`` the
    text tokens' (none at vision and projector sites)."""

    objective: float
    kind: str
    values: torch.Tensor  # [R, k] active latents' activations
    indices: torch.Tensor  # [R, k] their feature ids
    scores: torch.Tensor  # [R, k] activation x gradient
    num_latents: int
    site: str = "lm"
    layout: object = None  # TokenLayout of the image patches (positions = rows)
    text_rows: torch.Tensor | None = None

    @property
    def image_rows(self) -> torch.Tensor:
        return self.layout.positions.cpu() if self.layout is not None else torch.zeros(0, dtype=torch.long)

    def feature_totals(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[n] attribution summed over ``positions`` (all positions if None) per feature."""
        idx, sc = (self.indices, self.scores) if positions is None else (self.indices[positions], self.scores[positions])
        return torch.zeros(self.num_latents, dtype=torch.float64).index_add_(0, idx.flatten().cpu(), sc.flatten().double().cpu())

    def position_totals(self) -> torch.Tensor:
        return self.scores.double().sum(-1).cpu()


def _frozen_params(model: torch.nn.Module):
    """Stop parameters from requiring grad (so only the post-hook graph is built); restore after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)

    def restore():
        for p, f in zip(params, flags):
            p.requires_grad_(f)

    return restore


def attribute_answer(adapter, sae, objective: AnswerObjective) -> Attribution:
    """Activation x gradient for every active feature at every row of the SAE's site, in one
    forward + backward (the intervention layer's ``grad`` splice: the same values, the latents a leaf)."""
    restore = _frozen_params(adapter.model)
    try:
        with torch.enable_grad(), spliced(adapter, sae, objective.inputs, grad=True) as splice:
            logits = adapter.model(**objective.inputs.inputs).logits
            obj = objective(logits)[0]
            values, indices = splice.latents[0]
        (grad,) = torch.autograd.grad(obj, values)
    finally:
        restore()
    rows = site_latents(adapter, splice.site, objective.inputs, values.detach(), indices, sae.cfg.num_latents)
    values, grad = values.detach().reshape(rows.values.shape), grad.reshape(rows.values.shape)
    return Attribution(float(obj.detach()), objective.kind, values, rows.indices, values * grad, sae.cfg.num_latents,
                       str(splice.site), rows.layouts[0] if rows.layouts[0].num_image_tokens else None, rows.text_rows[0])


# --- checking the estimate by ablation --------------------------------------------------------


def _repeat_batch(inputs: dict, n: int) -> dict:
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in inputs.items()}


def _every_row(adapter, site, inputs, copies: int) -> Rows:
    """Every row of the site's activation for ``copies`` copies of a one-sequence batch (each
    copy its own sequence), as the attribution saw them: every position at an lm site, every
    patch and CLS/register row at a vision or projector site."""
    if site.kind == "lm":
        return Rows(site=site)
    return Rows.of_site_rows(adapter.site_rows(site, inputs, include_special=True), copies)


def ablation_effects(adapter, sae, objective: AnswerObjective, features: list[int], batch_size: int = 8) -> list[float]:
    """The real change of the objective when each feature is zeroed at every row of its site
    (one copy of the sequence per feature, each clamping its own feature to 0; error term kept)."""
    site = check_sae_site(sae, adapter)
    with torch.no_grad():
        clean = float(objective(adapter.model(**objective.inputs.inputs).logits)[0])
        effects = []
        for i in range(0, len(features), batch_size):
            chunk = features[i:i + batch_size]
            batch = _repeat_batch(objective.inputs.inputs, len(chunk))
            ablate = [Intervention(f, 0.0, "clamp", batch_row=r) for r, f in enumerate(chunk)]
            with spliced(adapter, sae, site=site, interventions=ablate, rows=_every_row(adapter, site, objective.inputs, len(chunk))):
                logits = adapter.model(**batch).logits
            effects += [float(v) - clean for v in objective(logits)]
    return effects


def correlation(a, b) -> dict:
    """Pearson and Spearman correlation (None where undefined)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    def pearson(x, y):
        if len(x) < 2 or x.std() == 0 or y.std() == 0:
            return None
        return float(np.corrcoef(x, y)[0, 1])

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        return r

    return {"pearson": pearson(a, b), "spearman": pearson(ranks(a), ranks(b)) if len(a) > 1 else None, "n": int(len(a))}


# --- the stage --------------------------------------------------------------------------------


@dataclass
class AttributeConfig:
    model: str = field(metadata={"help": "model id or local path (a vision-language model)"})
    sae: str = field(metadata={"help": "SAE folder (sparsify, SAELens or mmsae layout)"})
    prompt: str = field(metadata={"help": "the question"})
    answer: str = field(metadata={"help": "the answer whose log-probability is attributed"})
    image: Optional[str] = field(default=None, metadata={"help": "image path"})
    contrast: Optional[str] = field(default=None, metadata={
        "help": "a second answer: attribute the logit difference answer - contrast (first tokens) instead"})
    out: str = field(default="attribution", metadata={"help": "output folder (attribution.json, heat-map PNGs)"})
    top: int = field(default=20, metadata={"help": "top features to report (overall, per patch, per token)", "min": 1})
    check: int = field(default=10, metadata={"help": "top features whose estimate is checked by really ablating each", "min": 0})
    site: Optional[str] = field(default=None, metadata={
        "help": "the SAE's site (lm:L, vision:L, projector; a number is lm:L) if its cfg records none"})
    device: str = field(default="auto", metadata={"help": "auto (this rank's GPU if any, else cpu), cpu, cuda or cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32, bfloat16, float16"})

    def __post_init__(self):
        check_config(self)


def _top(totals: torch.Tensor, n: int) -> list[dict]:
    nz = totals.nonzero().flatten()
    order = nz[totals[nz].abs().argsort(descending=True)][:n]
    return [{"feature": int(f), "attribution": float(totals[f])} for f in order]


def _per_position(att: Attribution, positions: torch.Tensor, n: int) -> list[list[dict]]:
    out = []
    for t in positions.tolist():
        order = att.scores[t].abs().argsort(descending=True)[:n]
        out.append([{"feature": int(att.indices[t, j]), "attribution": float(att.scores[t, j])}
                    for j in order if float(att.scores[t, j]) != 0.0])
    return out


def save_heatmap(image, heat: np.ndarray, path: str | Path, title: str) -> None:
    """The image with a signed heat-map over it (red: raises the objective, blue: lowers it)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    lim = float(np.abs(heat).max()) or 1.0
    fig = Figure(figsize=(4.2, 4.2), dpi=120)
    ax = fig.subplots()
    ax.imshow(np.asarray(image))
    im = ax.imshow(heat, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.55,
                   extent=(0, image.size[0], image.size[1], 0), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def attribution_report(adapter, sae, objective: AnswerObjective, att: Attribution, image=None, top: int = 20,
                       check: int = 10, out: str | Path | None = None) -> dict:
    """Top features overall / per patch / per token, and the ablation check; heat-maps into ``out``."""
    from .models.base import image_heatmap

    layout = att.layout
    tok = adapter.tokenizer
    ids = objective.inputs.inputs["input_ids"][0]
    image_pos = att.image_rows
    text_pos = att.text_rows.cpu() if att.text_rows is not None else torch.zeros(0, dtype=torch.long)
    totals = att.feature_totals()
    image_totals = att.feature_totals(image_pos) if len(image_pos) else torch.zeros_like(totals)
    text_totals = att.feature_totals(text_pos) if len(text_pos) else torch.zeros_like(totals)
    top_features = _top(totals, top)
    for row in top_features:
        f = row["feature"]
        row.update(image=float(image_totals[f]), text=float(text_totals[f]))
    pos_totals = att.position_totals()

    patches = [{"position": int(p), "tile": int(layout.tile[i]), "row": int(layout.row[i]), "col": int(layout.col[i]),
                "attribution": float(pos_totals[p]), "top_features": tf}
               for i, (p, tf) in enumerate(zip(image_pos.tolist(), _per_position(att, image_pos, 5)))]
    tokens = [{"position": int(p), "token": tok.decode([int(ids[p])]), "attribution": float(pos_totals[p]), "top_features": tf}
              for p, tf in zip(text_pos.tolist(), _per_position(att, text_pos, 5))]

    checked = [r["feature"] for r in top_features[:check]]
    real = ablation_effects(adapter, sae, objective, checked) if checked else []
    estimates = [-float(totals[f]) for f in checked]  # zeroing removes the feature's contribution
    result = {
        "objective": att.objective, "objective_kind": att.kind,
        "top_features": top_features, "image_patches": patches, "text_tokens": tokens,
        "ablation_check": {"features": [{"feature": f, "estimate": e, "real": r} for f, e, r in zip(checked, estimates, real)],
                           **correlation(estimates, real)},
        "heatmaps": {},
    }
    if out is not None and image is not None and len(image_pos):
        out = Path(out)
        heat = image_heatmap(layout, pos_totals[image_pos].float())
        save_heatmap(image, heat, out / "attribution_heatmap.png", f"all features: {att.kind} attribution")
        result["heatmaps"]["all"] = "attribution_heatmap.png"
        by_image = sorted(top_features, key=lambda r: -abs(r["image"]))[:3]
        for r in by_image:
            f = r["feature"]
            per_patch = (att.scores[image_pos] * (att.indices[image_pos] == f)).sum(-1).float().cpu()
            name = f"attribution_feature_{f}.png"
            save_heatmap(image, image_heatmap(layout, per_patch), out / name, f"feature {f}: attribution {r['image']:+.3g} over the image")
            result["heatmaps"][str(f)] = name
    return result


def attribute(cfg: AttributeConfig) -> dict:
    """Attribute the answer to features over image patches and text tokens; writes ``OUT/attribution.json``."""
    out = ensure_dir(cfg.out)
    check_own_file(out / "attribution.json", ATTRIBUTION_KEYS)  # before the work: a user's file is never replaced
    image = load_images([cfg.image] if cfg.image else [], 1)[0]
    adapter, sae = load_model_and_sae(cfg.model, cfg.sae, cfg.device, cfg.dtype, cfg.site)
    site = check_sae_site(sae, adapter)
    objective = build_objective(adapter, image, cfg.prompt, cfg.answer, cfg.contrast)
    # one sequence's forward and backward: what there is to lower is the model's own size
    with out_of_memory_guard("attribute", adapter.device, "--dtype (bfloat16 halves the model)", resumes=False):
        att = attribute_answer(adapter, sae, objective)
        report = attribution_report(adapter, sae, objective, att, image, cfg.top, cfg.check, out)
    result = {"model": cfg.model, "sae": cfg.sae, **site_record(adapter, site),
              "image": cfg.image, "prompt": cfg.prompt, "answer": cfg.answer, "contrast": cfg.contrast, **report}
    write_json(out / "attribution.json", result)
    print(f"{result['objective_kind']} = {result['objective']:.4f}; top features (activation x gradient):")
    for r in result["top_features"][:10]:
        print(f"  feature {r['feature']:>7}: {r['attribution']:+.4f}  (image {r['image']:+.4f}, text {r['text']:+.4f})")
    chk = result["ablation_check"]
    if chk["n"]:
        p = "n/a" if chk["pearson"] is None else f"{chk['pearson']:.3f}"
        print(f"ablation check over {chk['n']} features: Pearson r = {p} (estimate vs real effect of zeroing each)")
    print(f"wrote {out / 'attribution.json'}")
    return result
