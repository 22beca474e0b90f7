"""Tiny models of every supported family, built offline from transformers configs.

``make_tiny_model(family, path)`` writes a randomly initialised model (a few hundred thousand
parameters at most) and its processor into ``path/family`` with ``save_pretrained`` and returns
that folder, which ``mmsae.models.load_adapter`` loads like a hub id. The tokenizer is a
byte-level BPE with no merges (every byte one token) plus the family's special tokens, so any
text round-trips; the image processor is the family's own class with small sizes.

Building is deterministic (fixed seed) and cached per folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mmsae.models.common import processor_without_video

HIDDEN = 32
TEXT_LAYERS = 3
BASE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]


def chat_template(image_text: str) -> str:
    """A minimal chat template; ``image_text`` is what an image entry of a message becomes."""
    return (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image_text + "{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def make_tokenizer(extra_specials: list[str], extra_special_tokens: dict[str, str] | None = None, **kwargs):
    """A byte-level tokenizer: ids 0.. are the special tokens, then the 256 byte symbols."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = BASE_SPECIALS + [t for t in extra_specials if t not in BASE_SPECIALS]
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for sym in byte_symbols:
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra_special_tokens or {},
        **kwargs,
    )


def llama_text_config(vocab_size: int, **kwargs):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    base.update(kwargs)
    return LlamaConfig(**base)


def clip_vision_config(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=HIDDEN,
    )


def _build_llama(out: Path) -> None:
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer([])
    tokenizer.chat_template = chat_template("")
    model = LlamaForCausalLM(llama_text_config(len(tokenizer)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_llava(out: Path) -> None:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = make_tokenizer(["<image>"], {"image_token": "<image>"})
    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=clip_vision_config(image_size, patch),
        text_config=llama_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>\n"),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_llava_next(out: Path) -> None:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = make_tokenizer(["<image>"], {"image_token": "<image>"})
    crop, patch = 16, 4
    pinpoints = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]
    config = LlavaNextConfig(
        vision_config=clip_vision_config(crop, patch),
        text_config=llama_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>\n"),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _qwen_text_kwargs(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _qwen_image_processor(patch: int, merge: int):
    from transformers import Qwen2VLImageProcessorPil

    # between 2x2 and 12x12 merged tokens
    factor = patch * merge
    return Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2, min_pixels=(2 * factor) ** 2, max_pixels=(12 * factor) ** 2
    )


def _build_qwen2_vl(out: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tokenizer = make_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    patch, merge = 4, 2
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=4, mlp_ratio=2, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2),
        text_config=_qwen_text_kwargs(tokenizer),
        **_qwen_token_ids(tokenizer),
    )
    model = Qwen2VLForConditionalGeneration(config)
    processor = processor_without_video(Qwen2VLProcessor)(
        image_processor=_qwen_image_processor(patch, merge),
        tokenizer=tokenizer,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_qwen2_5_vl(out: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tokenizer = make_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    patch, merge = 4, 2
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=HIDDEN,
            out_hidden_size=HIDDEN,
            intermediate_size=64,
            num_heads=4,
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=2,
            window_size=2 * patch * merge,
            fullatt_block_indexes=[1],
        ),
        text_config=_qwen_text_kwargs(tokenizer),
        **_qwen_token_ids(tokenizer),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = processor_without_video(Qwen2_5_VLProcessor)(
        image_processor=_qwen_image_processor(patch, merge),
        tokenizer=tokenizer,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_idefics3(out: Path, smolvlm: bool = False) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMProcessor,
    )

    tags = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
    tokenizer = make_tokenizer(tags, {"image_token": "<image>"})
    frame, patch, scale = 32, 4, 2
    config_class, model_class = (SmolVLMConfig, SmolVLMForConditionalGeneration) if smolvlm else (Idefics3Config, Idefics3ForConditionalGeneration)
    config = config_class(
        vision_config=dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=frame, patch_size=patch),
        text_config=llama_text_config(len(tokenizer)).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    model = model_class(config)
    image_processor_class = SmolVLMImageProcessorPil if smolvlm else Idefics3ImageProcessorPil
    image_processor = image_processor_class(size={"longest_edge": 2 * frame}, max_image_size={"longest_edge": frame})
    processor_class = processor_without_video(SmolVLMProcessor) if smolvlm else Idefics3Processor
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(frame // patch // scale) ** 2,
        chat_template=chat_template("<image>"),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_smolvlm(out: Path) -> None:
    _build_idefics3(out, smolvlm=True)


def _build_llava_onevision(out: Path) -> None:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, SiglipVisionConfig

    tokenizer = make_tokenizer(["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"})
    crop, patch = 16, 4
    pinpoints = [[h * crop, w * crop] for h in (1, 2, 3) for w in (1, 2, 3)]
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=crop, patch_size=patch)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=llama_text_config(len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_4",  # large grids get shrunk, small ones keep their crops
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints)
    processor = processor_without_video(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(crop // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_4",
        chat_template=chat_template("<image>\n"),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_paligemma(out: Path) -> None:
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil, SiglipVisionConfig

    tokenizer = make_tokenizer(["<image>"], {"image_token": "<image>"})
    image_size, patch = 32, 8
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch) ** 2
    # the processor adds PaliGemma's <locNNNN>/<segNNN> tokens to the tokenizer: build it first
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=patch, projection_dim=HIDDEN)
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    model = PaliGemmaForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)


BUILDERS = {
    "llama": _build_llama,
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
    "paligemma": _build_paligemma,
}
FAMILIES = tuple(BUILDERS)


def missing_requirement(family: str) -> str | None:
    """Why the tiny ``family`` model cannot be built here (an optional package), or None."""
    if family == "smolvlm" and importlib.util.find_spec("num2words") is None:
        return "SmolVLM's processor needs the num2words package (pip install num2words)"
    return None


def family_params(families=FAMILIES) -> list:
    """pytest parameters for ``families``, skipped with the reason when a package is missing."""
    import pytest

    return [pytest.param(f, marks=pytest.mark.skipif(missing_requirement(f) is not None, reason=str(missing_requirement(f)))) for f in families]


@functools.lru_cache(maxsize=None)
def _make(family: str, path: str) -> str:
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; known: {', '.join(BUILDERS)}")
    out = Path(path) / family
    if (out / "config.json").exists():
        return str(out)
    # build next to the target and rename: concurrent test processes never see half a model
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=path))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BUILDERS[family](tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def make_tiny_model(family: str, path: str | os.PathLike) -> str:
    """Build (once per folder) a tiny ``family`` model with its processor under ``path/family``."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return _make(family, str(Path(path).resolve()))


def default_cache_dir() -> Path:
    """A per-user folder keyed by this file's source and the transformers version.

    Set MMSAE_TINY_MODELS to choose another folder.
    """
    import transformers

    if os.environ.get("MMSAE_TINY_MODELS"):
        return Path(os.environ["MMSAE_TINY_MODELS"])
    from mmsae.models import common

    sources = Path(__file__).read_text() + Path(common.__file__).read_text() + transformers.__version__
    key = hashlib.sha256(sources.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mmsae-tiny-models-{os.getuid()}-{key}"


def tiny_model(family: str) -> str:
    """The folder of the tiny ``family`` model in the shared cache (built on first use)."""
    return make_tiny_model(family, default_cache_dir())


@functools.lru_cache(maxsize=None)
def tiny_adapter(family: str):
    """The tiny ``family`` model loaded through ``load_adapter`` (one instance per process)."""
    from mmsae.models import load_adapter

    return load_adapter(tiny_model(family))


def run_in_one_and_two_processes(script: Path, tmp_path: Path) -> None:
    """Run ``script OUT`` as one process (OUT = tmp_path/one) and under torchrun with two
    (tmp_path/two), one thread each; fail with the script's stderr if either run fails."""
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])):
        done = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path / name)], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
