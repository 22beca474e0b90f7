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

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import check_config
from .errors import MmsaeError
from .hooks import edit
from .io import append_jsonl, atomic_path, check_own_file, ensure_dir, write_json
from .runtime import out_of_memory_guard
from .models.sites import resolve_layer
from .steer import (STEERING_KEYS, Intervention, build_interventions, decoder_directions, feature_activations,
                    load_images, load_model_and_sae, run_batches, work_dtype)

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


class _Splice:
    """Hook function: swaps x for decode(latents) + detached error, the latents a grad leaf."""

    def __init__(self, sae):
        self.sae = sae
        self.values = self.indices = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(work_dtype(hidden.dtype))
        with torch.no_grad():
            values, indices = self.sae.encode_sparse(x)
        values = values.to(x.dtype).detach().requires_grad_(True)
        recon = self.sae.decode_sparse(values, indices).to(x.dtype)
        self.values, self.indices = values, indices
        return (recon + (x - recon).detach()).to(hidden.dtype)


@dataclass
class Attribution:
    """Per-position, per-active-feature attributions of one answer (batch 1, sparse over features)."""

    objective: float
    kind: str
    values: torch.Tensor  # [T, k] active latents' activations
    indices: torch.Tensor  # [T, k] their feature ids
    scores: torch.Tensor  # [T, k] activation x gradient
    num_latents: int

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


def attribute_answer(adapter, sae, objective: AnswerObjective, layer: int | None = None) -> Attribution:
    """Activation x gradient for every active feature at every position, in one forward + backward."""
    layer = resolve_layer(adapter, sae, layer)
    splice = _Splice(sae)
    restore = _frozen_params(adapter.model)
    try:
        with torch.enable_grad(), edit(adapter.layer_module(layer), splice):
            logits = adapter.model(**objective.inputs.inputs).logits
            obj = objective(logits)[0]
        (grad,) = torch.autograd.grad(obj, splice.values)
    finally:
        restore()
    values = splice.values.detach()[0]
    return Attribution(float(obj.detach()), objective.kind, values, splice.indices[0], values * grad[0], sae.cfg.num_latents)


# --- checking the estimate by ablation --------------------------------------------------------


class _RowAblation:
    """Hook function zeroing feature ``features[r]`` in batch row r at every position (error kept)."""

    def __init__(self, sae, features: list[int]):
        self.sae = sae
        self.features = features
        self.directions = decoder_directions(sae, features)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(work_dtype(hidden.dtype))
        with torch.no_grad():
            acts = feature_activations(self.sae, x, self.features)  # [B, T, F]
        rows = torch.arange(len(self.features), device=x.device)
        own = acts[rows, :, rows]  # [B, T] row r's own feature
        delta = -own.unsqueeze(-1) * self.directions.to(x).unsqueeze(1)
        return (x + delta).to(hidden.dtype)


def _repeat_batch(inputs: dict, n: int) -> dict:
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in inputs.items()}


def ablation_effects(adapter, sae, objective: AnswerObjective, features: list[int], layer: int | None = None,
                     batch_size: int = 8) -> list[float]:
    """The real change of the objective when each feature is zeroed at every position."""
    layer = resolve_layer(adapter, sae, layer)
    with torch.no_grad():
        clean = float(objective(adapter.model(**objective.inputs.inputs).logits)[0])
        effects = []
        for i in range(0, len(features), batch_size):
            chunk = features[i:i + batch_size]
            with edit(adapter.layer_module(layer), _RowAblation(sae, chunk)):
                logits = adapter.model(**_repeat_batch(objective.inputs.inputs, len(chunk))).logits
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
    layer: Optional[int] = field(default=None, metadata={"help": "layer, if the SAE's cfg does not record it", "min": 0})
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = float(np.abs(heat).max()) or 1.0
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    ax.imshow(np.asarray(image))
    im = ax.imshow(heat, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.55,
                   extent=(0, image.size[0], image.size[1], 0), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def attribution_report(adapter, sae, objective: AnswerObjective, att: Attribution, image=None, top: int = 20,
                       check: int = 10, layer: int | None = None, out: str | Path | None = None) -> dict:
    """Top features overall / per patch / per token, and the ablation check; heat-maps into ``out``."""
    from .models.base import image_heatmap

    layout = objective.inputs.layouts[0]
    tok = adapter.tokenizer
    ids = objective.inputs.inputs["input_ids"][0]
    image_pos = layout.positions.cpu()
    text_pos = layout.text_positions.cpu()
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
    real = ablation_effects(adapter, sae, objective, checked, layer) if checked else []
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
    adapter, sae = load_model_and_sae(cfg.model, cfg.sae, cfg.device, cfg.dtype)
    layer = resolve_layer(adapter, sae, cfg.layer)
    objective = build_objective(adapter, image, cfg.prompt, cfg.answer, cfg.contrast)
    # one sequence's forward and backward: what there is to lower is the model's own size
    with out_of_memory_guard("attribute", adapter.device, "--dtype (bfloat16 halves the model)", resumes=False):
        att = attribute_answer(adapter, sae, objective, layer)
        report = attribution_report(adapter, sae, objective, att, image, cfg.top, cfg.check, layer, out)
    result = {"model": cfg.model, "sae": cfg.sae, "layer": layer, "hook_point": adapter.hook_point(layer),
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


# --- the demo: find the shapes world's colour and shape features, then steer with them --------

DEMO_TARGETS = {"colour": ("red", "blue", "green", "yellow"), "shape": ("star", "circle")}


@dataclass
class _Question:
    scene: int
    question: str
    answer: str


def _questions(world, kind: str, scenes: range) -> list[_Question]:
    from .data.shapes import make_caption, make_qa, question_type

    out = []
    for i in scenes:
        desc = world.describe(i)  # the questions without rendering the image
        for q, a in make_qa(desc, make_caption(desc)):
            if question_type(q) == kind:
                out.append(_Question(i, q, a))
    return out


def _mentions(text: str, word: str) -> bool:
    return word in [w.strip(".,;:!?\"'()").lower() for w in text.split()]


def demo_steering(model, sae, run_dir: str | Path, n_images: int = 40, seed: int = 2, targets: dict | None = None,
                  n_find: int = 4, candidates: int = 3, multiples: tuple[float, ...] = (2.0, 4.0, 8.0),
                  spans: tuple[str, ...] = ("image", "all"), n_validate: int = 8, max_new_tokens: int = 4,
                  batch_size: int = 8) -> dict:
    """Find colour/shape features by attribution, then clamp each to make the model give that answer.

    ``model`` and ``sae`` are paths (or a loaded adapter and SAE). For each target answer (say
    "red"): attribute the logit difference "red" minus another answer on ``n_find`` scenes whose
    true answer is red, sum each feature's attribution over the image patches, keep the top
    ``candidates``. Each candidate is clamped (to a multiple of its largest activation seen, on
    the image tokens or on all positions) while the model answers the same kind of question about
    scenes whose true answer is *not* red; the best setting on ``n_validate`` questions is then
    scored on the other held-out ones (``n_images`` in all, one question per scene).

    Writes ``RUN/steering/demo_steering.json`` (per target: feature, span, value, success rate,
    the clean model's accuracy), examples to ``RUN/steering/steering.jsonl`` (their images under
    ``RUN/steering/examples/``) and one attribution report to ``RUN/attribution/``.
    """
    from .data.shapes import COLOURS, SHAPES, ShapesWorld
    from .models.base import ModelAdapter

    if isinstance(model, ModelAdapter):
        adapter = model
    else:
        from .models import load_adapter

        adapter = load_adapter(model)
    if isinstance(sae, (str, Path)):
        from .sae import load_sae

        sae = load_sae(sae)
    sae = sae.to(adapter.device).eval()
    layer = resolve_layer(adapter, sae)
    run_dir = Path(run_dir)
    steer_dir, att_dir = ensure_dir(run_dir / "steering"), ensure_dir(run_dir / "attribution")
    ensure_dir(steer_dir / "examples")
    # what this replaces or appends to must be mmsae's
    check_own_file(steer_dir / "steering.jsonl", STEERING_KEYS)
    check_own_file(steer_dir / "demo_steering.json", ("targets", "best_success"))
    check_own_file(att_dir / "attribution.json", ATTRIBUTION_KEYS)
    world = ShapesWorld(seed)
    scene_image = functools.lru_cache(maxsize=None)(lambda i: world.scene(i).image)
    vocab = {"colour": list(COLOURS), "shape": list(SHAPES)}
    targets = targets or DEMO_TARGETS
    # discovery scenes first, held-out evaluation scenes after them (disjoint)
    n_discovery_scenes = 12 * n_find
    summary = {"model": adapter.model_id, "layer": layer, "seed": seed, "targets": []}
    rows, attribution_written = [], False
    for kind, wanted in targets.items():
        found = _questions(world, kind, range(n_discovery_scenes))
        held_out: list[_Question] = []
        scene = n_discovery_scenes
        while len(held_out) < n_images + n_validate * 4 and scene < n_discovery_scenes + 50 * n_images:
            qs = _questions(world, kind, range(scene, scene + 1))
            held_out += qs[:1]  # one question per scene
            scene += 1
        for target in wanted:
            pool = [q for q in found if q.answer == target][:n_find]
            if not pool:
                continue
            others = [w for w in vocab[kind] if w != target]
            image_totals = torch.zeros(sae.cfg.num_latents, dtype=torch.float64)
            max_act = torch.zeros(sae.cfg.num_latents)
            for j, q in enumerate(pool):
                image = scene_image(q.scene)
                objective = build_objective(adapter, image, q.question, target, others[j % len(others)])
                att = attribute_answer(adapter, sae, objective, layer)
                image_totals += att.feature_totals(objective.inputs.layouts[0].positions.cpu())
                max_act.scatter_reduce_(0, att.indices.flatten().cpu(), att.values.flatten().float().cpu(), "amax")
                if not attribution_written:  # one full report, with heat-maps, for the run report
                    report = attribution_report(adapter, sae, objective, att, image, out=att_dir, layer=layer)
                    image.save(att_dir / "image.png")
                    write_json(att_dir / "attribution.json", {
                        "model": adapter.model_id, "layer": layer, "hook_point": adapter.hook_point(layer),
                        "image": "image.png", "prompt": q.question, "answer": target,
                        "contrast": others[j % len(others)], **report})
                    attribution_written = True
            ranked = [int(f) for f in image_totals.argsort(descending=True)[:candidates] if image_totals[f] > 0]
            evaluation = [q for q in held_out if q.answer != target]
            validate, test = evaluation[:n_validate], evaluation[n_validate:n_validate + n_images]
            if not ranked or not test:
                continue

            def answers(questions, ivs=(), span="all"):
                images = [scene_image(q.scene) for q in questions]
                texts, _ = run_batches(adapter, images, [q.question for q in questions], batch_size, max_new_tokens,
                                       sae, list(ivs), span, layer)
                return texts

            def rate(texts, word):
                return sum(_mentions(t, word) for t in texts) / max(1, len(texts))

            best = None  # (validation rate, -value, feature, span, value)
            for f in ranked:
                for span in spans:
                    for m in multiples:
                        value = float(m * max_act[f]) if max_act[f] > 0 else float(m)
                        r = rate(answers(validate, [Intervention(f, value, "clamp")], span), target)
                        if best is None or (r, -value) > best[:2]:
                            best = (r, -value, f, span, value)
            _, _, f, span, value = best
            clean = answers(test)
            steered_texts = answers(test, build_interventions([f], [value], "clamp"), span)
            result = {
                "kind": kind, "target": target, "feature": f, "span": span, "value": value,
                "candidates": ranked, "image_attribution": float(image_totals[f]),
                "validation_success": best[0], "success": rate(steered_texts, target), "n": len(test),
                "clean_says_target": rate(clean, target),
                "clean_accuracy": sum(_mentions(t, q.answer) for t, q in zip(clean, test)) / len(test),
            }
            summary["targets"].append(result)
            print(f"[steer demo] {kind} '{target}': feature {f} clamped to {value:.3g} on {span} -> says "
                  f"'{target}' on {result['success']:.0%} of {len(test)} held-out scenes "
                  f"(clean model: {result['clean_says_target']:.0%}; clean accuracy {result['clean_accuracy']:.0%})")
            for q, a, b in list(zip(test, clean, steered_texts))[:3]:
                name = f"examples/scene-{seed}-{q.scene}.png"
                scene_image(q.scene).save(steer_dir / name)
                rows.append({"prompt": q.question, "image": name, "true_answer": q.answer, "target": target,
                             "interventions": [{"feature": f, "value": value, "mode": "clamp"}], "span": span,
                             "layer": layer, "clean": a, "steered": b, "model": adapter.model_id, "demo": True})
    best_rates = [t["success"] for t in summary["targets"]]
    summary["best_success"] = max(best_rates) if best_rates else None
    write_json(steer_dir / "demo_steering.json", summary)
    append_jsonl(steer_dir / "steering.jsonl", rows)
    return summary
