"""Explaining features with a multimodal model (the paper's explanation step).

``explain(ExplainConfig(index=..., out=..., backend=...))`` shows, for each feature, its top
images (``n_images``, default 5) with the activated region highlighted to an explainer backend
and asks what they share. One row per feature goes to ``explanations.jsonl`` as soon as it is
answered; a rerun asks only for the features that are missing. Rows carry the index's
fingerprint (:func:`mmsae.index.index_fingerprint`): a file holding rows of another index is
refused. ``explanations.jsonl.lock`` keeps a second run from writing the same file at once.

Row: ``{"feature", "explanation", "concept", "category", "backend", "model", "prompt_version",
"evidence", "binarization", "highlight", "index_fingerprint", "sae_fingerprint", "details"}``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import check_config
from ..errors import MmsaeError
from ..io import append_jsonl, check_own_file, latest_rows, output_lock, read_jsonl
from ..runtime import check_dtype, resolve_device
from .backends import Explainer, ExplainRequest, ExplainResult, HFExplainer, OpenAIExplainer, montage
from .concepts import keyword_concept, parse_concept_reply
from .openai_client import DEFAULT_BASE_URL, FatalRequestError, OpenAIClient, TransientRequestError, check_base_url
from .prompts import DEFAULT_TEMPLATE, load_template, render


@dataclass
class ExplainConfig:
    """Options of ``mmsae explain``."""

    index: str = field(metadata={"help": "the feature index folder (RUN/index)"})
    out: str = field(metadata={"help": "explanations file (RUN/explanations.jsonl; a folder gets explanations.jsonl inside)"})
    backend: Literal["openai", "hf", "demo"] = field(default="openai", metadata={"help": "openai: an OpenAI-compatible endpoint; hf: a local transformers model; demo: the offline demo explainer"})
    model: str | None = field(default=None, metadata={"help": "explainer model: endpoint model name (openai), id or path (hf); demo: default the indexed model"})
    base_url: str | None = field(default=None, metadata={"help": f"endpoint base URL (default: $OPENAI_BASE_URL or {DEFAULT_BASE_URL})"})
    api_key: str | None = field(default=None, metadata={"help": "endpoint key (default: $OPENAI_API_KEY)"})
    features: list[int] | None = field(default=None, metadata={"help": "feature ids to explain (default: every feature with examples)", "min": 0})
    max_features: int | None = field(default=None, metadata={"help": "explain at most this many features (the first by id)", "min": 1})
    n_images: int = field(default=5, metadata={"help": "top images shown per feature", "min": 1})
    highlight: Literal["mask", "overlay", "crop", "none"] | None = field(default=None, metadata={"help": "how the activated region is shown (default: mask; demo: crop)"})
    binarization: Literal["paper", "quantile", "fraction"] = field(default="paper", metadata={"help": "activated region: paper (> 0), quantile (dataset top 0.5%) or fraction of the max"})
    fraction: float = field(default=0.5, metadata={"help": "for --binarization fraction: the fraction of the feature's maximum", "gt": 0, "max": 1})
    prompt_template: str | None = field(default=None, metadata={"help": "prompt template text or @file ({n_images}, {highlight}, {tokens}, {tokens_line})"})
    include_tokens: bool = field(default=False, metadata={"help": "name the feature's top text tokens in the prompt"})
    concepts: bool = field(default=True, metadata={"help": "also shorten each explanation to a concept phrase and category"})
    concurrency: int = field(default=8, metadata={"help": "openai: requests in flight", "min": 1})
    timeout: float = field(default=60.0, metadata={"help": "openai: wall-clock seconds per request (connect, send and receive)", "gt": 0})
    max_retries: int = field(default=4, metadata={"help": "openai: retries on time-outs, 5xx, 429 and malformed replies, within 3 x --timeout per request in all", "min": 0})
    retry_backoff: float = field(default=1.0, metadata={"help": "openai: seconds before the first retry (doubling after)", "min": 0})
    batch_size: int = field(default=4, metadata={"help": "hf/demo: features per batch", "min": 1})
    max_new_tokens: int = field(default=96, metadata={"help": "hf: tokens generated per explanation", "min": 1})
    image_size: int = field(default=512, metadata={"help": "longest image side sent to the explainer", "min": 16})
    device: str = field(default="auto", metadata={"help": "hf/demo: cpu, cuda or auto"})
    dtype: str = field(default="float32", metadata={"help": "hf/demo: model dtype"})

    def __post_init__(self):
        check_config(self)
        if self.backend == "openai" and self.base_url is not None:
            check_base_url(self.base_url)  # before any work: a typo is not a network failure


def _out_path(out: str) -> Path:
    path = Path(out)
    return path / "explanations.jsonl" if path.is_dir() or path.suffix != ".jsonl" else path


def make_explainer(cfg: ExplainConfig, index) -> Explainer:
    if cfg.backend == "openai":
        client = OpenAIClient.from_env(cfg.model, cfg.base_url, cfg.api_key, timeout=cfg.timeout, max_retries=cfg.max_retries,
                                       backoff=cfg.retry_backoff, max_tokens=max(cfg.max_new_tokens, 64))
        return OpenAIExplainer(client, cfg.concurrency, cfg.image_size)
    device = resolve_device(cfg.device)  # hf and demo run the model here
    check_dtype(cfg.dtype, device)
    if cfg.backend == "hf":
        if not cfg.model:
            raise MmsaeError("the hf backend needs --model (a transformers image-text-to-text model id or path)")
        return HFExplainer(cfg.model, cfg.batch_size, cfg.max_new_tokens, cfg.dtype, device)
    if cfg.backend == "demo":
        from ..demo.explainer import DemoExplainer  # demo-only code: imported only when chosen

        return DemoExplainer(cfg.model or index.cfg["model"], batch_size=cfg.batch_size, dtype=cfg.dtype, device=device,
                             max_new_tokens=min(cfg.max_new_tokens, 40))  # a shapes caption is about 20 tokens
    raise MmsaeError(f"explainer backend {cfg.backend!r} is unknown; use openai, hf or demo")


def request_maker(index, cfg: ExplainConfig, template: str, highlight: str):
    """A function rendering a feature's request: its top images with the activated region highlighted."""
    from ..heatmap import binarize_example, overlay

    def make(f: int) -> ExplainRequest:
        examples = index.top_examples(f, cfg.n_images)
        vmax = index.stats(f)["max_activation"]
        images, records = [], []
        for ex in examples:
            image = index.image(ex.sample_id)
            heat = ex.heatmap()
            mask, record = binarize_example(ex, index, cfg.binarization, fraction=cfg.fraction, heatmap=heat)
            records.append(record)
            images.append(image if highlight == "none" else overlay(image, heat, highlight, mask=mask, vmax=vmax))
        tokens = [t["token"] for t in index.top_tokens(f)[:8]] if cfg.include_tokens else []
        return ExplainRequest(f, images, render(template, len(images), highlight, tokens), [ex.sample_id for ex in examples],
                              records[0] if records else {"method": cfg.binarization})

    return make


def explain(cfg: ExplainConfig) -> Path:
    """Explain the features of an index; returns the path of ``explanations.jsonl``."""
    from ..index import FeatureIndex

    index = FeatureIndex(cfg.index)
    template, prompt_version = load_template(cfg.prompt_template)
    highlight = cfg.highlight or ("crop" if cfg.backend == "demo" else "mask")
    if cfg.features:
        wanted = [index.check_feature(f) for f in cfg.features]
        have = set(index.features())
        empty = [f for f in wanted if f not in have]
        if empty:
            print(f"explain: features {empty[:10]} never fired in the index; nothing to show, skipped", file=sys.stderr)
        features = [f for f in dict.fromkeys(wanted) if f in have]
    else:
        features = index.features()
    if cfg.max_features is not None:
        features = features[: cfg.max_features]
    out = check_own_file(_out_path(cfg.out), ("feature", "explanation"))
    with output_lock(out):  # one writer at a time: two runs would explain every feature twice
        _drop_partial_last_line(out)
        rows = read_jsonl(out)
        # a row of another index (other SAE, data or settings) names evidence samples this index may not hold
        stale = [r for r in rows if r.get("index_fingerprint") != index.fingerprint]
        if stale:
            raise MmsaeError(f"{out} holds {len(stale)} explanations of another index (built with another SAE, other data "
                             f"or other settings, or by an older mmsae); use another --out or move the file away")
        done = set(latest_rows(rows))
        todo = [f for f in features if f not in done]
        if not todo:
            print(f"explain: all {len(features)} features already explained in {out}", flush=True)
            return out
        explainer = make_explainer(cfg, index)
        model_name = explainer.model
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"explain ({cfg.backend})", unit="feature", dynamic_ncols=True)
        failures: list[tuple[int, str]] = []
        written = 0
        start = time.time()
        try:
            for feature, request, result in explainer.run(todo, request_maker(index, cfg, template, highlight), cfg.concepts):
                if isinstance(result, FatalRequestError):
                    raise MmsaeError(f"{result} ({written} explanations written this run are kept in {out})")
                if isinstance(result, KeyboardInterrupt):
                    raise result
                if isinstance(result, BaseException):
                    failures.append((feature, str(result).splitlines()[0] if str(result) else type(result).__name__))
                    bar.update(1)
                    continue
                append_jsonl(out, [_row(request, result, cfg, explainer.name, model_name, prompt_version, highlight, index)])
                written += 1
                bar.update(1)
        except FatalRequestError as e:
            raise MmsaeError(f"{e} ({written} explanations written this run are kept in {out})") from e
        finally:
            bar.close()
            explainer.close()
    rate = written / max(time.time() - start, 1e-9) * 60
    print(f"explain: {written} features explained ({rate:.1f}/min) -> {out}", flush=True)
    if failures:
        f, why = failures[0]
        raise MmsaeError(f"{len(failures)} features failed after retries (feature {f}: {why}); "
                         f"the {written} written are kept, rerun to retry the rest")
    return out


def _drop_partial_last_line(path: Path) -> None:
    """Cut a last line that a crash left without its newline, so appending starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _row(request: ExplainRequest, result: ExplainResult, cfg: ExplainConfig, backend: str, model: str,
         prompt_version: str, highlight: str, index) -> dict:
    if backend == "demo":
        prompt_version = result.details.get("method", prompt_version)
    return {
        "feature": request.feature,
        "explanation": result.explanation,
        "concept": result.concept if cfg.concepts else None,
        "category": result.category if cfg.concepts else None,
        "backend": backend,
        "model": model,
        "prompt_version": prompt_version,
        "evidence": request.evidence,
        "binarization": request.binarization,
        "highlight": highlight,
        "index_fingerprint": index.fingerprint,
        "sae_fingerprint": index.sae_fingerprint,
        "details": result.details,
    }


__all__ = ["DEFAULT_TEMPLATE", "ExplainConfig", "ExplainRequest", "ExplainResult", "Explainer",
           "FatalRequestError", "HFExplainer", "OpenAIClient", "OpenAIExplainer", "TransientRequestError", "explain",
           "keyword_concept", "make_explainer", "montage", "parse_concept_reply"]
