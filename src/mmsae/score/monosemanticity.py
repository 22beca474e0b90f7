"""The monosemanticity score (MS) of Pach et al. 2025, under an image encoder other than the model's.

"Sparse Autoencoders Learn Monosemantic Features in Vision-Language Models": for a latent with
activations ``a_n`` on images ``n``, scaled to ``w_n = (a_n - lo) / (hi - lo)`` in [0, 1], and
``s(n, m)`` the cosine similarity of the images' embeddings under a separate image encoder,

    MS = sum_{n<m} w_n w_m s(n, m) / sum_{n<m} w_n w_m

so 1 when the latent fires only on images the encoder finds identical, and the encoder's baseline
similarity when it fires on unrelated ones.

Which images and activations (what mmsae computes, and how it differs from the paper):

* Pach et al. sum over every image of a validation set, with the latent's min and max over that
  set (their ``metric.py``), one activation per image (the CLS token's).
* mmsae's index keeps each feature's top images, so MS here is over the feature's top images: its
  top ``ms_top`` examples (by default every one the index keeps, its ``top_n``), each with its
  image-level score, the index's ``image_score`` (max or mean of the latent over the image's
  tokens), the number that ranks them. MS of the top images is the paper's formula on the images
  that drive the latent most; it tends to sit above the whole-dataset MS, which also weighs in
  the many images where the latent fires weakly.
* Scaling: ``hi`` is the largest of those scores, which is the feature's maximum image score over
  the whole dataset (the top list is ranked by it); ``lo`` is 0, the dataset minimum of any latent
  that is silent on some image (SAE latents are never negative). So each weight is the paper's
  min-max scaled activation. MS does not change with ``hi`` (it cancels); ``lo = 0`` rather than the
  smallest top score keeps the weakest top image in the sum, as the paper's dataset minimum does.

Baseline (``shuffled``): the same images' MS with latent assignments shuffled. Every feature's
(image, weight) pairs go into one pool, which a seeded permutation deals back out with each
feature's list size; an image dealt twice to one feature is kept once, with its larger weight
(an image appears once in a dataset). The mean over features is then what the encoder gives
images drawn from the same pool and weighted the same way, with no latent choosing them.

Embeddings are each encoder's pooled image embedding: ``get_image_features`` for image-text dual
encoders (CLIP, SigLIP: the projected embedding), else the vision model's ``pooler_output``
(DINOv2: the normalised CLS token; CLIPVisionModel: the normalised CLS before projection), else the
mean of its last hidden state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import MmsaeError

OPTION = "--ms-model"


def minmax(activations: Sequence[float], low: float = 0.0, high: float | None = None) -> np.ndarray:
    """Activations scaled to [0, 1]: ``(a - low) / (high - low)``, ``high`` defaulting to their max.

    All zeros when ``high <= low`` (a latent that never rises above its minimum has no weight).
    """
    a = np.asarray(activations, dtype=np.float64)
    if high is None:
        high = float(a.max()) if a.size else low
    if high <= low:
        return np.zeros_like(a)
    return np.clip((a - low) / (high - low), 0.0, 1.0)


def monosemanticity(weights: Sequence[float], embeddings) -> float:
    """MS of one latent: ``weights`` [N] (already scaled to [0, 1]), ``embeddings`` [N, D].

    NaN when it is undefined: fewer than two images, or no pair with weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    e = np.asarray(embeddings, dtype=np.float64)
    if w.size < 2:
        return float("nan")
    e = e / np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
    pair = np.triu(np.ones((w.size, w.size), dtype=bool), k=1)  # n < m
    relevance = np.outer(w, w)[pair]
    total = relevance.sum()
    if total <= 0:
        return float("nan")
    return float((relevance * (e @ e.T)[pair]).sum() / total)


def shuffled_assignments(sets: dict[int, list[tuple[int, float]]], seed: int) -> dict[int, list[tuple[int, float]]]:
    """Each feature's (sample id, weight) pairs, dealt out again at random across features.

    The pool is every pair of every feature (in feature order); a seeded permutation of it is cut
    into lists of each feature's size. A sample dealt twice to one feature is kept once, with its
    larger weight.
    """
    features = sorted(sets)
    pool = [pair for f in features for pair in sets[f]]
    order = np.random.default_rng([seed, 3]).permutation(len(pool))
    out, start = {}, 0
    for f in features:
        best: dict[int, float] = {}
        for i in order[start:start + len(sets[f])]:
            sid, w = pool[i]
            best[sid] = max(w, best.get(sid, w))
        out[f] = list(best.items())
        start += len(sets[f])
    return out


def _image_model_kind(model_id: str) -> str:
    """``"dual"`` for an image-text dual encoder, ``"vision"`` for a vision model; else a one-line error."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                                                        MODEL_MAPPING)

    from ..models import _first_line

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise MmsaeError(f"{OPTION} {model_id}: cannot read a model config ({_first_line(e)}); "
                         "give an image encoder's hub id or folder (CLIP, SigLIP, DINOv2)") from e
    try:
        cls = MODEL_MAPPING[type(config)]
    except KeyError:
        cls = None
    if config.model_type in MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES and hasattr(cls, "get_image_features"):
        return "dual"
    if cls is not None and getattr(cls, "main_input_name", None) == "pixel_values":
        return "vision"
    raise MmsaeError(f"{OPTION} {model_id} is a {config.model_type} model, not an image encoder; "
                     "give a CLIP, SigLIP or DINOv2 hub id or folder")


class ImageEncoder:
    """Pooled image embeddings from a transformers image encoder (hub id or folder), cached per image.

    Images are embedded ``batch_size`` at a time (one at a time cost 15% on the CPU and far more
    on a GPU); on a GPU an embedding's last bits can depend on its batch, so scoring runs together
    or apart may differ there in the last digits (on the CPU the two are bit-identical).
    """

    def __init__(self, model_id: str, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoModel

        from ..models import _first_line

        self.model_id, self.device, self.batch_size = str(model_id), device, batch_size
        self.kind = _image_model_kind(self.model_id)
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.model_id, trust_remote_code=False)
            self.model = AutoModel.from_pretrained(self.model_id, dtype=torch.float32, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise MmsaeError(f"{OPTION} {self.model_id}: cannot load the image encoder or its image processor "
                             f"({_first_line(e)})") from e
        self.model.to(device).eval().requires_grad_(False)
        # one embedding per distinct image: bounded by the images the scored indexes keep
        self._cache: dict[Hashable, np.ndarray] = {}

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """Pooled embeddings [len(images), D], float32 on the CPU."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, torch.float32)
        if self.kind == "dual":
            out = self.model.get_image_features(pixel_values=pixels)
            # transformers 5 returns a model output whose pooler_output is the projected embedding
            emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            out = self.model(pixel_values=pixels)
            emb = getattr(out, "pooler_output", None)
            if emb is None:  # a vision model without a pooled output: the mean over its tokens
                emb = out.last_hidden_state.mean(1)
        return emb.flatten(1).float().cpu()

    def embed_samples(self, keys: Sequence[Hashable], load: Callable[[Hashable], Image.Image],
                      progress: bool = False) -> np.ndarray:
        """Embeddings [len(keys), D] of the images ``load(key)`` gives (sample ids, or any key that
        names one image); each distinct key is embedded once."""
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        starts = range(0, len(missing), self.batch_size)
        for start in tqdm(starts, desc="embed images", unit="batch", disable=not progress or not missing):
            batch = missing[start:start + self.batch_size]
            for key, emb in zip(batch, self.embed([load(k) for k in batch]).numpy()):
                self._cache[key] = emb
        return np.stack([self._cache[k] for k in keys]) if len(keys) else np.zeros((0, 0))
