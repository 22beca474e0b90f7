"""PaliGemma: a square grid of SigLIP patch tokens in front of a prefix-LM prompt.

PaliGemma has no chat template: the processor puts the image tokens first, then BOS, the
prompt and a newline; an answer goes in as the processor's ``suffix`` (followed by EOS), and
``token_type_ids`` mark it (the prefix attends bidirectionally). Every sequence needs an image.
"""

from __future__ import annotations

from PIL import Image
from transformers import PaliGemmaForConditionalGeneration

from ..errors import MmsaeError
from .base import ModelInputs
from .common import rgb
from .llava import LlavaAdapter


class PaliGemmaAdapter(LlavaAdapter):
    family = "paligemma"
    model_class = PaliGemmaForConditionalGeneration
    requires_image = True

    def format_prompt(self, prompt: str, has_image: bool, add_generation_prompt: bool = True) -> str:
        return self.image_placeholder() + prompt

    def build_inputs(
        self,
        images: list[Image.Image | None] | None,
        prompts: list[str],
        answers: list[str] | None = None,
        add_generation_prompt: bool = True,
    ) -> ModelInputs:
        n = len(prompts)
        if images is None or len(images) != n or any(im is None for im in images):
            raise MmsaeError(f"{self.model_id} is a PaliGemma model: every prompt needs an image (got {0 if images is None else sum(im is not None for im in images)} images for {n} prompts)")
        if answers is not None and len(answers) != n:
            raise MmsaeError(f"build_inputs got {len(answers)} answers for {n} prompts; give one per prompt")
        self.tokenizer.padding_side = "left"
        texts = [self.format_prompt(p, True) for p in prompts]
        kwargs = dict(text=texts, images=[rgb(im) for im in images], padding=True, return_tensors="pt")
        if answers is not None:
            kwargs["suffix"] = list(answers)
        batch = dict(self.processor(**kwargs))
        batch.pop("labels", None)  # training targets; callers compute their own losses
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        answer_mask = None
        if answers is not None:
            # the suffix is marked by token_type_ids; its last token is the appended EOS
            answer_mask = batch["token_type_ids"].bool().clone()
            answer_mask[:, -1] = False
        sizes = [im.size for im in images]
        return ModelInputs(inputs=batch, layouts=self.token_layouts(batch, sizes), answer_mask=answer_mask)
