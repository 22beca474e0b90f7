"""Detection scoring for images, after EleutherAI delphi's detection score.

The judge sees a feature's explanation and a shuffled mix of activating images (the feature's top
examples) and non-activating ones (images that are not among its top examples), and says for each
whether the feature fires on it. A good explanation lets the judge tell them apart: balanced
accuracy of its yes/no answers and AUROC of its confidence scores (0.5 is chance).

Judges:

* ``oracle`` (shapes world): answers "yes" exactly when the explanation's concept is present in the
  image's ground-truth scene. It is a perfect reader of the explanation, so the score measures
  only whether the explanation predicts activation, not a model's visual skill;
* ``clip``: CLIP score of the explanation against each image; the judge is told how many images
  activate and picks that many highest-scoring ones;
* ``chat``: a multimodal chat model asked a yes/no question per image (any callable
  ``ask(image, question) -> str``, e.g. an explainer backend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

QUESTION = ("A feature of a vision model is described as: \"{explanation}\". "
            "Does this image contain what the description says? Answer yes or no.")


@dataclass
class DetectionItem:
    sample_id: int
    image: Image.Image
    meta: dict[str, Any]
    activates: bool


def balanced_accuracy(labels, predictions) -> float:
    """Mean of the true-positive and true-negative rates (0.5 for a constant guess)."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predictions, dtype=bool)
    rates = [float((p[y == c] == c).mean()) for c in (True, False) if (y == c).any()]
    return float(np.mean(rates)) if rates else float("nan")


def auroc(labels, scores) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


class OracleJudge:
    """Says yes exactly when the explanation's concept is in the image's ground-truth scene."""

    name = "oracle"

    def judge(self, explanation: str, items: list[DetectionItem]) -> tuple[list[bool], list[float]]:
        from .segmenters import scene_from_meta
        from ..data import shapes

        found = []
        for item in items:
            mask = shapes.concept_mask(scene_from_meta(item.meta), explanation)
            found.append(mask is not None and bool(np.asarray(mask).any()))
        return found, [float(f) for f in found]


class ClipJudge:
    """Ranks the images by CLIP score and says yes to as many top ones as there are activating images."""

    name = "clip"

    def __init__(self, scorer):
        self.scorer = scorer

    def judge(self, explanation: str, items: list[DetectionItem]) -> tuple[list[bool], list[float]]:
        scores = self.scorer.score(explanation, [item.image for item in items])
        n_pos = sum(item.activates for item in items)
        order = np.argsort(-np.asarray(scores), kind="stable")
        chosen = set(order[:n_pos].tolist())
        return [i in chosen for i in range(len(items))], list(scores)


class ChatJudge:
    """Asks a multimodal chat model a yes/no question per image; the answer's first word decides."""

    name = "chat"

    def __init__(self, ask: Callable[[Image.Image, str], str]):
        self.ask = ask

    def judge(self, explanation: str, items: list[DetectionItem]) -> tuple[list[bool], list[float]]:
        question = QUESTION.format(explanation=explanation)
        said_yes = [self.ask(item.image, question).strip().lower().startswith("yes") for item in items]
        return said_yes, [float(y) for y in said_yes]


def detect(judge, explanation: str, items: list[DetectionItem], seed: int) -> dict[str, Any]:
    """Shuffle the mix (seeded), let the judge answer, and score its answers against the truth."""
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    shuffled = [items[i] for i in order]
    predictions, scores = judge.judge(explanation, shuffled)
    labels = [item.activates for item in shuffled]
    return {
        "balanced_accuracy": balanced_accuracy(labels, predictions),
        "auroc": auroc(labels, scores),
        "sample_ids": [item.sample_id for item in shuffled],
        "labels": labels,
        "predictions": [bool(p) for p in predictions],
        "judge_scores": [float(s) for s in scores],
    }
