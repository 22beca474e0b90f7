"""Index throughput (images/s) against the bare forward pass with the SAE, in one run.

Builds a small LLaVA from a config (CLIP vision tower, Llama text model, random weights; by
default 224 px images in 16 px patches = 196 image tokens, text d=384, 6 layers) and a random TopK
SAE, renders shapes-world images, and measures, interleaved ``--repeats`` times (best of each):

  bare    mmsae.index.encode_batch on pre-rendered images: input building, the forward pass to the
          layer (early exit) and the SAE's sparse encode; nothing kept
  render  drawing the shapes-world images (the data source's own cost)
  index   build_index end to end minus model loading (its manifest's run_seconds): data, forward +
          SAE, the top-N / reservoir merges, patch maps, stats, top tokens, image copies and the
          final folder

    python bench/bench_index.py
    python bench/bench_index.py --images 256 --latents 16384 --model /path/to/llava --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_llava(out: Path, image_size: int, patch: int, d: int, layers: int) -> str:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tiny_models import chat_template, clip_vision_config, llama_text_config, make_tokenizer

    tokenizer = make_tokenizer(["<image>"], {"image_token": "<image>"})
    vision = clip_vision_config(image_size, patch)
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads = 384, 1536, 6, 6
    text = llama_text_config(len(tokenizer), hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                             num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template("<image>\n"))
    processor.save_pretrained(out)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an existing LLaVA-family model (default: build a small random one)")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latents", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the results here (bench/gpu_scale.py reads them)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from mmsae.data.sources import open_source
    from mmsae.index import IndexConfig, build_index, encode_batch
    from mmsae.models import load_adapter
    from mmsae.models.sites import Site
    from mmsae.sae import SaeConfig, SparseAutoencoder

    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        model = args.model or build_llava(tmp / "llava", args.image_size, args.patch, args.d, args.layers)
        adapter = load_adapter(model, device=args.device)
        torch.manual_seed(0)
        sae = SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=args.latents, k=args.k, model=model,
                                          layer=args.layer)).to(args.device)
        sae.save(tmp / "sae")
        data = f"shapes:{args.images}:0"
        t0 = time.perf_counter()
        samples = list(open_source(data).samples())
        render_s = time.perf_counter() - t0
        n_tokens = adapter.build_inputs([samples[0].image], [samples[0].text]).layouts[0].num_image_tokens

        def bare() -> float:
            t = time.perf_counter()
            for i in range(0, len(samples), args.batch_size):
                chunk = samples[i:i + args.batch_size]
                encode_batch(adapter, [sae], [Site.lm(args.layer)], [s.image for s in chunk], [s.text for s in chunk])
            return time.perf_counter() - t

        def index(r: int) -> float:
            out = tmp / f"index-{r}"
            seconds = build_index(IndexConfig(sae=str(tmp / "sae"), data=data, out=str(out), batch_size=args.batch_size,
                                              device=args.device, checkpoint_every=10**9)).cfg["run_seconds"]
            shutil.rmtree(out, ignore_errors=True)
            return seconds

        bare_s, index_s = [], []
        for r in range(args.repeats):
            bare_s.append(bare())
            index_s.append(index(r))
        b, x = min(bare_s), min(index_s)
        n = len(samples)
        print(f"model {Path(model).name}: {n_tokens} image tokens/image, d={adapter.hidden_size}, layer {args.layer}; "
              f"SAE {args.latents} latents, k={args.k}; {n} images, batch {args.batch_size}, {args.device}, "
              f"{torch.get_num_threads()} threads")
        print(f"  bare forward + SAE : {n / b:8.2f} images/s")
        print(f"  shapes rendering   : {n / render_s:8.2f} images/s")
        print(f"  build_index        : {n / x:8.2f} images/s   ({x / b:.2f}x the bare time; "
              f"{(x - b - render_s) / x * 100:.0f}% of it bookkeeping beyond forward and rendering)")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "args": vars(args), "images": n, "image_tokens_per_image": n_tokens, "bare_seconds": bare_s,
                "index_seconds": index_s, "render_seconds": render_s, "bare_images_per_s": n / b,
                "render_images_per_s": n / render_s, "index_images_per_s": n / x, "index_vs_bare": x / b}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
