"""Attribution of many features: one forward + one backward pass against ablating them one by one.

For one (image, question, answer), the ``--features`` features with the largest attribution are
scored three ways, timed in the same run:

  one-pass   mmsae.attribute.attribute_answer: activation x gradient for every feature at every
             position from a single forward and backward pass (the estimate)
  one-by-one one forward per feature with that feature zeroed at every position (the released
             code's way, minus its extra passes): the real effect of each ablation
  batched    the same ablations, ``--batch-size`` features per forward (mmsae's ablation check)

It prints the times side by side, the speed-up, and how well the one-pass estimates agree with
the real effects (Pearson / Spearman over the features, sign agreement). ``--sample N`` ablates
N features spread evenly over the ranking and extrapolates both ablation columns (marked as such;
``--sample 0`` ablates all of them).

Uses the demo model if given (``--model RUN_MODEL --sae RUN/sae``); else builds a LLaVA with a
realistic-ish language model (SmolLM2-135M's width 576, 9 layers, 224 px images in 14 px
patches = 256 image tokens; random weights) and a random TopK SAE (8x, k=32).

    python bench/bench_attribute.py
    python bench/bench_attribute.py --model ~/.cache/mmsae/demo-model --sae runs/demo/sae --sample 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_llava(out: Path, d: int = 576, layers: int = 9, image_size: int = 224, patch: int = 14) -> str:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tiny_models import chat_template, clip_vision_config, llama_text_config, make_tokenizer

    tokenizer = make_tokenizer(["<image>"], {"image_token": "<image>"})
    vision = clip_vision_config(image_size, patch)
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads = 384, 1536, 4, 6
    text = llama_text_config(len(tokenizer), hidden_size=d, intermediate_size=1536, num_hidden_layers=layers,
                             num_attention_heads=9, num_key_value_heads=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template("<image>\n")).save_pretrained(out)
    return str(out)


def random_sae(adapter, layer: int, expansion: int, k: int, inputs):
    """A random TopK SAE centred on this input's activations (as training would centre it), so that
    different positions pick different latents; decoder rows at the residual stream's scale."""
    from mmsae.hooks import run_until
    from mmsae.sae import SaeConfig, SparseAutoencoder

    torch.manual_seed(1)
    d = adapter.hidden_size
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=d * expansion, k=k, layer=layer, hook_point=adapter.hook_point(layer)))
    x = run_until(adapter, layer, inputs)[0].float()
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        sae.W_dec.mul_(float((x - x.mean(0)).norm(dim=-1).mean()) / k ** 0.5)
    return sae.to(adapter.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a LLaVA-family model folder (default: build one)")
    p.add_argument("--sae", help="an SAE folder for --model (default: a random TopK SAE)")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the SAE's site, or 4 for the built model)")
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--sample", type=int, default=40,
                   help="really ablate this many features, spread over the ranking, and extrapolate the times (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--answer", default="red")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from mmsae.attribute import ablation_effects, attribute_answer, build_objective, correlation
    from mmsae.data.shapes import ShapesWorld
    from mmsae.models import load_adapter
    from mmsae.sae import load_sae

    tmp = tempfile.TemporaryDirectory()
    model = args.model or build_llava(Path(tmp.name) / "llava")
    adapter = load_adapter(model, device=args.device)
    torch.set_grad_enabled(False)
    scene = ShapesWorld(0).scene(0)
    question = next(q for q, _ in scene.qa if q.startswith("What colour"))
    objective = build_objective(adapter, scene.image, question, args.answer)
    if args.sae:
        sae = load_sae(args.sae).to(adapter.device)
        if args.layer is not None and sae.cfg.site is None:  # an SAE that records no site
            sae.cfg.site = f"lm:{args.layer}"
        layer = sae.cfg.site or sae.cfg.hook_point or sae.cfg.layer
    else:
        layer = 4 if args.layer is None else args.layer
        sae = random_sae(adapter, layer, 8, 32, objective.inputs)
    n_tokens = objective.inputs.inputs["input_ids"].shape[1]
    print(f"model {model} ({'given' if args.model else 'built, random weights'}), layer {layer}, "
          f"SAE {sae.cfg.num_latents} latents k={sae.cfg.k}, sequence {n_tokens} tokens, device {args.device}")

    attribute_answer(adapter, sae, objective)  # warm-up
    start = time.perf_counter()
    att = attribute_answer(adapter, sae, objective)
    t_one_pass = time.perf_counter() - start
    totals = att.feature_totals()
    features = [int(f) for f in totals.abs().argsort(descending=True)[:args.features] if totals[f] != 0]
    print(f"{len(features)} features (those with the largest attribution among {int((totals != 0).sum())} active ones)")

    # real ablations for a sample spread evenly over the ranking; times extrapolated to all features
    step = max(1, len(features) // args.sample) if args.sample else 1
    sample = features[::step]
    scale = len(features) / len(sample)
    start = time.perf_counter()
    real_batched = ablation_effects(adapter, sae, objective, sample, batch_size=args.batch_size)
    t_batched = (time.perf_counter() - start) * scale
    start = time.perf_counter()
    real_single = ablation_effects(adapter, sae, objective, sample, batch_size=1)
    t_single = (time.perf_counter() - start) * scale

    estimates = np.array([-float(totals[f]) for f in sample])
    real = np.array(real_single)
    agree = float(np.abs(np.array(real_batched) - real).max())
    c = correlation(estimates, real)
    signs = float(np.mean(np.sign(estimates) == np.sign(real)))
    extrap = f" (extrapolated from {len(sample)})" if len(sample) < len(features) else ""
    print()
    print(f"attributing {len(features)} features:")
    print(f"{'method':<34}{'seconds':>10}{'vs one-pass':>14}")
    print(f"{'one-pass attribution (all feats)':<34}{t_one_pass:>10.2f}{1.0:>13.1f}x")
    print(f"{'batched ablation (' + str(args.batch_size) + '/forward)':<34}{t_batched:>10.2f}{t_batched / t_one_pass:>13.1f}x{extrap}")
    print(f"{'one-by-one ablation':<34}{t_single:>10.2f}{t_single / t_one_pass:>13.1f}x{extrap}")
    print(f"(one forward with one feature ablated: {t_single / len(features):.3f} s; "
          f"the one-pass attribution costs {t_one_pass / (t_single / len(features)):.1f} such forwards)")
    print()
    print(f"one-pass estimate vs real ablation effect over {c['n']} features spread over the ranking: "
          f"Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f}, same sign {signs:.0%}; "
          f"batched vs one-by-one ablation max difference {agree:.2e}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
