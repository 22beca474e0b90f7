"""Plain decoder-only language models (Llama family, e.g. SmolLM2): text only."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from .base import TokenLayout
from .common import ChatAdapter


class CausalLMAdapter(ChatAdapter):
    """A causal LM whose ``processor`` is its tokenizer; every position is a text position."""

    family = "causal_lm"
    model_class = AutoModelForCausalLM
    has_vision = False

    def image_token_ids(self) -> list[int]:
        return []

    def _messages(self, prompt: str, has_image: bool) -> list[dict]:
        return [{"role": "user", "content": prompt}]

    def format_prompt(self, prompt: str, has_image: bool, add_generation_prompt: bool = True) -> str:
        if self._uses_template():
            return self.tokenizer.apply_chat_template(
                self._messages(prompt, False), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return prompt

    def _process(self, texts: list[str], images: list[Image.Image | None]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not self._uses_template()))

    def token_layouts(self, inputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int] | None]) -> list[TokenLayout]:
        return [self.empty_layout(ids, mask) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
