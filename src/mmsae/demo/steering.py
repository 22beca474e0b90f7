"""The demo's steering: find the shapes world's colour and shape features by attribution, then
clamp each to make the model give that answer (``mmsae.steer`` and ``mmsae.attribute`` are the
general stages; this is their demonstration on the shapes world)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attribute import ATTRIBUTION_KEYS, attribute_answer, attribution_report, build_objective
from ..data.shapes import COLOURS, SHAPES, ShapesWorld
from ..intervene import Intervention
from ..io import append_jsonl, check_own_file, ensure_dir, write_json
from ..models import load_adapter
from ..models.base import ModelAdapter
from ..models.sites import check_sae_site, site_record
from ..sae import load_sae
from ..steer import STEERING_KEYS, build_interventions, run_batches

DEMO_TARGETS = {"colour": ("red", "blue", "green", "yellow"), "shape": ("star", "circle")}


@dataclass
class _Question:
    scene: int
    question: str
    answer: str


def _questions(world, kind: str, scenes: range) -> list[_Question]:
    from ..data.shapes import make_caption, make_qa, question_type

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
                  batch_size: int = 8, out_name: str = "steering", attribution_name: str = "attribution") -> dict:
    """Find colour/shape features by attribution, then clamp each to make the model give that answer.

    ``model`` and ``sae`` are paths (or a loaded adapter and SAE). For each target answer (say
    "red"): attribute the logit difference "red" minus another answer on ``n_find`` scenes whose
    true answer is red, sum each feature's attribution over the image patches, keep the top
    ``candidates``. Each candidate is clamped (to a multiple of its largest activation seen, on
    the image tokens or on all positions) while the model answers the same kind of question about
    scenes whose true answer is *not* red; the best setting on ``n_validate`` questions is then
    scored on the other held-out ones (``n_images`` in all, one question per scene).

    The SAE may sit at any site: at ``vision:L`` or ``projector`` every row is an image patch,
    so the spans ``image`` and ``all`` coincide. Writes ``RUN/OUT_NAME/demo_steering.json`` (per
    target: feature, span, value, success rate, the clean model's accuracy), examples to
    ``RUN/OUT_NAME/steering.jsonl`` (their images under ``examples/``) and one attribution report
    to ``RUN/ATTRIBUTION_NAME/``.
    """
    if isinstance(model, ModelAdapter):
        adapter = model
    else:
        adapter = load_adapter(model)
    if isinstance(sae, (str, Path)):
        sae = load_sae(sae)
    sae = sae.to(adapter.device).eval()
    site = check_sae_site(sae, adapter)
    run_dir = Path(run_dir)
    steer_dir, att_dir = ensure_dir(run_dir / out_name), ensure_dir(run_dir / attribution_name)
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
    summary = {"model": adapter.model_id, **site_record(adapter, site), "seed": seed, "targets": []}
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
                att = attribute_answer(adapter, sae, objective)
                image_totals += att.feature_totals(att.image_rows)
                max_act.scatter_reduce_(0, att.indices.flatten().cpu(), att.values.flatten().float().cpu(), "amax")
                if not attribution_written:  # one full report, with heat-maps, for the run report
                    report = attribution_report(adapter, sae, objective, att, image, out=att_dir)
                    image.save(att_dir / "image.png")
                    write_json(att_dir / "attribution.json", {
                        "model": adapter.model_id, **site_record(adapter, site),
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
                                       sae, list(ivs), span)
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
                             **site_record(adapter, site), "clean": a, "steered": b, "model": adapter.model_id, "demo": True})
    best_rates = [t["success"] for t in summary["targets"]]
    summary["best_success"] = max(best_rates) if best_rates else None
    write_json(steer_dir / "demo_steering.json", summary)
    append_jsonl(steer_dir / "steering.jsonl", rows)
    return summary
