"""What the runs of one ``score`` call share: the models, loaded once, and the per-image work.

``mmsae score --run A B`` scores several run folders whose indexes often hold the same images (the
demo's language-model and vision-tower runs index the same held-out set). The expensive work per
image does not depend on the run: a segmenter's mask of a phrase on an image, an image's CLIP or
MS-encoder embedding. :class:`SharedWork` holds the models and caches that work, keyed by
:meth:`FeatureIndex.sample_digest` (the image copy's bytes and the sample's meta), not by sample
id: ids are positions in the indexed data, so two indexes over other data share ids for other
pictures. A mask is a pure function of its key, so a run's IoU rows are the same scored with
others or alone; embeddings are computed in batches, whose make-up can change an embedding's last
bits on a GPU (on the CPU a run scored with others writes the bytes it writes alone).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from .segmenters import Segmenter, load_segmenter

if TYPE_CHECKING:
    from . import ScoreConfig

# The mask cache's bound. A feature's IoU rows need about a hundred masks (top and random images,
# Network Dissection's samples, under its own and the shuffled phrase), and masks are reused when
# another feature, or another run, segments the same phrase on the same image. Masks are kept
# bit-packed (1/8 byte a pixel): 256 MiB hold ~7,000 masks of 640 x 480 images (~40,000 of the
# demo's 224 x 224), far more than one feature needs, while the (image, phrase) pairs of a large
# run have no bound; the least recently used go first.
MASK_CACHE_BYTES = 256 * 2**20
ENTRY_BYTES = 256  # a cached entry's key and bookkeeping, so failed segmentations (None) count too

MISSING = object()  # what MaskCache.get returns for a key it does not hold


class MaskCache:
    """``key -> mask`` (a bool array, or None: nothing found), least recently used out first once the
    entries pass ``max_bytes``. A mask comes back as a new array, so no caller can change the cache."""

    def __init__(self, max_bytes: int = MASK_CACHE_BYTES):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._masks: OrderedDict[Hashable, tuple[tuple[int, ...], np.ndarray] | None] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        """The mask stored under ``key`` (None for a failed segmentation), or ``MISSING``."""
        if key not in self._masks:
            return MISSING
        self._masks.move_to_end(key)
        entry = self._masks[key]
        if entry is None:
            return None
        shape, bits = entry
        return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)

    def put(self, key: Hashable, mask: np.ndarray | None) -> None:
        if key in self._masks:
            return
        entry = None if mask is None else (np.shape(mask), np.packbits(np.asarray(mask, dtype=bool)))
        self._masks[key] = entry
        self.nbytes += _size(entry)
        while self.nbytes > self.max_bytes and len(self._masks) > 1:
            _, old = self._masks.popitem(last=False)
            self.nbytes -= _size(old)

    def __len__(self) -> int:
        return len(self._masks)


def _size(entry: tuple[tuple[int, ...], np.ndarray] | None) -> int:
    return ENTRY_BYTES + (0 if entry is None else entry[1].nbytes)


class SharedWork:
    """The models of one ``score`` call, each loaded at most once, and the per-image work of its runs.

    ``segmenter`` replaces the one ``cfg.segmenter`` names (a notebook's own, or a wrapper that
    counts calls). The embedding caches live in the models (:class:`.clip.ClipScorer`,
    :class:`.monosemanticity.ImageEncoder`): one embedding per distinct image, so they are bounded by
    the images the runs' indexes keep (a few KB each), as the indexes themselves are.
    """

    def __init__(self, cfg: ScoreConfig, segmenter: Segmenter | None = None, mask_bytes: int = MASK_CACHE_BYTES):
        self.cfg = cfg
        self._segmenter = segmenter
        self.masks = MaskCache(mask_bytes)
        self._adapters: dict[str, Any] = {}

    @cached_property
    def segmenter(self) -> Segmenter:
        cfg = self.cfg
        return self._segmenter or load_segmenter(
            cfg.segmenter, clipseg_model=cfg.clipseg_model, clipseg_threshold=cfg.clipseg_threshold,
            detector_model=cfg.detector_model, sam_model=cfg.sam_model, box_threshold=cfg.box_threshold,
            text_threshold=cfg.text_threshold, device=cfg.device)

    def mask(self, index, sample_id: int, phrase: str, image=None, meta: dict | None = None) -> np.ndarray | None:
        """The segmenter's mask of ``phrase`` on an index's sample (None: not found), each (image,
        phrase) segmented once while it stays in the cache. ``image`` and ``meta`` are loaded from
        the index when not given, and only when the mask is not cached."""
        key = (index.sample_digest(sample_id), phrase)
        mask = self.masks.get(key)
        if mask is MISSING:
            image = index.image(sample_id) if image is None else image
            meta = index.sample_meta(sample_id) if meta is None else meta
            mask = self.segmenter.segment(image, phrase, meta)
            self.masks.put(key, mask)
            mask = self.masks.get(key)  # as every later hit sees it (a bool array)
        return mask

    @cached_property
    def clip(self):
        from .clip import ClipScorer

        return ClipScorer(self.cfg.clip_model, device=self.cfg.device)

    @cached_property
    def text(self):
        from .clip import TextSimilarity

        return TextSimilarity(self.cfg.text_model, device=self.cfg.device)

    @cached_property
    def ms_encoder(self):
        from .monosemanticity import ImageEncoder

        return ImageEncoder(self.cfg.ms_model, device=self.cfg.device)

    def adapter(self, model_id: str):
        """The hf judge's model (runs of other models each load theirs, once)."""
        if model_id not in self._adapters:
            from ..models import load_adapter

            self._adapters[model_id] = load_adapter(model_id, device=self.cfg.device)
        return self._adapters[model_id]
