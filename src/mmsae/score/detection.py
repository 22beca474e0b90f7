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
* ``openai`` / ``hf``: a multimodal chat model (an OpenAI-compatible endpoint, or a local
  transformers image-text model through mmsae's adapters, the demo model included) asked a yes/no
  question per image, through the same clients the explainers use.
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

    def judge(self, explanation: str, items: list[DetectionItem], concept: str | None = None) -> tuple[list[bool], list[float]]:
        from ..data import shapes
        from .segmenters import scene_from_meta

        found = []
        for item in items:
            mask = shapes.concept_mask(scene_from_meta(item.meta), concept or explanation)
            found.append(mask is not None and bool(np.asarray(mask).any()))
        return found, [float(f) for f in found]


class ClipJudge:
    """Ranks the images by CLIP score and says yes to as many top ones as there are activating images."""

    name = "clip"

    def __init__(self, scorer, key: Callable[[int], Any] | None = None):
        # key(sample_id) names an image for the scorer's embedding cache (None: no caching)
        self.scorer, self.key = scorer, key

    def judge(self, explanation: str, items: list[DetectionItem], concept: str | None = None) -> tuple[list[bool], list[float]]:
        keys = [self.key(item.sample_id) for item in items] if self.key else None
        scores = self.scorer.score(explanation, [item.image for item in items], keys=keys)
        n_pos = sum(item.activates for item in items)
        order = np.argsort(-np.asarray(scores), kind="stable")
        chosen = set(order[:n_pos].tolist())
        return [i in chosen for i in range(len(items))], list(scores)


class ChatJudge:
    """Asks a multimodal chat model a yes/no question about each image; a reply starting "yes" says it fires.

    ``ask(images, questions) -> replies`` answers a batch; ``question`` is a template with
    ``{explanation}`` and/or ``{concept}``.
    """

    name = "chat"

    def __init__(self, ask: Callable[[list[Image.Image], list[str]], list[str]], question: str = QUESTION):
        self.ask, self.question = ask, question

    def judge(self, explanation: str, items: list[DetectionItem], concept: str | None = None) -> tuple[list[bool], list[float]]:
        question = self.question.format(explanation=explanation, concept=concept or explanation)
        replies = self.ask([item.image for item in items], [question] * len(items))
        said_yes = [r.strip().lower().lstrip("\"'*").startswith("yes") for r in replies]
        return said_yes, [float(y) for y in said_yes]


def openai_asker(client, image_size: int | None = 512):
    """``ask`` for :class:`ChatJudge` over an OpenAI-compatible endpoint (explain's client)."""
    from ..explain.openai_client import user_message

    def ask(images, questions):
        return [client.chat(user_message(q, [im], image_size)) for im, q in zip(images, questions)]

    return ask


def adapter_asker(adapter, max_new_tokens: int = 4, batch_size: int = 8):
    """``ask`` for :class:`ChatJudge`: greedy replies of a local image-text model (a ModelAdapter)."""
    from ..intervene import generate

    def ask(images, questions):
        replies = []
        for i in range(0, len(images), batch_size):
            replies += generate(adapter, images[i:i + batch_size], questions[i:i + batch_size],
                                max_new_tokens=max_new_tokens)
        return replies

    return ask


def detect(judge, explanation: str, items: list[DetectionItem], seed: int, concept: str | None = None) -> dict[str, Any]:
    """Shuffle the mix (seeded), let the judge answer, and score its answers against the truth.

    Judges return ``(said_yes, confidence)`` per image; ``concept`` is the short phrase, when known.
    """
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    shuffled = [items[i] for i in order]
    predictions, scores = judge.judge(explanation, shuffled, concept=concept)
    labels = [item.activates for item in shuffled]
    return {
        "balanced_accuracy": balanced_accuracy(labels, predictions),
        "auroc": auroc(labels, scores),
        "sample_ids": [item.sample_id for item in shuffled],
        "labels": labels,
        "predictions": [bool(p) for p in predictions],
        "judge_scores": [float(s) for s in scores],
    }
