"""The paper's run at its real model sizes: harvest -> train -> index -> steer -> attribute, timed.

    python bench/scale_rehearsal.py --out results/          # on a GPU: full-size models, sized for ~8 min on an H100
    python bench/scale_rehearsal.py --tiny --out /tmp/r     # the same code path on the CPU, tiny configs

Builds random-weight models from the published configurations (written out below; nothing is
downloaded): LLaVA-NeXT-8B (llava-hf/llama3-llava-next-8b-hf: Llama-3-8B + CLIP ViT-L/14-336,
AnyRes) and Qwen2-VL-7B. A model is built directly on the device in its dtype (random init),
saved with ``save_pretrained`` (safetensors) to a local folder, and every stage loads it from
there through ``mmsae.models.load_adapter``, the same path as a hub id: ``load_adapter`` takes a
hub id or a folder, never a model object, so there is no in-memory path (the save and each load
are timed). The first family runs the whole pipeline through the public stage functions; the
others run harvest only (their token geometry and forward cost at full size).

Per stage it records wall seconds, the seconds spent loading the model and SAE, the stage's
work seconds (harvest: its own loop timer; train and index: their ``run_seconds``; steer and attribute: wall minus loading), tokens/s and images/s over the work
seconds, peak GPU memory (``torch.cuda.max_memory_allocated``, reset per stage) and peak host
RSS (VmHWM, reset per stage). From the measured rates it projects the paper's full run
(LLaVA-NeXT-Data, about 780k samples) on one GPU and on 8 GPUs under torchrun, stating its
assumptions in the JSON. Everything goes to ``OUT/scale_rehearsal.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the byte-level tokenizer and chat template of the tiny test models

from tiny_models import QWEN_SPECIALS, chat_template, make_tokenizer  # noqa: E402

PAPER_SAMPLES = 780_000  # LLaVA-NeXT-Data, about 779k samples
PROJECTED_GPUS = 8
STAGES = ("harvest", "train", "index", "steer", "attribute")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# --- the published configurations (and tiny ones of the same shape) ---------------------------------

# llava-hf/llama3-llava-next-8b-hf: Llama-3-8B text model, CLIP ViT-L/14-336 vision tower
LLAVA_NEXT_8B = {
    "text": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=336,
                   patch_size=14, projection_dim=768),
    "pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "layer": 24, "sae": dict(num_latents=131072, k=256),
}
# Qwen/Qwen2-VL-7B-Instruct
QWEN2_VL_7B = {
    "text": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                 vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 mrope_section=[16, 24, 24]),
    "vision": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, hidden_size=3584),
    "pixels": dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384),
    "layer": 21, "sae": dict(num_latents=114688, k=256),  # 3/4 of the depth, as the paper's 24 of 32
}
# the same families, a few hundred thousand parameters (vocab_size None: the tokenizer's size), with the
# published image geometry: the same tokens per image as at full size
TINY = {
    "llava_next": {
        "text": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                     vocab_size=None, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0),
        "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=336,
                       patch_size=14, projection_dim=32),
        "pinpoints": LLAVA_NEXT_8B["pinpoints"],
        "layer": 3, "sae": dict(num_latents=2048, k=8),
    },
    "qwen2_vl": {
        "text": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                     vocab_size=None, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[4, 2, 2]),
        "vision": dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, hidden_size=64),
        "pixels": QWEN2_VL_7B["pixels"],
        "layer": 3, "sae": dict(num_latents=2048, k=8),
    },
}
FULL = {"llava_next": LLAVA_NEXT_8B, "qwen2_vl": QWEN2_VL_7B}


def _llama_config(spec: dict, vocab: int):
    from transformers import LlamaConfig

    t = dict(spec)
    theta = t.pop("rope_theta")
    t["vocab_size"] = t["vocab_size"] or vocab
    return LlamaConfig(**t, rope_parameters={"rope_type": "default", "rope_theta": theta}, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False)


def build_llava_next(spec: dict, out: Path, device: str, dtype: torch.dtype) -> dict:
    """LLaVA-NeXT from ``spec`` with random weights, built on ``device``, saved to ``out``; returns counts and seconds."""
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor)

    tokenizer = make_tokenizer(["<image>"], {"image_token": "<image>"})
    vision = spec["vision"]
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=_llama_config(spec["text"], len(tokenizer)),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=spec["pinpoints"],
                             vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    side = vision["image_size"]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                                   image_grid_pinpoints=spec["pinpoints"], image_mean=CLIP_MEAN, image_std=CLIP_STD),
        tokenizer=tokenizer, patch_size=vision["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template("<image>\n"))
    return _instantiate_and_save(LlavaNextForConditionalGeneration, config, processor, out, device, dtype)


def build_qwen2_vl(spec: dict, out: Path, device: str, dtype: torch.dtype) -> dict:
    """Qwen2-VL from ``spec`` with random weights, built on ``device``, saved to ``out``; returns counts and seconds."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from mmsae.models.common import processor_without_video

    tokenizer = make_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    text = dict(spec["text"])
    theta, section = text.pop("rope_theta"), text.pop("mrope_section")
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(spec["vision"]),
        text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    v = spec["vision"]
    image_processor = Qwen2VLImageProcessorPil(patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                               temporal_patch_size=v["temporal_patch_size"], image_mean=CLIP_MEAN,
                                               image_std=CLIP_STD, **spec["pixels"])
    processor = processor_without_video(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                           chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return _instantiate_and_save(Qwen2VLForConditionalGeneration, config, processor, out, device, dtype)


BUILDERS: dict[str, Callable[[dict, Path, str, torch.dtype], dict]] = {"llava_next": build_llava_next, "qwen2_vl": build_qwen2_vl}


def _instantiate_and_save(model_class, config, processor, out: Path, device: str, dtype: torch.dtype) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # parameters are created (and randomly initialised) on the device
        model = model_class._from_config(config, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    _sync()
    built = time.perf_counter()
    model.save_pretrained(out)  # safetensors shards
    processor.save_pretrained(out)
    del model
    return {"parameters": n_params, "build_seconds": built - start, "save_seconds": time.perf_counter() - built}


# --- measuring one stage -----------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_rss_peak() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the whole process's peak


@contextmanager
def _calls_timed(module: Any, name: str, spans: list[tuple[float, float]]) -> Iterator[None]:
    """Record (start, end) of every call of ``module.name`` while inside; observing only.

    The stages import ``load_adapter`` / ``load_sae`` at call time, so the
    wrapper sees their calls; where a name has moved the spans stay empty (and the stage's wall
    time is used instead)."""
    real = getattr(module, name, None)
    if real is None:
        yield
        return

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            _sync()
            spans.append((start, time.perf_counter()))

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, real)


class StageMeter:
    """Wall seconds, loading seconds, peak GPU memory and peak host RSS of one stage."""

    def __init__(self):
        self.loads: list[tuple[float, float]] = []
        self.result: dict = {}
        self.start = time.perf_counter()

    @contextmanager
    def measure(self) -> Iterator[StageMeter]:
        import mmsae.models
        import mmsae.sae

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        exact_rss = _reset_rss_peak()
        # what earlier stages still hold (a model kept alive by a cache would show here)
        self.result["gpu_gb_at_start"] = round(torch.cuda.memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
        self.start = time.perf_counter()
        with _calls_timed(mmsae.models, "load_adapter", self.loads), _calls_timed(mmsae.sae, "load_sae", self.loads):
            yield self
        _sync()
        self.result.update(
            seconds=round(time.perf_counter() - self.start, 3),
            load_seconds=round(sum(b - a for a, b in self.loads), 3), loads=len(self.loads),
            peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
            peak_rss_gb=round(_peak_rss_gb(), 3), peak_rss_is_stage=exact_rss)

    def work_so_far(self) -> float:
        """Seconds since the stage began, less the loading."""
        return time.perf_counter() - self.start - sum(b - a for a, b in self.loads)


def rates(row: dict, work_seconds: float, tokens: float, images: float) -> dict:
    """Fill a stage row with its work seconds and throughputs."""
    row.update(work_seconds=round(work_seconds, 3), tokens=int(tokens), images=int(images),
               tokens_per_s=tokens / work_seconds if work_seconds > 0 else None,
               images_per_s=images / work_seconds if work_seconds > 0 else None)
    return row


# --- the rehearsal -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What one rehearsal runs (sizes chosen to fit the time budget)."""

    tiny: bool
    device: str
    dtype: str
    families: list[str]
    images: int  # harvested and indexed
    batch_size: int  # samples per forward pass (harvest, index)
    train_tokens: int
    train_batch: int
    steer_prompts: int
    new_tokens: int
    check: int  # attribute: features checked by ablation
    budget_s: float | None

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        tiny = args.tiny
        device = args.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda")
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        defaults = dict(images=8, batch_size=4, train_tokens=40 * 256, train_batch=256, steer_prompts=2, new_tokens=4, check=2) if tiny \
            else dict(images=256, batch_size=16, train_tokens=2**20, train_batch=4096, steer_prompts=4, new_tokens=16, check=4)
        for key in defaults:
            if getattr(args, key, None) is not None:
                defaults[key] = getattr(args, key)
        return cls(tiny=tiny, device=device, dtype=dtype, families=args.families.split(","), budget_s=args.budget_s, **defaults)


def run_family(family: str, spec: dict, plan: Plan, work: Path, pipeline: bool, time_left: Callable[[], float | None]) -> dict:
    """Build, save and run one family through the stages; every stage's figures, or its error."""
    from mmsae.activations import HarvestConfig, harvest
    from mmsae.attribute import AttributeConfig, attribute
    from mmsae.data.sources import open_source
    from mmsae.index import IndexConfig, build_index
    from mmsae.train import TrainConfig, train
    from mmsae.steer import SteerConfig, steer

    torch_dtype = getattr(torch, plan.dtype)
    model_dir, data = work / f"{family}-model", f"shapes:{plan.images}:0"
    report: dict = {"config": {k: v for k, v in spec.items() if k != "sae"}, "layer": spec["layer"], "sae": spec["sae"],
                    "stages": {}}
    stages = report["stages"]
    names = ("build",) + (STAGES if pipeline else ("harvest",))
    context: dict = {}

    def do_build(row: dict) -> None:
        built = BUILDERS[family](spec, model_dir, plan.device, torch_dtype)
        report["parameters"] = built.pop("parameters")
        size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
        row.update({k: round(v, 3) for k, v in built.items()}, folder_gb=round(size / 2**30, 3),
                   save_gb_per_s=round(size / 2**30 / max(built["save_seconds"], 1e-9), 3))

    def do_harvest(row: dict, meter: StageMeter) -> None:
        # the store dtype is the harvest's "auto": bfloat16 when the model runs on a GPU, else float32
        store = harvest(HarvestConfig(model=str(model_dir), layer=spec["layer"], data=data, out=str(work / f"{family}-store"),
                                      model_dtype=plan.dtype, batch_size=plan.batch_size, device=plan.device))
        manifest = store.manifest
        loop = sum(manifest.get("ranks", {}).get("0", {}).get("seconds", {}).values())  # its own timer: load excluded
        work_s = loop or meter.work_so_far()
        n_samples = manifest["stats"]["n_samples"]
        rates(row, work_s, store.n_tokens, n_samples)
        context.update(store=store, per_sample=store.n_tokens / n_samples)
        row.update(n_image_tokens=manifest["stats"]["n_image_tokens"], tokens_per_sample=store.n_tokens / n_samples,
                   bytes_per_token=store.d * store.dtype.itemsize,
                   store_gb=round(store.n_tokens * store.d * store.dtype.itemsize / 2**30, 3),
                   store_dtype=str(store.dtype).replace("torch.", ""), d=store.d)

    def do_train(row: dict, meter: StageMeter) -> None:
        out = work / f"{family}-sae"
        steps = max(1, plan.train_tokens // plan.train_batch)
        train(TrainConfig(out=str(out), activations=str(context["store"].path), num_latents=spec["sae"]["num_latents"],
                          k=spec["sae"]["k"], batch_size=plan.train_batch, steps=steps, device=plan.device,
                          autocast=plan.device.startswith("cuda"), checkpoint_every=10**9, keep_checkpoints=1,
                          progress=False))
        tokens = steps * plan.train_batch
        ckpt = out / "checkpoints"
        row.update(steps=steps, batch=plan.train_batch, autocast_bf16=plan.device.startswith("cuda"),
                   sae_gb=round((out / "sae.safetensors").stat().st_size / 2**30, 3),
                   final_checkpoint_gb=round(sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**30, 3))
        shutil.rmtree(ckpt, ignore_errors=True)  # the rehearsal never resumes: free the disk
        rates(row, json.loads((out / "train_state.json").read_text())["run_seconds"], tokens, tokens / context["per_sample"])  # images: samples' worth of tokens
        row["fvu_last"] = _last_log(out).get("fvu")
        context["sae"] = out

    def do_index(row: dict, meter: StageMeter) -> None:
        index = build_index(IndexConfig(sae=str(context["sae"]), data=data, out=str(work / f"{family}-index"), top_n=5, random_n=5,
                                        batch_size=plan.batch_size, device=plan.device, dtype=plan.dtype, checkpoint_every=10**9))
        n = index.cfg["n_images"]
        rates(row, index.cfg.get("run_seconds") or meter.work_so_far(), n * context["per_sample"], n)  # tokens: as harvested
        row["features_with_examples"] = len(index.features())
        context["index"] = index

    def image_file() -> str:
        path = work / "image.png"
        if not path.exists():
            next(iter(open_source(data).samples())).image.save(path)
        return str(path)

    def do_steer(row: dict, meter: StageMeter) -> None:
        index = context["index"]
        feature = index.features()[0]  # any feature with examples: the stage's cost does not depend on which
        prompts = [f"Question {i}: what is in the image?" for i in range(plan.steer_prompts)]
        rows = steer(SteerConfig(model=str(model_dir), sae=str(context["sae"]), feature=[feature], prompt=prompts, value=[4.0],
                                 image=[image_file()], index=str(index.path), out=str(work / f"{family}-steer"),
                                 max_new_tokens=plan.new_tokens, batch_size=plan.steer_prompts, device=plan.device, dtype=plan.dtype))
        # a clean and a steered generation per prompt; random weights rarely stop before max_new_tokens
        generations = 2 * len(rows)
        rates(row, meter.work_so_far(), generations * plan.new_tokens, generations)
        row.update(feature=feature, generated_tokens_at_most=generations * plan.new_tokens)

    def do_attribute(row: dict, meter: StageMeter) -> None:
        result = attribute(AttributeConfig(model=str(model_dir), sae=str(context["sae"]), prompt="What shape is in the image?",
                                           answer="a red circle", image=image_file(), out=str(work / f"{family}-attribute"),
                                           top=10, check=plan.check, device=plan.device, dtype=plan.dtype))
        seq = len(result["image_patches"]) + len(result["text_tokens"])
        rates(row, meter.work_so_far(), seq, 1)
        row.update(sequence_tokens=seq, features_checked=result["ablation_check"]["n"])

    steps = {"harvest": do_harvest, "train": do_train, "index": do_index, "steer": do_steer, "attribute": do_attribute}
    for name in names:
        left = time_left()
        if left is not None and left <= 0:
            stages[name] = {"skipped": "time budget spent"}
            continue
        if name != "build" and "failed" in report:
            stages[name] = {"skipped": f"needs an earlier stage ({report['failed']})"}
            continue
        row: dict = {}
        meter = StageMeter()
        try:
            with meter.measure():
                do_build(row) if name == "build" else steps[name](row, meter)
        except Exception as e:  # noqa: BLE001 - one stage's failure is reported, the rest are skipped
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            report.setdefault("failed", name)
        stages[name] = {**meter.result, **row}
        print(f"[{family}] {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in stages[name].items()), flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)  # 16 GB at full size: the next family needs the disk
    return report


def _last_log(sae_dir: Path) -> dict:
    log = sae_dir / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1]) if lines else {}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def project(stages: dict, samples: int = PAPER_SAMPLES, gpus: int = PROJECTED_GPUS) -> dict:
    """The paper's full run from the measured rates: harvest and index every sample, train one pass."""
    harvest, train, index = stages["harvest"], stages["train"], stages["index"]
    per_sample = harvest["tokens_per_sample"]
    tokens = samples * per_sample
    seconds = {"harvest": samples / harvest["images_per_s"], "train": tokens / train["tokens_per_s"],
               "index": samples / index["images_per_s"]}
    one = sum(seconds.values())
    return {
        "samples": samples, "tokens_per_sample": per_sample, "tokens": tokens,
        "store_tb": tokens * harvest["bytes_per_token"] / 2**40,
        "seconds_one_gpu": seconds, "one_gpu_s": one, "one_gpu_h": one / 3600,
        "gpus": gpus, "multi_gpu_s": one / gpus, "multi_gpu_h": one / gpus / 3600,
        "assumptions": [
            f"{samples} samples (LLaVA-NeXT-Data) with {per_sample:.0f} tokens each, the mean of the rehearsal's store "
            "(shapes-world 224 px images, one short prompt, byte-level tokenizer); real samples have larger images "
            "(more AnyRes crops) and multi-turn text, so scale by their measured tokens per sample",
            "one GPU: harvest and index every sample at the measured images/s, train one pass over every token at the "
            "measured tokens/s; model loading, steering and attribution (per-query costs) are not counted",
            f"{gpus} GPUs under torchrun: linear scaling (each rank takes 1/{gpus} of the samples; training's all-reduce "
            "of the dense SAE gradients, 2 x latents x d float32 per step, is not counted)",
        ],
    }


def run(plan: Plan, out: Path, work_root: str | None = None, sae: dict | None = None) -> dict:
    """Run the rehearsal and write ``out/scale_rehearsal.json``; returns what it wrote.

    ``sae`` overrides the families' SAE sizes (``num_latents``, ``k``)."""
    import transformers

    from mmsae.io import check_own_file, ensure_dir, write_json

    out = ensure_dir(out)
    target = check_own_file(out / "scale_rehearsal.json", ("mode", "families", "projection"))
    started = time.perf_counter()

    def time_left() -> float | None:
        return None if plan.budget_s is None else plan.budget_s - (time.perf_counter() - started)

    result: dict = {"mode": "tiny" if plan.tiny else "full", "plan": dataclasses.asdict(plan), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "device_name": torch.cuda.get_device_name() if plan.device.startswith("cuda") else "cpu",
                    "tf32": plan.device.startswith("cuda"), "families": {}, "projection": None}
    threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = plan.device.startswith("cuda")  # the SAE's float32 parts, as one would run them
    if plan.tiny:
        torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than the work
    work = Path(tempfile.mkdtemp(prefix="mmsae-scale-", dir=work_root))
    try:
        for i, family in enumerate(plan.families):
            spec = (TINY if plan.tiny else FULL)[family]
            spec = {**spec, "sae": {**spec["sae"], **(sae or {})}}
            result["families"][family] = run_family(family, spec, plan, work, pipeline=i == 0, time_left=time_left)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    first = result["families"][plan.families[0]]["stages"]
    if all("images_per_s" in first.get(s, {}) for s in ("harvest", "train", "index")):
        result["projection"] = project(first)
    result["wall_s"] = round(time.perf_counter() - started, 3)
    write_json(target, result)
    _print_summary(result)
    return result


def _print_summary(result: dict) -> None:
    print(f"\nscale rehearsal ({result['mode']}, {result['device_name']}), {result['wall_s']:.1f} s in all")
    print(f"{'family':12s}{'stage':11s}{'work s':>9s}{'load s':>8s}{'tokens/s':>12s}{'images/s':>10s}{'GPU GB':>8s}{'RSS GB':>8s}")
    for family, rep in result["families"].items():
        for name, row in rep["stages"].items():
            if "error" in row or "skipped" in row:
                print(f"{family:12s}{name:11s}  {row.get('error') or row.get('skipped')}")
                continue
            tps, ips = row.get("tokens_per_s"), row.get("images_per_s")
            print(f"{family:12s}{name:11s}{row.get('work_seconds', row['seconds']):9.2f}{row['load_seconds']:8.2f}"
                  f"{tps or 0:12.0f}{ips or 0:10.2f}{row['peak_gpu_gb'] or 0:8.2f}{row['peak_rss_gb']:8.2f}")
    p = result["projection"]
    if p:
        print(f"projected paper run: {p['samples']} samples x {p['tokens_per_sample']:.0f} tokens: "
              f"{p['one_gpu_h']:.1f} h on one GPU, {p['multi_gpu_h']:.1f} h on {p['gpus']} (linear); store {p['store_tb']:.1f} TB")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for scale_rehearsal.json")
    p.add_argument("--tiny", action="store_true", help="tiny configurations of the same families, on the CPU")
    p.add_argument("--families", default="llava_next,qwen2_vl", help="the first runs every stage, the rest harvest only")
    p.add_argument("--device", help="default: cuda when there is one (cpu with --tiny)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: bfloat16 on a GPU)")
    p.add_argument("--work", help="folder for the models and stage outputs (deleted at the end; default: the system temp)")
    p.add_argument("--images", type=int, help="shapes-world images harvested and indexed")
    p.add_argument("--batch-size", type=int, help="samples per forward pass")
    p.add_argument("--train-tokens", type=int, help="tokens the SAE trains on")
    p.add_argument("--train-batch", type=int, help="tokens per SAE step")
    p.add_argument("--steer-prompts", type=int)
    p.add_argument("--new-tokens", type=int, help="tokens generated per steering prompt")
    p.add_argument("--check", type=int, help="attribution features checked by ablation")
    p.add_argument("--num-latents", type=int, help="SAE latents (default: the paper's 32x; with --tiny, 32x the tiny width)")
    p.add_argument("--k", type=int, help="SAE active latents per token (default: the paper's 256; with --tiny, 8)")
    p.add_argument("--budget-s", type=float, help="skip the stages that would start after this many seconds "
                   "(default: 420 at full size, so that the run ends within about 8 minutes; none with --tiny)")
    args = p.parse_args(argv)
    for family in args.families.split(","):
        if family not in FULL:
            p.error(f"--families: unknown family {family!r}; known: {', '.join(FULL)}")
    if args.budget_s is None and not args.tiny:
        args.budget_s = 420.0
    plan = Plan.make(args)
    return run(plan, Path(args.out), args.work, sae={k: v for k, v in (("num_latents", args.num_latents), ("k", args.k)) if v})


if __name__ == "__main__":
    main()
