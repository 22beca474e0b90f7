"""The demo's explainer: the demo model captions each top example, and a vote merges the captions.

:class:`DemoExplainer` (``mmsae explain --backend demo``) is offline, for the demo model. The
model captions each top example cropped to its activated region, and a deterministic vote keeps
the words (colour, texture, shape, part, scene) that most captions share (no majority: no
concept). A small captioner plus a vote, not a large model's judgement, and it says so in each row.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from PIL import Image

from ..explain import concepts as concept_words
from ..explain.backends import Explainer, ExplainResult, load_image_text_model, one_line_replies
from ..io import read_json

DEMO_PROMPT = "Describe the image."
DEMO_VERSION = "demo-caption-vote-v3"
VOTE_KINDS = ("colour", "texture", "object", "part", "scene")
# question types of the demo model's quality check -> the description words they measure
QUESTION_KIND = {"colour": "colour", "shape": "object", "pattern": "texture", "scene": "scene"}


def vote(descriptions: list[str], kinds: tuple[str, ...] = VOTE_KINDS) -> tuple[str, str | None, str | None, dict]:
    """Merge per-example descriptions into the concept they most consistently share.

    Returns ``(explanation, concept, category, votes)``. Words are grouped by kind (colour,
    texture, object, part, scene) and each kind's most frequent word is its candidate; the
    concept is the candidate named by the most descriptions, provided more than half name it
    (ties go to the more specific kind: part, object, texture, colour, scene). An object takes
    the colour and texture named at least as often, a part the object. Ranking by support rather
    than by kind matters: five crops of a red feature may share "red" five times and, by the
    crops' shape, "square" three times. ``kinds`` limits the vote to those kinds of words (for
    a describer known to misread the others).
    """
    vocabularies = {"colour": concept_words.COLOUR_WORDS, "texture": concept_words.TEXTURE_WORDS - {"pattern", "patterned", "solid", "plain"},
                    "object": concept_words.OBJECT_WORDS, "part": concept_words.PART_WORDS, "scene": concept_words.SCENE_WORDS}
    vocabularies = {k: v for k, v in vocabularies.items() if k in kinds}  # other kinds: neither counted nor claimed
    counts: dict[str, Counter] = {k: Counter() for k in VOTE_KINDS}
    for d in descriptions:
        # each word once, in the order the description names it: a set's order changes with the
        # process's hash seed, and Counter breaks ties by the order words were first counted
        words = dict.fromkeys(concept_words._SINGULAR.get(w, w) for w in concept_words._words(d))
        for kind, vocab in vocabularies.items():
            counts[kind].update(w for w in words if w in vocab or w in {concept_words._SINGULAR.get(v, v) for v in vocab})
    votes = {k: dict(c.most_common(3)) for k, c in counts.items() if c}
    n = len(descriptions)
    best = {k: counts[k].most_common(1)[0] if counts[k] else (None, 0) for k in VOTE_KINDS}
    specificity = ("part", "object", "texture", "colour", "scene")
    category = max(specificity, key=lambda k: (best[k][1], -specificity.index(k)))
    defining, support = best[category]
    if support <= n / 2:
        if defining is None:
            return "No shared concept: the descriptions name nothing in common.", None, None, votes
        # no majority: the text says what came closest, but no concept is claimed
        return f"No shared concept; closest: {defining} (named in {support} of {n} descriptions).", None, None, votes

    def along(kind: str) -> str | None:  # a word of another kind named at least as often
        word, count = best[kind]
        return word if count >= support else None

    if category == "part":
        concept = " ".join(w for w in (along("object"), defining) if w)
    elif category == "object":
        concept = " ".join(w for w in (along("colour"), along("texture"), defining) if w)
    else:
        concept = defining
    scene = best["scene"][0] if best["scene"][1] > n / 2 and category != "scene" else None
    explanation = f"The highlighted regions show {concept}" + (f" {_scene_phrase(scene)}" if scene else "")
    return f"{explanation} (shared by {support} of {n} example descriptions).", concept, category, votes


def _image_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


def _scene_phrase(scene: str) -> str:
    return {"sky": "in the sky", "water": "on the water"}.get(scene, f"on the {scene}")


def readable_kinds(model: str, threshold: float = 0.8) -> tuple[str, ...]:
    """The description kinds a demo model reads reliably: those whose question type its build's
    held-out check (``quality.json`` in the model folder) answered at least ``threshold``
    correctly. Parts have no question and are never trusted; without a check, every kind."""
    path = Path(model) / "quality.json"
    if not path.is_file():
        return VOTE_KINDS
    by_type = read_json(path).get("by_type", {})
    good = {QUESTION_KIND[t] for t, r in by_type.items() if t in QUESTION_KIND and r.get("accuracy", 0) >= threshold}
    return tuple(k for k in VOTE_KINDS if k in good)


class DemoExplainer(Explainer):
    """The demo model captions each highlighted example; a majority vote merges the captions,
    counting only the kinds of words (colour, shape, ...) the model was measured to read."""

    name = "demo"

    def __init__(self, model: str, batch_size: int = 8, max_new_tokens: int = 32, dtype: str = "float32", device: str = "cpu"):
        self.model, self.batch_size, self.max_new_tokens = model, batch_size, max_new_tokens
        self.adapter = load_image_text_model(model, dtype, device)
        self.kinds = readable_kinds(model)
        self._captions: dict[str, str] = {}

    def explain_batch(self, requests):
        # features often share a region of an image: each distinct view is captioned once
        views = {_image_key(im): im for r in requests for im in r.images}
        todo = [k for k in views if k not in self._captions]
        for start in range(0, len(todo), 16):
            keys = todo[start:start + 16]
            for k, caption in zip(keys, one_line_replies(self.adapter, [views[k] for k in keys], [DEMO_PROMPT] * len(keys), self.max_new_tokens)):
                self._captions[k] = caption
        out = []
        for r in requests:
            descriptions = [self._captions[_image_key(im)] for im in r.images]
            explanation, concept, category, votes = vote(descriptions, self.kinds)
            out.append(ExplainResult(explanation, concept, category,
                                     {"descriptions": descriptions, "votes": votes, "kinds": list(self.kinds),
                                      "method": DEMO_VERSION}))
        return out
