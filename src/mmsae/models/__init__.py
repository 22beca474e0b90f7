"""Model adapters, one per family. ``load_adapter`` picks the family from the model's config.

Conventions every adapter follows (see ``base.TokenLayout``):

- ``layer_module(L)`` is decoder layer L of the language model; its output is the residual
  stream after that layer, equal to ``output_hidden_states[L + 1]`` (the last entry of
  ``output_hidden_states`` is after the final norm instead). ``vision_layer_module(L)`` is
  block L of the vision tower.
- Sites (``mmsae.models.sites``): ``lm:L`` is ``layer_module(L)``, ``vision:L`` vision block L,
  ``projector`` the multimodal projector; ``site_module``, ``site_width`` and ``site_rows``
  (which rows of a site's activation are which image patches) resolve them per family.
- ``build_inputs`` applies the chat template (one image per sequence, placed before the
  prompt), pads on the left and moves everything to the model's device and dtype.
- A layout lists only tokens that carry a patch. Tile 0 is the view of the whole image (LLaVA's
  only grid, LLaVA-NeXT's base image, Idefics3's global image, Qwen2-VL's only grid); further
  tiles are AnyRes crops or sub-images, row by row. Newline, separator and row/column tag tokens
  are neither image positions nor ``text_positions``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from ..errors import MmsaeError
from .base import ModelAdapter, ModelInputs, SiteRows, Tile, TokenLayout, image_heatmap
from .causal_lm import CausalLMAdapter
from .common import processor_without_video
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .paligemma import PaliGemmaAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from .sites import Site, parse_site

# config.model_type -> adapter class; the one place a family is chosen
ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
    "idefics3": Idefics3Adapter,
    "smolvlm": SmolVLMAdapter,
    "paligemma": PaliGemmaAdapter,
    "llama": CausalLMAdapter,
    "mistral": CausalLMAdapter,
    "qwen2": CausalLMAdapter,
    "qwen3": CausalLMAdapter,
    "gemma": CausalLMAdapter,
    "gemma2": CausalLMAdapter,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _adapter_class(model_type: str) -> type[ModelAdapter]:
    if model_type not in ADAPTERS:
        raise MmsaeError(f"model family {model_type!r} is not supported; supported model_type values: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


def _load_processor(cls: type[ModelAdapter], model_id_or_path: str, trust_remote_code: bool):
    try:
        return AutoProcessor.from_pretrained(model_id_or_path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError):
        # a video processor that needs torchvision (or was not saved); images and text work without it
        if cls.processor_class is None:
            raise
    try:
        return processor_without_video(cls.processor_class).from_pretrained(model_id_or_path, trust_remote_code=trust_remote_code)
    except ImportError as err:
        raise MmsaeError(f"the processor of {model_id_or_path} needs a missing package: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _local_model_type(model_id_or_path: str) -> str | None:
    config_file = Path(model_id_or_path) / "config.json"
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_adapter(model_id_or_path: str, dtype: str | torch.dtype = "float32", device: str = "cpu", trust_remote_code: bool = False,
                 device_map: str | None = None) -> ModelAdapter:
    """Load a model and its processor by hub id or local path and wrap them in their family's adapter.

    The family comes from the config's ``model_type``. The model is put in eval mode with
    gradients off for its parameters; the tokenizer pads on the left. ``device_map`` (e.g.
    "auto") places a model too large for one GPU over the GPUs and CPU memory with accelerate,
    instead of on ``device``.
    """
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise MmsaeError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    model_id_or_path = str(model_id_or_path)
    try:
        config = AutoConfig.from_pretrained(model_id_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        model_type = _local_model_type(model_id_or_path)
        if model_type is not None:  # a model type transformers does not know either
            _adapter_class(model_type)
        raise MmsaeError(f"cannot read a model config from {model_id_or_path!r}: {_first_line(err)}") from err
    cls = _adapter_class(config.model_type)
    try:
        model = cls.model_class.from_pretrained(model_id_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                device_map=device_map)
        if cls.has_vision:
            processor = _load_processor(cls, model_id_or_path, trust_remote_code)
        else:
            processor = AutoTokenizer.from_pretrained(model_id_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MmsaeError(f"cannot load the {config.model_type} model or its processor from {model_id_or_path!r}: {_first_line(err)}") from err
    if device_map is None:  # (a dispatched model is already where accelerate put it)
        model.to(device)
    model.eval().requires_grad_(False)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return cls(model, processor, model_id_or_path)


__all__ = ["ADAPTERS", "ModelAdapter", "ModelInputs", "Site", "SiteRows", "Tile", "TokenLayout", "image_heatmap", "load_adapter", "parse_site"]
