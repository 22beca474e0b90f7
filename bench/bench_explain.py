"""Explanation throughput (features/min) of the openai backend at 1, 8 and 32 concurrent requests.

The endpoint is mmsae's local fake OpenAI-compatible server with a fixed artificial latency per
request (default 0.5 s, like a fast hosted model); the index is a hand-made one with 5 images per
feature. Each row prints features/min and the ratio to the sequential run, next to the ideal
(the concurrency itself, capped by the number of features). Explanation only (one request per
feature) and with concept labels (two requests per feature). The server runs in its own process
(``tests/fake_server.py`` run as a script), so its work does not share the client's interpreter.

    python bench/bench_explain.py
    python bench/bench_explain.py --latency 1.0 --features 128

``--demo-model PATH`` instead measures the demo explainer's accuracy on oracle features: one
"feature" per shapes-world concept (red, star, striped, sky, hole, ...) whose patch map is the
concept's ground-truth mask pooled to the model's patch grid on 5 scenes that contain it. Each
highlight option (crop, mask, none) is scored by whether the explanation's concept names the
concept (via the oracle segmenter's phrase parser) and whether its category is right.

    python bench/bench_explain.py --demo-model ~/.cache/mmsae/demo-model
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--demo-model", help="measure the demo explainer on oracle features with this model instead")
    p.add_argument("--grid", type=int, default=8, help="--demo-model: the model's patch grid side")
    args = p.parse_args()
    if args.demo_model:
        return demo_accuracy(args.demo_model, args.grid)

    import numpy as np
    import torch
    from PIL import Image

    from mmsae.explain import ExplainConfig, explain
    from mmsae.index import IndexWriter
    from mmsae.models.base import Tile, TokenLayout

    tmp = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    try:
        r, c = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
        layout = TokenLayout(positions=torch.arange(196), tile=torch.zeros(196, dtype=torch.long), row=r.reshape(-1),
                             col=c.reshape(-1), tiles=[Tile((0, 0, 224, 224), 14, 14)], image_size=(224, 224))
        rng = np.random.default_rng(0)
        w = IndexWriter(tmp / "index", num_latents=args.features, top_n=5, sae_fingerprint="bench")
        for s in range(20):
            w.add_sample(s, Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)), layout)
        for f in range(args.features):
            for j in range(5):
                values = np.zeros(196)
                values[rng.integers(0, 196, 12)] = rng.random(12) + 0.1
                w.add_example(f, (f + j) % 20, values)
        index = w.finish()
        print(f"{args.features} features, 5 images each (224 px), server latency {args.latency:.2f} s/request")
        for concepts in (False, True):
            base = None
            for conc in args.concurrency:
                out = tmp / f"e-{conc}-{concepts}.jsonl"
                server = subprocess.Popen([sys.executable, str(TESTS / "fake_server.py"), "--latency", str(args.latency)],
                                          stdout=subprocess.PIPE, text=True)
                try:
                    base_url = server.stdout.readline().strip()
                    t = time.perf_counter()
                    explain(ExplainConfig(index=str(index.path), out=str(out), model="fake-vlm", base_url=base_url,
                                          concurrency=conc, concepts=concepts))
                    elapsed = time.perf_counter() - t
                finally:
                    server.terminate()
                    server.wait()
                rate = args.features / elapsed * 60
                base = base or rate
                ideal = min(conc, args.features)
                label = "explanation + concept" if concepts else "explanation only"
                print(f"  {label:22s} concurrency {conc:3d}: {rate:8.1f} features/min  "
                      f"({rate / base:5.2f}x sequential; ideal {ideal}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


CONCEPTS = ["red", "blue", "green", "yellow", "purple", "star", "circle", "square", "triangle", "hexagon",
            "striped", "dotted", "checked", "sky", "grass", "water", "sand", "hole", "handle", "outline"]


def demo_accuracy(model: str, grid: int) -> None:
    import numpy as np
    import torch

    from mmsae.data.shapes import ShapesWorld, parse_phrase
    from mmsae.explain import ExplainConfig, explain
    from mmsae.index import IndexWriter
    from mmsae.io import read_jsonl
    from mmsae.models.base import Tile, TokenLayout

    tmp = Path(tempfile.mkdtemp(prefix="bench-demo-explainer-"))
    try:
        world = ShapesWorld(seed=777)
        r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        layout = TokenLayout(positions=torch.arange(grid * grid), tile=torch.zeros(grid * grid, dtype=torch.long),
                             row=r.reshape(-1), col=c.reshape(-1), tiles=[Tile((0, 0, world.size, world.size), grid, grid)],
                             image_size=(world.size, world.size))
        w = IndexWriter(tmp / "index", num_latents=len(CONCEPTS), top_n=5, sae_fingerprint="oracle", model=model)
        added, i = set(), 0
        found = {name: 0 for name in CONCEPTS}
        while min(found.values()) < 5 and i < 2000:
            scene = world.scene(i)
            for f, name in enumerate(CONCEPTS):
                mask = scene.masks.get(name)
                if found[name] >= 5 or mask is None or mask.mean() < 0.01:
                    continue
                cell = world.size // grid
                pooled = mask[: cell * grid, : cell * grid].reshape(grid, cell, grid, cell).mean(axis=(1, 3))
                if i not in added:
                    w.add_sample(i, scene.image, layout)
                    added.add(i)
                w.add_example(f, i, np.where(pooled > 0.25, pooled, 0.0).reshape(-1))
                found[name] += 1
            i += 1
        index = w.finish()
        print(f"demo explainer on {len(CONCEPTS)} oracle features (ground-truth masks on {grid}x{grid} patches), 5 scenes each")
        for highlight in ("crop", "mask", "none"):
            out = tmp / f"{highlight}.jsonl"
            t = time.perf_counter()
            explain(ExplainConfig(index=str(index.path), out=str(out), backend="demo", highlight=highlight, device="cpu"))
            elapsed = time.perf_counter() - t
            rows = {r["feature"]: r for r in read_jsonl(out)}
            named = category = 0
            for f, name in enumerate(CONCEPTS):
                row = rows.get(f, {})
                words = set().union(*parse_phrase(row.get("concept") or "").values())
                named += name in words
                category += row.get("category") == _category(name)
            print(f"  highlight {highlight:5s}: concept named {named}/{len(CONCEPTS)}, category right {category}/{len(CONCEPTS)} "
                  f"({len(CONCEPTS) / elapsed * 60:.1f} features/min)")
            for f, name in enumerate(CONCEPTS):
                row = rows.get(f, {})
                print(f"      {name:8s} -> {row.get('concept')!s:24s} {row.get('category')!s:8s} | "
                      f"{'; '.join(row.get('details', {}).get('descriptions', [])[:2])[:110]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _category(name: str) -> str:
    from mmsae.data.shapes import COLOURS, PARTS, SCENES, SHAPES, TEXTURES

    return ("colour" if name in COLOURS else "object" if name in SHAPES else "texture" if name in TEXTURES
            else "part" if name in PARTS else "scene" if name in SCENES else "?")


if __name__ == "__main__":
    main()
