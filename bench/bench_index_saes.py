"""Two SAEs indexed in one build (one forward pass per batch) against two separate builds.

Builds the small random LLaVA of ``bench_index.py`` (CLIP tower, Llama text model) and two random
TopK SAEs, one at ``lm:LAYER`` and one at ``vision:VISION``, renders shapes-world images, and
times, interleaved ``--repeats`` times (best of each), model loading excluded (the manifests'
``run_seconds``):

  separate  build_index with each SAE alone, one after the other (two passes over the data)
  shared    build_index with both SAEs (``--sae A B``): one pass, both sites captured by run_sites

    python bench/bench_index_saes.py
    python bench/bench_index_saes.py --images 256 --latents 16384 --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import build_llava  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--vision", type=int, default=3, help="vision block of the second SAE")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from mmsae.index import IndexConfig, build_index
    from mmsae.models import load_adapter
    from mmsae.sae import SaeConfig, SparseAutoencoder

    tmp = Path(tempfile.mkdtemp(prefix="bench-index-saes-"))
    try:
        model = build_llava(tmp / "llava", args.image_size, args.patch, args.d, args.layers)
        adapter = load_adapter(model, device="cpu")
        saes = []
        for seed, site in enumerate([f"lm:{args.layer}", f"vision:{args.vision}"]):
            torch.manual_seed(seed)
            SparseAutoencoder(SaeConfig(d_in=adapter.site_width(site), num_latents=args.latents, k=args.k, model=model,
                                        site=site)).save(tmp / f"sae-{seed}")
            saes.append(str(tmp / f"sae-{seed}"))
        del adapter
        data = f"shapes:{args.images}:0"

        def run(sae, out: Path) -> float:
            built = build_index(IndexConfig(sae=sae, data=data, out=str(out), batch_size=args.batch_size, device=args.device,
                                            checkpoint_every=10**9))
            seconds = max(ix.cfg["run_seconds"] for ix in (built if isinstance(built, list) else [built]))
            shutil.rmtree(out, ignore_errors=True)
            return seconds

        separate_s, shared_s = [], []
        for r in range(args.repeats):
            separate_s.append(sum(run(sae, tmp / f"alone-{r}-{i}") for i, sae in enumerate(saes)))
            shared_s.append(run(saes, tmp / f"shared-{r}"))
        a, b = min(separate_s), min(shared_s)
        print(f"lm:{args.layer} + vision:{args.vision} SAEs ({args.latents} latents, k={args.k}); {args.images} images "
              f"({args.image_size} px, patch {args.patch}), batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads")
        print(f"  two separate builds : {a:7.2f} s")
        print(f"  one two-SAE build   : {b:7.2f} s   ({a / b:.2f}x faster)")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "separate_seconds": separate_s, "shared_seconds": shared_s,
                                                   "speedup": a / b}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
