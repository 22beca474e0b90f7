"""Harvest throughput against the bare forward pass of the same model and batches.

Builds a small Llama from a config (default d=2048, 2 layers, which runs in about a minute on
2 CPU cores; random weights, word-level tokenizer), writes a JSONL of texts, and measures in one
run, interleaved ``--repeats`` times (the best of each is reported, which is the least disturbed
by other load on the machine):

  full      model(**inputs) on pre-built batches: every layer, the final norm and the LM head
  early     hooks.run_until(adapter, layer, inputs) on the same batches: stops after ``layer``
  harvest   activations.harvest(...) over the same texts and batch size, end to end with the model
            already loaded (the same one): data reading, input building, early-exit forward,
            gathering the kept tokens, the copy to the host in the store dtype, and the shards
            written by the writer thread (waited for: the call returns once they are on disk)
  two sites the same harvest at lm:LAYER-1 and lm:LAYER in one pass (two stores; target: at most
            10% more than harvesting lm:LAYER alone)

and prints tokens/s and the ratios: harvest throughput as a fraction of the early-exit
forward's (the cost of hooks + store; target: harvest takes at most 10% longer at d >= 2048),
early vs full (target: in proportion to the layers skipped), harvest vs full.

    python bench/bench_harvest.py                       # d=2048, 2 layers, layer 1, CPU
    python bench/bench_harvest.py --layers 8 --layer 6 --samples 256 --tokens 160 --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

WORDS = "the red circle sits above a small blue square while green triangles drift across grey".split()


def make_tokenizer():
    """A word-level tokenizer over WORDS (one token per word), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = "<s>{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def build_model(out: Path, d: int, layers: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d, intermediate_size=int(d * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64),
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def texts(n: int, words: int) -> list[str]:
    # lengths vary a little, as real prompts do, so batches carry some padding
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words - i % 7)) for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--layer", type=int, default=1, help="harvested layer (0-based)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--tokens", type=int, default=48, help="tokens per text (a few fewer for some)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--store-dtype", default="auto", help="store dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here (bench/gpu_scale.py reads them)")
    args = p.parse_args()

    from mmsae.activations import ActivationStore, HarvestConfig, harvest
    from mmsae.hooks import run_until
    from mmsae.models import load_adapter

    work = Path(tempfile.mkdtemp(prefix="bench-harvest-"))
    try:
        model_path = build_model(work / "model", args.d, args.layers)
        data = texts(args.samples, args.tokens)
        (work / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in data))
        adapter = load_adapter(model_path, device=args.device)
        batches = [adapter.build_inputs(None, data[i:i + args.batch_size]) for i in range(0, len(data), args.batch_size)]
        n_tokens = sum(int(b.inputs["attention_mask"].sum()) for b in batches)

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def bare(early: bool) -> float:
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    if early:
                        run_until(adapter, args.layer, b)
                    else:
                        adapter.model(**b.inputs, use_cache=False)
            sync()
            return time.perf_counter() - t

        def harvest_once(i: int, sites: list[str] | None = None) -> tuple[dict, float, ActivationStore]:
            cfg = HarvestConfig(model=model_path, layer=None if sites else args.layer, site=sites, data=str(work / "data.jsonl"),
                                out=str(work / f"store{i}"), batch_size=args.batch_size, store_dtype=args.store_dtype,
                                device=args.device, shard_size=8192)
            with mock.patch("mmsae.models.load_adapter", lambda *a, **k: adapter):  # the model already loaded
                sync()
                t = time.perf_counter()
                store = harvest(cfg)
                wall = time.perf_counter() - t
            if isinstance(store, dict):  # several sites: the deeper one's store
                store = store[f"lm:{args.layer}"]
            parts = store.manifest["ranks"]["0"]["seconds"]
            shutil.rmtree(cfg.out)
            return parts, wall, store

        bare(True), bare(False)  # warm-up
        results: dict[str, list[float]] = {"full": [], "early": [], "harvest": [], "two_sites": []}
        parts_of_best: dict = {}
        for i in range(args.repeats):
            results["full"].append(bare(False))
            results["early"].append(bare(True))
            parts, wall, store = harvest_once(i)
            assert store.n_tokens == n_tokens, (store.n_tokens, n_tokens)
            if wall <= min(results["harvest"], default=wall):
                parts_of_best = parts
            results["harvest"].append(wall)
            if args.layer > 0:
                _, wall, store = harvest_once(i, [f"lm:{args.layer - 1}", f"lm:{args.layer}"])
                assert store.n_tokens == n_tokens
                results["two_sites"].append(wall)
        results = {k: v for k, v in results.items() if v}
        best = {k: min(v) for k, v in results.items()}

        print(f"model: Llama d={args.d}, {args.layers} layers, harvest layer {args.layer} "
              f"({args.layer + 1}/{args.layers} layers run); {args.samples} samples x ~{n_tokens // args.samples} tokens, "
              f"batch {args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}, "
              f"store {store.manifest['dtype']} (--store-dtype {args.store_dtype})")
        print(f"best of {args.repeats}; all times: " + ", ".join(f"{k} {[round(x, 3) for x in v]}" for k, v in results.items()))
        print(f"{'':32s}{'seconds':>10s}{'tokens/s':>12s}")
        for name, key in [("bare forward, all layers", "full"), ("bare forward, early exit", "early"),
                          ("harvest (model loaded)", "harvest"), (f"harvest lm:{args.layer - 1} + lm:{args.layer}", "two_sites")]:
            if key not in best:
                continue
            print(f"{name:32s}{best[key]:10.3f}{n_tokens / best[key]:12,.0f}")
        print("harvest loop, best run: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts_of_best.items())
              + "  (main thread: data = waiting for the prefetch thread; model = the forward as queued; "
              "store = gathering and queueing the host copies and shards)")
        print(f"harvest throughput / early-exit forward throughput: {best['early'] / best['harvest']:.3f}  "
              f"(hooks + store cost {best['harvest'] / best['early'] - 1:+.1%}; target: at most +10% at d >= 2048)")
        print(f"early-exit speed-up (full / early): {best['full'] / best['early']:.2f}x  "
              f"(layers alone would give {args.layers / (args.layer + 1):.2f}x)")
        print(f"harvest vs bare full forward (full / harvest): {best['full'] / best['harvest']:.2f}x")
        if "two_sites" in best:
            print(f"two sites in one pass / the deeper site alone: {best['two_sites'] / best['harvest']:.3f}  "
                  f"(the second store costs {best['two_sites'] / best['harvest'] - 1:+.1%}; target: at most +10%)")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "args": vars(args), "n_tokens": n_tokens, "best_seconds": best, "seconds": results,
                "tokens_per_s": {k: n_tokens / v for k, v in best.items()}, "harvest_parts_seconds": parts_of_best,
                "harvest_vs_early": best["harvest"] / best["early"], "full_vs_early": best["full"] / best["early"],
                "two_sites_vs_one": best["two_sites"] / best["harvest"] if "two_sites" in best else None}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
