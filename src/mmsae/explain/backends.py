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

The demo's offline backend (captions and a vote) is demo-only code: :mod:`mmsae.demo.explainer`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

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


def one_line_replies(adapter, images: list[Image.Image | None], prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies (:func:`mmsae.intervene.generate`) to a batch of (image, prompt), with each run
    of whitespace made one space: explanations are shown as one line, and the demo's vote reads words."""
    from ..intervene import generate

    return [" ".join(t.split()) for t in generate(adapter, images, prompts, max_new_tokens=max_new_tokens)]


def load_image_text_model(model: str, dtype: str, device: str):
    """The adapter of an image-text model for a local explainer (a text-only model is refused)."""
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
        self.adapter = load_image_text_model(model, dtype, device)

    def explain_batch(self, requests):
        sheets = [montage(r.images, self.tile) for r in requests]
        prompts = [r.prompt + " The images are shown side by side in one picture." for r in requests]
        return [ExplainResult(t) for t in one_line_replies(self.adapter, sheets, prompts, self.max_new_tokens)]

    def label_batch(self, explanations):
        replies = one_line_replies(self.adapter, [None] * len(explanations),
                                   [CONCEPT_TEMPLATE.format(explanation=e) for e in explanations], 40)
        out = []
        for e, reply in zip(explanations, replies):
            concept, category = concept_words.parse_concept_reply(reply)
            out.append((concept, category) if concept else concept_words.keyword_concept(e))
        return out
