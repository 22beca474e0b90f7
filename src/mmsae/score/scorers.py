"""The scorers behind one interface, registered by name in :data:`SCORERS`.

A :class:`Scorer` is built once per run from the shared :class:`Context` (config, index, the
features to score, and the models and per-image work the scorers and runs of one call share,
:class:`.shared.SharedWork`) and then scores one feature at a time: given a
:class:`FeatureCase` (the feature's top examples, its explanation and the shuffled one, random
other images) it yields rows ``(scorer, baseline, value, details)``. Each scorer handles the
baselines that mean something for it; the stage (:mod:`mmsae.score`) turns the rows into
``scores.jsonl`` lines. A new scorer is one subclass here and its entry in :data:`SCORERS`
(whose order is the order of the rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .baselines import random_images
from .detection import ChatJudge, ClipJudge, DetectionItem, OracleJudge, adapter_asker, detect, openai_asker
from .iou import dataset_iou, intersection_union, iou, netdissect_iou, resolution_ceiling
from .segmenters import FullMaskSegmenter, region_caption, scene_from_meta

if TYPE_CHECKING:
    from . import ScoreConfig
    from .shared import SharedWork

Row = tuple[str, str, float, dict]  # (scorer, baseline, value, details)


class FeatureData:
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


@dataclass
class FeatureCase:
    """What every scorer sees of one feature.

    ``texts`` maps a baseline to the ``(explanation, concept phrase)`` scored under it: ``none``
    (the feature's own) and, when asked for, ``shuffled`` (another feature's). The random images
    (``rand_*``) never activate the feature (``activating``); ``rand_maps`` are the feature's own
    maps laid over them (the paper's random baseline).
    """

    feature: int
    data: FeatureData
    texts: dict[str, tuple[str, str]]
    activating: set[int]
    rand_ids: list[int]
    rand_images: list
    rand_metas: list[dict]
    rand_maps: list[np.ndarray]


@dataclass
class Context:
    """What the scorers of one run share: the config, the index, every feature to score, the
    index's images (the pool random images come from), and what every run of the call shares
    (``shared``: the models, each loaded once, and the masks and embeddings of its images)."""

    cfg: ScoreConfig
    index: Any
    features: list[int]
    pool: list[int]
    shared: SharedWork

    @property
    def clip(self):
        return self.shared.clip

    def image_key(self, sample_id: int) -> str:
        """What names the sample's image in the shared caches (:meth:`FeatureIndex.sample_digest`)."""
        return self.index.sample_digest(sample_id)


class Scorer:
    """One score per feature and baseline. ``name`` is its ``--scorers`` choice. ``of_explanation``
    is False for a score of the feature itself, whose ``shuffled`` baseline deals out images, not
    explanations (its rows then name no partner explanation)."""

    name = ""
    of_explanation = True

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def prepare(self, features: list[int]) -> None:
        """Work done once, with progress, before the features are scored (default: none)."""

    def score(self, case: FeatureCase) -> Iterator[Row]:
        raise NotImplementedError


class IouScore(Scorer):
    """The concept phrase segmented on each top image, against the feature's binarised maps
    (mean IoU, a failed segmentation counts 0), and Network Dissection's dataset-level IoU.
    Baselines: shuffled, random_images, full_mask; upper bounds: ceiling, best_concept."""

    name = "iou"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.full = FullMaskSegmenter()
        self._reservoir: dict[int, list] = {}  # the current feature's firing sample with binarised maps

    def _segment(self, sample_id: int, phrase: str, image=None, meta=None):
        # the call's shared masks: an (image, phrase) pair is segmented once for every feature and run
        return self.ctx.shared.mask(self.ctx.index, sample_id, phrase, image, meta)

    def _netdissect(self, feature: int, phrase: str, activating: set[int]) -> tuple[float, dict] | None:
        """Network Dissection's dataset-level IoU of ``phrase``, estimated from the index's samples.

        The firing images are the index's uniform sample of images where the feature fires; the
        non-firing ones are ``netdissect_images`` random other images. None when the index keeps
        no such sample (an index built without random examples).
        """
        from ..heatmap import binarize_example

        cfg, index = self.ctx.cfg, self.ctx.index
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
        firing = [intersection_union(self._segment(s, phrase), act) for s, act in sample]
        negatives = random_images(self.ctx.pool, activating, cfg.netdissect_images, cfg.seed + 1, feature)
        areas = []
        for s in negatives:
            mask = self._segment(s, phrase)
            areas.append(0 if mask is None else int(mask.sum()))
        value = netdissect_iou(firing, n_firing, areas, n_images)
        return value, {"n_images": n_images, "n_firing": n_firing, "firing_sampled": len(firing),
                       "nonfiring_sampled": len(areas)}

    def _best_concept(self, data: FeatureData) -> dict | None:
        """The ground-truth concept of the top images whose masks match the feature's maps best."""
        candidates = sorted({name for m in data.metas for name in scene_from_meta(m).concepts})
        best = None
        for phrase in candidates:
            per_image = [iou(self._segment(s, phrase, im, m), a)
                         for s, im, m, a in zip(data.sample_ids, data.images, data.metas, data.maps)]
            if best is None or np.mean(per_image) > best["value"]:
                best = {"value": float(np.mean(per_image)), "per_image": per_image, "phrase": phrase}
        if best is not None:
            best["candidates"] = len(candidates)
        return best

    def score(self, case: FeatureCase) -> Iterator[Row]:
        cfg, data = self.ctx.cfg, case.data
        common = {"segmenter": cfg.segmenter, "binarization": data.binarization}
        for baseline, (_, phrase) in case.texts.items():
            masks = [self._segment(s, phrase, im, m) for s, im, m in zip(data.sample_ids, data.images, data.metas)]
            per_image = [iou(mk, a) for mk, a in zip(masks, data.maps)]
            failed = sum(mk is None for mk in masks)
            yield "iou", baseline, np.mean(per_image), dict(per_image=per_image, failed=failed, phrase=phrase, **common)
            if cfg.netdissect_images > 0:
                estimate = self._netdissect(case.feature, phrase, case.activating)
                if estimate is not None:
                    yield "iou_dataset", baseline, estimate[0], dict(phrase=phrase, **estimate[1],
                                                                      pooled_top_images=dataset_iou(masks, data.maps), **common)
        phrase = case.texts["none"][1]
        if "random_images" in cfg.baselines and case.rand_ids:
            masks = [self._segment(s, phrase, im, m) for s, im, m in zip(case.rand_ids, case.rand_images, case.rand_metas)]
            per_image = [iou(mk, a) for mk, a in zip(masks, case.rand_maps)]
            yield "iou", "random_images", np.mean(per_image), dict(per_image=per_image, phrase=phrase,
                                                                   failed=sum(mk is None for mk in masks),
                                                                   sample_ids=case.rand_ids, **common)
        if "ceiling" in cfg.baselines:
            masks = [self._segment(s, phrase, im, m) for s, im, m in zip(data.sample_ids, data.images, data.metas)]
            per_image = [resolution_ceiling(lay, mk) for lay, mk in zip(data.layouts, masks)]
            yield "iou", "ceiling", np.mean(per_image), dict(
                per_image=per_image, phrase=phrase, segmenter=cfg.segmenter,
                binarization={"method": "best threshold of the concept's coverage per token"})
        if "best_concept" in cfg.baselines and cfg.segmenter == "oracle":
            best = self._best_concept(data)
            if best is not None:
                yield "iou", "best_concept", best.pop("value"), dict(**best, **common)
        if "full_mask" in cfg.baselines:
            per_image = [iou(self.full.segment(im, ""), a) for im, a in zip(data.images, data.maps)]
            yield "iou", "full_mask", np.mean(per_image), dict(per_image=per_image, **common)


class ClipScore(Scorer):
    """CLIP score between the explanation and each top image. Baselines: shuffled, random_images."""

    name = "clip"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.clip = ctx.clip

    def score(self, case: FeatureCase) -> Iterator[Row]:
        cfg = self.ctx.cfg
        keys = [self.ctx.image_key(s) for s in case.data.sample_ids]
        for baseline, (explanation, _) in case.texts.items():
            per_image = self.clip.score(explanation, case.data.images, keys)
            yield "clip", baseline, np.mean(per_image), dict(per_image=per_image, model=cfg.clip_model)
        if "random_images" in cfg.baselines and case.rand_ids:
            per_image = self.clip.score(case.texts["none"][0], case.rand_images,
                                        [self.ctx.image_key(s) for s in case.rand_ids])
            yield "clip", "random_images", np.mean(per_image), dict(per_image=per_image, model=cfg.clip_model,
                                                                    sample_ids=case.rand_ids)


class TextSimilarityScore(Scorer):
    """MiniLM similarity between the explanation and the ground-truth caption of each activated
    region (shapes world only; the offline stand-in for CLIP score). Baselines: shuffled, random_images."""

    name = "text_similarity"
    measure = "MiniLM cosine x100 vs ground-truth caption of the activated region"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.text = ctx.shared.text

    def score(self, case: FeatureCase) -> Iterator[Row]:
        data = case.data
        captions = [region_caption(scene_from_meta(m), a) for m, a in zip(data.metas, data.maps)]
        for baseline, (explanation, _) in case.texts.items():
            per_image = self.text.score(explanation, captions)
            yield "text_similarity", baseline, np.mean(per_image), dict(per_image=per_image, references=captions,
                                                                        measure=self.measure)
        if "random_images" in self.ctx.cfg.baselines and case.rand_ids:
            rand_captions = [region_caption(scene_from_meta(m), a) for m, a in zip(case.rand_metas, case.rand_maps)]
            per_image = self.text.score(case.texts["none"][0], rand_captions)
            yield "text_similarity", "random_images", np.mean(per_image), dict(
                per_image=per_image, references=rand_captions, sample_ids=case.rand_ids, measure=self.measure)


def make_judge(ctx: Context):
    """The detection judge ``--judge`` names."""
    cfg = ctx.cfg
    if cfg.judge == "oracle":
        return OracleJudge()
    if cfg.judge == "clip":
        return ClipJudge(ctx.clip, key=ctx.image_key)
    if cfg.judge == "openai":
        from ..explain.openai_client import OpenAIClient

        client = OpenAIClient.from_env(cfg.judge_model, cfg.base_url, cfg.api_key,
                                       needs="the openai judge needs --judge-model", max_tokens=8)
        return ChatJudge(openai_asker(client), cfg.judge_prompt)
    adapter = ctx.shared.adapter(cfg.judge_model or ctx.index.cfg["model"])
    return ChatJudge(adapter_asker(adapter), cfg.judge_prompt)


class DetectionScore(Scorer):
    """A judge tells the top images from as many random ones, given the explanation (balanced
    accuracy). Baseline: shuffled; no random images, no score."""

    name = "detection"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.judge = make_judge(ctx)

    def score(self, case: FeatureCase) -> Iterator[Row]:
        if not case.rand_ids:
            return
        data = case.data
        items = ([DetectionItem(s, im, m, True) for s, im, m in zip(data.sample_ids, data.images, data.metas)]
                 + [DetectionItem(s, im, m, False) for s, im, m in zip(case.rand_ids, case.rand_images, case.rand_metas)])
        for baseline, (explanation, phrase) in case.texts.items():
            # the oracle judge matches the concept phrase; model judges read the explanation
            result = detect(self.judge, explanation, items, seed=self.ctx.cfg.seed + case.feature, concept=phrase)
            yield "detection", baseline, result.pop("balanced_accuracy"), dict(judge=self.ctx.cfg.judge, **result)


class MonosemanticityScore(Scorer):
    """Pach et al.'s MS of the feature's top images under a separate image encoder (no explanation
    needed). Baseline: shuffled, the same images dealt out to features at random (:mod:`.monosemanticity`)."""

    name = "monosemanticity"
    of_explanation = False

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        from .monosemanticity import minmax, shuffled_assignments

        cfg = ctx.cfg
        self.encoder = ctx.shared.ms_encoder
        # per feature, its top images with their min-max scaled image scores (see .monosemanticity
        # for which images and why 0 is the minimum), and the shuffled deal
        self.sets: dict[int, list[tuple[int, float]]] = {}
        for f in ctx.features:
            top = ctx.index.top_examples(f, n=cfg.ms_top)
            weights = minmax([e.score for e in top], low=0.0)
            self.sets[f] = [(int(e.sample_id), float(w)) for e, w in zip(top, weights)]
        self.shuffled: dict[int, list[tuple[int, float]]] = {}
        if "shuffled" in cfg.baselines and len(ctx.features) > 1:
            self.shuffled = shuffled_assignments(self.sets, cfg.seed)

    def prepare(self, features: list[int]) -> None:
        """Embed, once each and with a progress bar, every image the scores of ``features`` need."""
        ids = [s for f in features for pairs in (self.sets.get(f), self.shuffled.get(f)) for s, _ in pairs or []]
        self._embed(ids, progress=True)

    def _embed(self, sample_ids: list[int], progress: bool = False) -> np.ndarray:
        # keyed by the image, not the id: the encoder and its embeddings serve every run of the call
        keys = [self.ctx.image_key(s) for s in sample_ids]
        ids = dict(zip(keys, sample_ids))
        return self.encoder.embed_samples(keys, lambda key: self.ctx.index.image(ids[key]), progress=progress)

    def score(self, case: FeatureCase) -> Iterator[Row]:
        from .monosemanticity import monosemanticity

        index = self.ctx.index
        for baseline, pairs in (("none", self.sets[case.feature]), ("shuffled", self.shuffled.get(case.feature))):
            if not pairs:
                continue
            ids, weights = [s for s, _ in pairs], [w for _, w in pairs]
            value = monosemanticity(weights, self._embed(ids))
            if value == value:  # NaN (fewer than two weighted images) is no score
                yield "monosemanticity", baseline, value, dict(
                    sample_ids=ids, weights=weights, model=self.ctx.cfg.ms_model,
                    activation=f"image score ({index.cfg.get('image_score', 'max')} over image tokens) "
                               "/ the feature's top score",
                    **({"shuffled": "latent assignments"} if baseline == "shuffled" else {}))


# every scorer by its --scorers name; a run's rows come in this order
SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (IouScore, ClipScore, TextSimilarityScore, DetectionScore,
                                                              MonosemanticityScore)}
