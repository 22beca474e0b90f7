"""Explainer backends behind one interface.

An :class:`Explainer` turns :class:`ExplainRequest` (a feature's highlighted top images and the
prompt) into :class:`ExplainResult` (the explanation and, optionally, a concept label). ``run``
yields results as they complete, so the pipeline writes each one at once and an interruption
loses only the requests in flight.

- :class:`OpenAIExplainer`: any OpenAI-compatible chat endpoint with image input, with a
  concurrency limit (worker threads that are cancelled and joined when the run stops, so Ctrl-C
  returns at once and no thread is left running at exit).
- :class:`HFExplainer`: a local transformers image-text-to-text model through
  ``mmsae.models.load_adapter``, batched; the top images go as one montage image, so any
  single-image model family works.
- :class:`DemoExplainer`: offline, for the demo model. The demo model captions each top
  example cropped to its activated region, and a deterministic vote keeps the words (colour,
  texture, shape, part, scene) that most captions share (no majority: no concept). A small captioner plus a vote,
  not a large model's judgement, and it says so in each row.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import MmsaeError
from . import concepts as concept_words
from .openai_client import FatalRequestError, OpenAIClient, TransientRequestError, user_message
from .prompts import CONCEPT_TEMPLATE


@dataclass
class ExplainRequest:
    feature: int
    images: list[Image.Image]  # the top examples, activated regions highlighted
    prompt: str
    evidence: list[int]  # their sample ids
    binarization: dict | None = None  # how the highlighted regions were binarised


@dataclass
class ExplainResult:
    explanation: str
    concept: str | None = None
    category: str | None = None
    details: dict = field(default_factory=dict)


class Explainer:
    """Base: batched ``explain_batch`` / ``label_batch``; subclasses may override ``run``."""

    name = ""
    model = ""
    batch_size = 1

    def explain_batch(self, requests: list[ExplainRequest]) -> list[ExplainResult]:
        raise NotImplementedError

    def label_batch(self, explanations: list[str]) -> list[tuple[str | None, str | None]]:
        """Concept phrase and category per explanation (default: the keyword mapper)."""
        return [concept_words.keyword_concept(e) for e in explanations]

    def run(self, features: Iterable[int], make_request: Callable[[int], ExplainRequest],
            concepts: bool) -> Iterator[tuple[int, ExplainRequest | None, ExplainResult | BaseException]]:
        """Yield ``(feature, request, result or the exception that failed it)`` as results complete.

        ``make_request`` renders a feature's request (its highlighted images and prompt).
        """
        batch: list[ExplainRequest] = []
        for f in features:
            batch.append(make_request(f))
            if len(batch) == self.batch_size:
                yield from self._run_batch(batch, concepts)
                batch = []
        if batch:
            yield from self._run_batch(batch, concepts)

    def _run_batch(self, batch: list[ExplainRequest], concepts: bool):
        try:
            results = self.explain_batch(batch)
            if concepts:
                todo = [i for i, r in enumerate(results) if r.concept is None]
                labels = self.label_batch([results[i].explanation for i in todo]) if todo else []
                for i, (concept, category) in zip(todo, labels):
                    results[i].concept, results[i].category = concept, category
        except FatalRequestError:
            raise
        except MmsaeError:
            raise
        except Exception as e:  # one bad batch fails its features; the rest go on
            for request in batch:
                yield request.feature, request, e
            return
        for request, result in zip(batch, results):
            yield request.feature, request, result

    def close(self) -> None:
        pass


def threaded(items: Iterable, fn: Callable, concurrency: int,
             cancel: Callable[[], None] | None = None) -> Iterator[tuple[object, object]]:
    """Apply ``fn`` on ``concurrency`` threads; yield ``(item, result or exception)`` as done.

    At most ``2 * concurrency`` items are taken from ``items`` ahead of the results, so a lazy
    iterable (rendering images) is consumed as the work proceeds. When the caller stops early
    (an error, Ctrl-C, ``close()``), queued items are dropped and ``cancel`` cuts the calls in
    flight short. Either way the workers are joined before this returns: a thread still inside
    torch when the interpreter exits aborts the process ("terminate called without an active
    exception"), and the threads are not daemons, so even an interrupted join cannot leave one
    to be killed at exit.
    """
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()

    def worker() -> None:
        while True:
            item = inbox.get()
            if item is _STOP:
                return
            try:
                result = fn(item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                result = e
            outbox.put((item, result))

    threads = [threading.Thread(target=worker, name=f"explain-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    source, pending, exhausted, finished = iter(items), 0, False, False
    try:
        while True:
            while not exhausted and pending < 2 * concurrency:
                try:
                    inbox.put(next(source))
                    pending += 1
                except StopIteration:
                    exhausted = True
            if pending == 0:
                finished = True
                return
            while True:
                try:
                    item, result = outbox.get(timeout=0.2)  # short waits keep Ctrl-C responsive
                    break
                except queue.Empty:
                    continue
            pending -= 1
            yield item, result
    finally:
        # drop queued work, cut the calls in flight short (their results are ignored), wait for the workers
        while True:
            try:
                inbox.get_nowait()
            except queue.Empty:
                break
        if not finished and cancel is not None:
            cancel()
        for _ in threads:
            inbox.put(_STOP)
        for t in threads:
            t.join()


_STOP = object()


class OpenAIExplainer(Explainer):
    name = "openai"

    def __init__(self, client: OpenAIClient, concurrency: int = 8, image_size: int | None = 512):
        if concurrency < 1:
            raise MmsaeError(f"--concurrency must be at least 1, got {concurrency}")
        self.client, self.concurrency, self.image_size = client, concurrency, image_size
        self.model = client.model

    def _one(self, request: ExplainRequest, concepts: bool) -> ExplainResult:
        text = self.client.chat(user_message(request.prompt, request.images, self.image_size))
        result = ExplainResult(" ".join(text.split()))
        if concepts:
            reply = self.client.chat([{"role": "user", "content": CONCEPT_TEMPLATE.format(explanation=result.explanation)}])
            result.concept, result.category = concept_words.parse_concept_reply(reply)
            if result.concept is None:  # an unreadable reply: fall back to keywords, and say so
                result.concept, result.category = concept_words.keyword_concept(result.explanation)
                result.details["concept_source"] = "keywords"
        return result

    def run(self, features, make_request, concepts):
        # rendering happens on the worker threads too, so it overlaps with the requests in flight
        def work(f: int):
            request = make_request(f)
            return request, self._one(request, concepts)

        # an endpoint that answers every request with an error (a proxy before a dead server says 502)
        # would otherwise cost the whole retry budget for every feature: hours, for a large index
        give_up, failed_in_a_row = max(10, 2 * self.concurrency), 0
        results = threaded(features, work, self.concurrency, cancel=self.client.close)
        try:
            for f, outcome in results:
                failed_in_a_row = failed_in_a_row + 1 if isinstance(outcome, TransientRequestError) else 0
                if failed_in_a_row == give_up:
                    raise FatalRequestError(f"{give_up} features in a row failed after retries (last: {outcome}); "
                                            f"{self.client.base_url} seems down; stopped, rerun to retry the rest")
                if isinstance(outcome, BaseException):
                    yield f, None, outcome
                else:
                    yield f, outcome[0], outcome[1]
        finally:
            results.close()  # now, not when garbage-collected: cancels and joins the workers

    def close(self) -> None:
        self.client.close()


def montage(images: list[Image.Image], tile: int = 336, gap: int = 8) -> Image.Image:
    """The images side by side (up to 3 a row), each fitted into a ``tile`` square, on white."""
    cols = min(3, len(images))
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile + (cols - 1) * gap, rows * tile + (rows - 1) * gap), (255, 255, 255))
    for i, im in enumerate(images):
        im = im.convert("RGB")
        scale = tile / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        x, y = (i % cols) * (tile + gap), (i // cols) * (tile + gap)
        sheet.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
    return sheet


def generate(adapter, images: list[Image.Image | None], prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies of an adapter's model to a batch of (image, prompt)."""
    inputs = adapter.build_inputs(images, prompts)
    with torch.inference_mode():
        out = adapter.model.generate(**inputs.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=adapter.tokenizer.pad_token_id)
    new = out[:, inputs.inputs["input_ids"].shape[1]:]
    return [" ".join(t.split()) for t in adapter.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _load(model: str, dtype: str, device: str):
    from ..models import load_adapter

    adapter = load_adapter(model, dtype=dtype, device=device)
    if not adapter.has_vision:
        raise FatalRequestError(f"model {model} takes no images ({adapter.family}); the explainer needs an image-text model")
    return adapter


class HFExplainer(Explainer):
    name = "hf"

    def __init__(self, model: str, batch_size: int = 4, max_new_tokens: int = 96, dtype: str = "float32",
                 device: str = "cpu", tile: int = 336):
        self.model, self.batch_size, self.max_new_tokens, self.tile = model, batch_size, max_new_tokens, tile
        self.adapter = _load(model, dtype, device)

    def explain_batch(self, requests):
        sheets = [montage(r.images, self.tile) for r in requests]
        prompts = [r.prompt + " The images are shown side by side in one picture." for r in requests]
        return [ExplainResult(t) for t in generate(self.adapter, sheets, prompts, self.max_new_tokens)]

    def label_batch(self, explanations):
        replies = generate(self.adapter, [None] * len(explanations),
                           [CONCEPT_TEMPLATE.format(explanation=e) for e in explanations], 40)
        out = []
        for e, reply in zip(explanations, replies):
            concept, category = concept_words.parse_concept_reply(reply)
            out.append((concept, category) if concept else concept_words.keyword_concept(e))
        return out


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
        words = {concept_words._SINGULAR.get(w, w) for w in concept_words._words(d)}
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
    import hashlib

    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


def _scene_phrase(scene: str) -> str:
    return {"sky": "in the sky", "water": "on the water"}.get(scene, f"on the {scene}")


def readable_kinds(model: str, threshold: float = 0.8) -> tuple[str, ...]:
    """The description kinds a demo model reads reliably: those whose question type its build's
    held-out check (``quality.json`` in the model folder) answered at least ``threshold``
    correctly. Parts have no question and are never trusted; without a check, every kind."""
    from pathlib import Path

    from ..io import read_json

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
        self.adapter = _load(model, dtype, device)
        self.kinds = readable_kinds(model)
        self._captions: dict[str, str] = {}

    def explain_batch(self, requests):
        # features often share a region of an image: each distinct view is captioned once
        views = {_image_key(im): im for r in requests for im in r.images}
        todo = [k for k in views if k not in self._captions]
        for start in range(0, len(todo), 16):
            keys = todo[start:start + 16]
            for k, caption in zip(keys, generate(self.adapter, [views[k] for k in keys], [DEMO_PROMPT] * len(keys), self.max_new_tokens)):
                self._captions[k] = caption
        out = []
        for r in requests:
            descriptions = [self._captions[_image_key(im)] for im in r.images]
            explanation, concept, category, votes = vote(descriptions, self.kinds)
            out.append(ExplainResult(explanation, concept, category,
                                     {"descriptions": descriptions, "votes": votes, "kinds": list(self.kinds),
                                      "method": DEMO_VERSION}))
        return out
