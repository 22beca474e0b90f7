"""Segmenters: a concept phrase and an image in, a bool mask over the image out (or None).

``None`` means the segmentation failed (nothing found); the IoU scorer counts it as 0, as the
paper does. Backends:

* ``grounded-sam``: GroundingDINO finds boxes for the phrase, SAM turns each box into a mask, and
  the masks are united (the paper's segmenter);
* ``clipseg``: CLIPSeg's per-pixel logits for the phrase, thresholded after a sigmoid;
* ``oracle``: the shapes world's ground truth (the scene is regenerated from the sample's meta and
  the phrase matched against its known concepts);
* ``full``: the whole image (the all-image-mask baseline).

Model backends load lazily, on the first call, so choosing one costs nothing until it is used.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import MmsaeError
from .iou import fit_mask


class Segmenter(Protocol):
    name: str

    def segment(self, image: Image.Image, phrase: str, meta: dict[str, Any] | None = None) -> np.ndarray | None:
        """A bool [height, width] mask of ``phrase`` in ``image``, or None if it is not found."""
        ...


class FullMaskSegmenter:
    """Every pixel: the all-image baseline (its IoU is the activated fraction of the image)."""

    name = "full"

    def segment(self, image, phrase, meta=None):
        return np.ones((image.height, image.width), dtype=bool)


class OracleSegmenter:
    """Exact ground-truth masks for shapes-world images, from the phrase's matched concept."""

    name = "oracle"

    def segment(self, image, phrase, meta=None):
        from ..data import shapes

        scene = scene_from_meta(meta)
        mask = shapes.concept_mask(scene, phrase)
        if mask is None:
            return None
        mask = np.asarray(mask, dtype=bool)
        return mask if mask.any() else None


def scene_from_meta(meta: dict[str, Any] | None):
    """Regenerate a shapes-world scene from a sample's meta (what the index stores per image).

    Scenes are cached (a scorer asks for the same image several times); treat them as read-only.
    """
    if not meta:
        raise MmsaeError("the oracle segmenter and text similarity need shapes-world sample meta, but the index "
                         "has none; use --segmenter grounded-sam or clipseg and the clip scorer for real images")
    return _scene(json.dumps(meta, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _scene(meta_json: str):
    from ..data import shapes

    meta = json.loads(meta_json)
    try:
        return shapes.scene_from_meta(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise MmsaeError(f"sample meta (keys {sorted(meta)}) does not describe a shapes-world scene ({e}); "
                         "the oracle segmenter and text similarity only work on 'shapes:' data") from e


class ClipSegSegmenter:
    """CLIPSeg (``CLIPSegForImageSegmentation``): sigmoid(logits) > threshold, resized to the image."""

    name = "clipseg"

    def __init__(self, model_id: str = "CIDAS/clipseg-rd64-refined", threshold: float = 0.4,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model_id, self.threshold, self.device, self.dtype = model_id, threshold, device, dtype
        self._model = self._processor = None

    def _load(self):
        if self._model is None:
            from transformers import AutoProcessor, CLIPSegForImageSegmentation

            self._processor = AutoProcessor.from_pretrained(self.model_id)
            self._model = CLIPSegForImageSegmentation.from_pretrained(self.model_id, dtype=self.dtype)
            self._model.to(self.device).eval()

    @torch.no_grad()
    def probabilities(self, image: Image.Image, phrase: str) -> np.ndarray:
        """Per-pixel probability of the phrase, float32 [height, width] over the original image."""
        self._load()
        inputs = self._processor(text=[phrase], images=[image.convert("RGB")], padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        logits = self._model(**inputs).logits.float()
        logits = logits.reshape(1, 1, *logits.shape[-2:])
        logits = torch.nn.functional.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                                 align_corners=False)
        return torch.sigmoid(logits)[0, 0].cpu().numpy()

    def segment(self, image, phrase, meta=None):
        mask = self.probabilities(image, phrase) > self.threshold
        return mask if mask.any() else None


class GroundedSamSegmenter:
    """GroundingDINO boxes for the phrase, then SAM masks for the boxes, united into one mask."""

    name = "grounded-sam"

    def __init__(self, detector_id: str = "IDEA-Research/grounding-dino-tiny", sam_id: str = "facebook/sam-vit-base",
                 box_threshold: float = 0.3, text_threshold: float = 0.25, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.detector_id, self.sam_id = detector_id, sam_id
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.device, self.dtype = device, dtype
        self._detector = self._detector_processor = self._sam = self._sam_processor = None

    def _load(self):
        if self._detector is None:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

            self._detector_processor = AutoProcessor.from_pretrained(self.detector_id)
            self._detector = AutoModelForZeroShotObjectDetection.from_pretrained(self.detector_id, dtype=self.dtype)
            self._detector.to(self.device).eval()
            self._sam_processor = SamProcessor.from_pretrained(self.sam_id)
            self._sam = SamModel.from_pretrained(self.sam_id, dtype=self.dtype).to(self.device).eval()

    @staticmethod
    def grounding_text(phrase: str) -> str:
        # GroundingDINO expects lower-case phrases each ending with a period
        text = phrase.strip().lower()
        return text if text.endswith(".") else text + "."

    @torch.no_grad()
    def boxes(self, image: Image.Image, phrase: str) -> list[list[float]]:
        """Boxes (x0, y0, x1, y1) in image pixels that GroundingDINO finds for the phrase."""
        self._load()
        image = image.convert("RGB")
        inputs = self._detector_processor(images=image, text=self.grounding_text(phrase), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        outputs = self._detector(**inputs)
        result = self._detector_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)])[0]
        return result["boxes"].float().cpu().tolist()

    @torch.no_grad()
    def masks_for_boxes(self, image: Image.Image, boxes: list[list[float]]) -> np.ndarray:
        """SAM's best mask for each box, united: bool [height, width]."""
        self._load()
        image = image.convert("RGB")
        inputs = self._sam_processor(images=image, input_boxes=[boxes], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        outputs = self._sam(**inputs, multimask_output=False)
        masks = self._sam_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())[0]
        return masks.reshape(-1, image.height, image.width).any(dim=0).numpy()

    def segment(self, image, phrase, meta=None):
        boxes = self.boxes(image, phrase)
        if not boxes:
            return None
        mask = self.masks_for_boxes(image, boxes)
        return mask if mask.any() else None


def load_segmenter(name: str, *, clipseg_model: str = "CIDAS/clipseg-rd64-refined", clipseg_threshold: float = 0.4,
                   detector_model: str = "IDEA-Research/grounding-dino-tiny", sam_model: str = "facebook/sam-vit-base",
                   box_threshold: float = 0.3, text_threshold: float = 0.25, device: str = "cpu") -> Segmenter:
    """A segmenter by name: ``grounded-sam``, ``clipseg``, ``oracle`` or ``full``."""
    if name == "oracle":
        return OracleSegmenter()
    if name == "clipseg":
        return ClipSegSegmenter(clipseg_model, clipseg_threshold, device=device)
    if name == "grounded-sam":
        return GroundedSamSegmenter(detector_model, sam_model, box_threshold, text_threshold, device=device)
    if name == "full":
        return FullMaskSegmenter()
    raise MmsaeError(f"unknown segmenter {name!r}; choose grounded-sam, clipseg, oracle or full")



def region_caption(scene, activation: np.ndarray) -> str:
    """The ground-truth caption of the shapes-world region the activation covers most.

    The regions are the scene's visible objects (captioned like "red striped star with a hole")
    and the background (captioned with the scene type, e.g. "grass"). Used by the text-similarity
    scorer as the reference the explanation is compared with.
    """
    activation = np.asarray(activation, dtype=bool)
    objects = scene.meta["objects"]
    background = ~np.any(np.stack(scene.object_masks), axis=0) if scene.object_masks else None
    regions = [(m, _object_caption(o)) for m, o in zip(scene.object_masks, objects)]
    if background is not None:
        regions.append((background, scene.meta["scene"]))
    overlaps = [int(np.logical_and(fit_mask(m, activation.shape), activation).sum()) for m, _ in regions]
    if not regions or max(overlaps) == 0:
        return scene.caption
    return regions[int(np.argmax(overlaps))][1]


def _object_caption(obj: dict) -> str:
    from ..data.shapes import object_phrase

    part = obj.get("part")
    return object_phrase(obj) + (f" with {'an' if part == 'outline' else 'a'} {part}" if part else "")
