"""Explanation throughput (features/min) of the openai backend at 1, 8 and 32 concurrent requests.

The endpoint is mmsae's local fake OpenAI-compatible server with a fixed artificial latency per
request (default 0.5 s, like a fast hosted model); the index is a hand-made one with 5 images per
feature. Each row prints features/min and the ratio to the sequential run, next to the ideal
(the concurrency itself, capped by the number of features). Explanation only (one request per
feature) and with concept labels (two requests per feature). The server runs in its own process
(``python -m mmsae.explain.fake_server``), so its work does not share the client's interpreter.

    python bench/bench_explain.py
    python bench/bench_explain.py --latency 1.0 --features 128
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = p.parse_args()

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
                server = subprocess.Popen([sys.executable, "-m", "mmsae.explain.fake_server", "--latency", str(args.latency)],
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


if __name__ == "__main__":
    main()
