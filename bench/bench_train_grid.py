"""Training a grid of SAEs in one pass over a store against one `train` run per SAE.

Writes an activation store of synthetic activations (Gaussian, with a few strong directions as
real residual streams have; the content does not change the cost of a step) in the store's format
and ``--store-dtype``, then trains the same SAEs (every ``--expansion`` x ``--k``) twice, one pass over the store each:

  separate  one ``mmsae.train.train`` per SAE: each reads and decodes every shard and draws its
            own initialisation sample (input scale, geometric-median b_dec)
  grid      one ``train`` with all the values: each batch read once and given to every SAE; the
            initialisation drawn once

and prints the wall time of each, their ratio and the time per SAE. The grid's SAEs are checked
to equal the separate runs' tensor by tensor.

    python bench/bench_train_grid.py
    python bench/bench_train_grid.py --d 768 --tokens 1000000 --expansion 8 16 --k 32 64 --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmsae.io import save_tensors, write_json  # noqa: E402
from mmsae.train import TrainConfig, train  # noqa: E402


def write_store(path: Path, acts: torch.Tensor, shard_tokens: int, dtype: torch.dtype, tokens_per_sample: int = 64) -> None:
    """``acts`` as a complete one-rank store (manifest.json + shards ending at sample boundaries)."""
    path.mkdir(parents=True)
    shards, n = [], len(acts)
    shard_tokens -= shard_tokens % tokens_per_sample
    for i, start in enumerate(range(0, n, shard_tokens)):
        part = acts[start:start + shard_tokens]
        m = len(part)
        sample = torch.arange(start, start + m) // tokens_per_sample
        name = f"shard-0-{i:05d}.safetensors"
        save_tensors(path / name, {"acts": part.to(dtype).contiguous(), "sample": sample, "pos": (torch.arange(m) % tokens_per_sample).int(),
                                   "is_image": torch.zeros(m, dtype=torch.bool), "tile": torch.full((m,), -1, dtype=torch.int16),
                                   "row": torch.full((m,), -1, dtype=torch.int16), "col": torch.full((m,), -1, dtype=torch.int16)})
        shards.append({"file": name, "rank": 0, "n_tokens": m, "n_image_tokens": 0, "norm_sum": float(part.norm(dim=1).sum()),
                       "first_sample": int(sample[0]), "last_sample": int(sample[-1])})
    write_json(path / "manifest.json", {
        "format": "mmsae-activations", "version": 1, "model": "synthetic", "layer": 0, "site": "lm:0", "hook_point": "synthetic",
        "d": acts.shape[1], "dtype": str(dtype).removeprefix("torch."), "tokens": n, "world": 1, "complete": True,
        "config": {"data": "synthetic"}, "shards": shards, "ranks": {"0": {"done": True}},
        "stats": {"n_tokens": n, "n_image_tokens": 0, "n_text_tokens": n, "n_samples": n // tokens_per_sample,
                  "mean_norm": float(acts.norm(dim=1).mean())}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256, help="activation width")
    p.add_argument("--tokens", type=int, default=196_608, help="tokens in the store (one pass is trained)")
    p.add_argument("--shard-tokens", type=int, default=16_384)
    p.add_argument("--store-dtype", choices=["float32", "bfloat16"], default="bfloat16", help="bfloat16: as a GPU harvest writes")
    p.add_argument("--expansion", type=int, nargs="+", default=[1, 2])
    p.add_argument("--k", type=int, nargs="+", default=[8, 16])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="keep the store and the SAEs here (default: a temporary folder)")
    args = p.parse_args()

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-train-grid-"))
    try:
        store = root / "store"
        if not store.exists():
            gen = torch.Generator().manual_seed(0)
            acts = torch.randn(args.tokens, args.d, generator=gen)
            acts += torch.randn(args.tokens, 8, generator=gen) @ (4 * torch.randn(8, args.d, generator=gen))
            write_store(store, acts, args.shard_tokens, getattr(torch, args.store_dtype))
            del acts
        base = dict(activations=str(store), batch_size=args.batch_size, device=args.device, progress=False, log_every=20)
        combos = [(e, k) for e in args.expansion for k in args.k]
        print(f"{len(combos)} SAEs (expansion {args.expansion} x k {args.k}) at d={args.d}, one pass over {args.tokens} "
              f"tokens ({args.store_dtype} store), batch {args.batch_size}, {torch.get_num_threads()} threads, {args.device}")

        started = time.perf_counter()
        for e, k in combos:
            train(TrainConfig(out=str(root / "separate" / f"x{e}-k{k}"), expansion=e, k=k, resume=False, **base))
        separate = time.perf_counter() - started

        started = time.perf_counter()
        train(TrainConfig(out=str(root / "grid"), expansion=args.expansion, k=args.k, resume=False, **base))
        grid = time.perf_counter() - started

        from safetensors.torch import load_file

        for e, k in combos:
            a = load_file(str(root / "separate" / f"x{e}-k{k}" / "sae.safetensors"))
            b = load_file(str(root / "grid" / f"x{e}-k{k}" / "sae.safetensors"))
            assert all(torch.equal(a[n], b[n]) for n in a), f"x{e}-k{k}: the grid's SAE differs from the separate run's"
        print(f"separate runs   {separate:7.2f} s  ({separate / len(combos):.2f} s per SAE)")
        print(f"one grid pass   {grid:7.2f} s  ({grid / len(combos):.2f} s per SAE)")
        print(f"ratio           {separate / grid:7.2f}x  (separate / grid; the grid's SAEs equal the separate runs' exactly)")
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
