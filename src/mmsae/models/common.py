"""Input building shared by the families that use a chat template and a Hugging Face processor."""

from __future__ import annotations

import inspect
import types

import torch
from PIL import Image

from ..errors import MmsaeError
from .base import ModelAdapter, ModelInputs, RowMap, TokenLayout


def rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def answer_mask_from_lengths(attention_mask: torch.Tensor, answer_lengths: list[int]) -> torch.Tensor:
    """[B, T] mask of the last ``answer_lengths[i]`` tokens of each (left-padded) sequence."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    seq_len = attention_mask.shape[1]
    for i, n in enumerate(answer_lengths):
        if n > 0:
            mask[i, seq_len - n :] = True
    return mask


class ChatAdapter(ModelAdapter):
    """build_inputs via the processor's chat template; subclasses give ``image_sequence_layout``.

    A chat template produces text that already holds the special tokens, so the text is
    tokenized with ``add_special_tokens=False`` (as ``apply_chat_template`` itself does).
    Without a chat template the prompt is used as is, after the family's image placeholder.
    """

    @property
    def image_token_id(self) -> int:
        """The placeholder token that the processor repeats once per image feature."""
        config = self.model.config
        token_id = getattr(config, "image_token_id", None)
        return int(token_id if token_id is not None else config.image_token_index)

    # token ids that belong to an image (patches, newlines, separators): never "text"
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id]

    def image_placeholder(self) -> str:
        return getattr(self.processor, "image_token", "<image>")

    def _messages(self, prompt: str, has_image: bool) -> list[dict]:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]

    def format_prompt(self, prompt: str, has_image: bool, add_generation_prompt: bool = True) -> str:
        """The prompt text after the chat template (with the image placeholder, not yet expanded)."""
        if self._uses_template():
            return self.processor.apply_chat_template(
                self._messages(prompt, has_image), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return (self.image_placeholder() + "\n" if has_image else "") + prompt

    def _uses_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None))

    def _process(self, texts: list[str], images: list[Image.Image | None]) -> dict[str, torch.Tensor]:
        """Run the processor; ``images[i]`` belongs to ``texts[i]`` (None: no image)."""
        kwargs = dict(text=texts, padding=True, return_tensors="pt", add_special_tokens=not self._uses_template())
        present = [rgb(im) for im in images if im is not None]
        if present:
            kwargs["images"] = present
        return dict(self.processor(**kwargs))

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=not self._uses_template())["input_ids"])

    def build_inputs(
        self,
        images: list[Image.Image | None] | None,
        prompts: list[str],
        answers: list[str] | None = None,
        add_generation_prompt: bool = True,
    ) -> ModelInputs:
        n = len(prompts)
        images = list(images) if images is not None else [None] * n
        if len(images) != n or (answers is not None and len(answers) != n):
            raise MmsaeError(f"build_inputs got {len(images)} images, {n} prompts and {len(answers or [])} answers; give one of each per sequence")
        if any(im is not None for im in images) and not self.has_vision:
            raise MmsaeError(f"{self.model_id} is a text-only model ({self.family}); pass no images")
        self.tokenizer.padding_side = "left"
        prefixes = [self.format_prompt(p, im is not None, add_generation_prompt) for p, im in zip(prompts, images)]
        texts = [p + a for p, a in zip(prefixes, answers)] if answers is not None else prefixes
        batch = self._process(texts, images)
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                batch[k] = v.to(self.dtype)
        answer_mask = None
        if answers is not None:
            # the answer's tokens: those the answer adds to the prompt (the image placeholder
            # expands the same way in both, so the plain tokenizer counts are enough)
            lengths = [self._count_tokens(t) - self._count_tokens(p) for t, p in zip(texts, prefixes)]
            answer_mask = answer_mask_from_lengths(batch["attention_mask"], lengths)
        sizes = [im.size if im is not None else None for im in images]
        return ModelInputs(inputs=batch, layouts=self.token_layouts(batch, sizes), answer_mask=answer_mask)

    # --- token_layouts ----------------------------------------------------------------------
    def token_layouts(self, inputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int] | None]) -> list[TokenLayout]:
        """One layout per sequence; a sequence with no image gets an empty one, the rest
        :meth:`image_sequence_layout` (``image_index`` counts the images of the batch so far)."""
        layouts = []
        image_index = 0
        for ids, mask, size in zip(inputs["input_ids"], inputs["attention_mask"], image_sizes):
            positions = torch.nonzero(ids == self.image_token_id).flatten().cpu()
            if size is None or positions.numel() == 0:
                layouts.append(self.empty_layout(ids, mask))
                continue
            layouts.append(self.image_sequence_layout(inputs, image_index, positions, tuple(size), self.text_positions(ids, mask)))
            image_index += 1
        return layouts

    def image_sequence_layout(self, inputs: dict[str, torch.Tensor], image_index: int, positions: torch.Tensor,
                              size: tuple[int, int], text_positions: torch.Tensor) -> TokenLayout:
        """The layout of one sequence whose image placeholders sit at ``positions`` (family-specific)."""
        raise NotImplementedError

    def text_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Non-padding positions that are not image placeholders, for one sequence."""
        if getattr(self, "_image_ids", None) is None:
            self._image_ids = torch.tensor(self.image_token_ids(), dtype=torch.long)
        is_image = torch.isin(input_ids, self._image_ids.to(input_ids.device))
        return torch.nonzero(attention_mask.bool() & ~is_image).flatten().cpu()

    # --- site geometry ---------------------------------------------------------------------
    def projector_rows(self, inputs: ModelInputs) -> RowMap:
        """The projector's rows are the image placeholders of the batch, in the order the model
        scatters them into the sequence (row-major over [B, T]), permuted by
        :meth:`projector_order`; each gets its language-model layout cell. A placeholder the
        layout leaves out (LLaVA's CLS under the "full" feature strategy) is a special row."""
        placeholder = (inputs.input_ids == self.image_token_id).cpu()
        batch, seq = placeholder.shape
        rank = placeholder.flatten().cumsum(0).reshape(batch, seq) - 1
        rows = RowMap.empty(int(placeholder.sum()), [layout.tiles for layout in inputs.layouts])
        for i, layout in enumerate(inputs.layouts):
            if layout.image_size is None:
                continue
            own = rank[i][placeholder[i]]
            rows.sample[own], rows.tile[own], rows.special[own] = i, 0, True
            patch = rank[i, layout.positions]
            rows.tile[patch], rows.row[patch], rows.col[patch], rows.special[patch] = layout.tile, layout.row, layout.col, False
        order = self.projector_order(inputs)
        if order is not None:
            rows.sample, rows.tile, rows.row, rows.col, rows.special = (t[order] for t in (rows.sample, rows.tile, rows.row, rows.col, rows.special))
        return rows

    def projector_order(self, inputs: ModelInputs) -> torch.Tensor | None:
        """Which placeholder each projector output row feeds (None: the same order)."""
        return None

    def empty_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TokenLayout:
        z = torch.zeros(0, dtype=torch.long)
        return TokenLayout(z, z, z, z, [], None, self.text_positions(input_ids, attention_mask))


def processor_without_video(processor_class: type) -> type:
    """``processor_class`` minus its video processor.

    Qwen2-VL- and OneVision-style processors require a video processor, and transformers' video
    processors need torchvision; images and text do not. transformers builds, checks, loads and
    saves a processor's parts from ``get_attributes()``, so leaving ``video_processor`` out of
    that list lets the processor load and save with torch alone (its ``video_processor``
    argument stays None).
    """

    class WithoutVideo(processor_class):
        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

    init = processor_class.__init__
    if inspect.signature(init).parameters["video_processor"].default is inspect.Parameter.empty:
        # SmolVLM requires the argument: the same __init__ (transformers reads its code's
        # argument names) with None defaults for the sub-processors
        positional = [p for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]
        defaults = tuple(None if p.default is inspect.Parameter.empty else p.default for p in positional)
        relaxed = types.FunctionType(init.__code__, init.__globals__, init.__name__, defaults, init.__closure__)
        relaxed.__kwdefaults__ = init.__kwdefaults__
        WithoutVideo.__init__ = relaxed
    WithoutVideo.__name__ = WithoutVideo.__qualname__ = processor_class.__name__
    return WithoutVideo
