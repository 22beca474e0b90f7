"""Stage costs through the intervention layer, against another tree of mmsae measured in the same run.

Times, on the demo model and a demo SAE (best of several runs each):

  steer       16 prompts x 4 generated tokens with one feature clamped on the image tokens
  attribute   one forward + backward pass (activation x gradient for every feature)
  ablation    the attribution's check: 8 features, each really zeroed
  evaluate    the spliced-loss evaluation on 8 held-out samples

with this tree and with ``--baseline-src`` (the ``src`` folder of another checkout, e.g.
``git worktree add /tmp/before <commit>``), each in processes of its own, alternating, and prints
the best times and the ratios (this tree / baseline; below 1 is faster). On a shared 2-core
machine the ratios move by +-20% from run to run; rerun before reading a difference into them.

    python bench/bench_stages.py --baseline-src /tmp/before/src --sae runs/demo/sae
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, sae_path: str, repeats: int) -> dict[str, float]:
    """The four timings with whichever mmsae this process imports (old or new API)."""
    import torch

    from mmsae import attribute as A
    from mmsae import steer as S
    from mmsae.data.shapes import ShapesWorld
    from mmsae.models import load_adapter
    from mmsae.sae import load_sae

    try:
        from mmsae.evaluate import EvaluateConfig, evaluate
    except ImportError:  # trees from before the stage moved out of sae/
        from mmsae.sae.metrics import EvaluateConfig, evaluate

    torch.manual_seed(0)
    adapter = load_adapter(model)
    sae = load_sae(sae_path).eval()
    layer = sae.cfg.layer if sae.cfg.layer is not None else 6
    images = [ShapesWorld(5).scene(i).image for i in range(16)]
    prompts = ["What colour is the star?"] * 16

    def best(fn, n: int = repeats) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def takes_layer(fn) -> tuple:  # older trees passed the layer explicitly
        return (layer,) if "layer" in inspect.signature(fn).parameters else ()

    ivs = [S.Intervention(0, 50.0, "clamp")]  # which feature does not change the cost
    steer_kwargs = {"span": "image", **({"layer": layer} if takes_layer(S.run_batches) else {})}
    objective = A.build_objective(adapter, images[0], "What colour is the star?", "red", "blue")
    att = A.attribute_answer(adapter, sae, objective, *takes_layer(A.attribute_answer))
    top = [int(f) for f in att.feature_totals().abs().argsort(descending=True)[:8]]
    return {
        "steer": best(lambda: S.run_batches(adapter, images, prompts, 8, 4, sae, ivs, **steer_kwargs)),
        "attribute": best(lambda: A.attribute_answer(adapter, sae, objective, *takes_layer(A.attribute_answer))),
        "ablation": best(lambda: A.ablation_effects(adapter, sae, objective, top, *takes_layer(A.ablation_effects))),
        "evaluate": best(lambda: evaluate(EvaluateConfig(sae=sae_path, model=model, data="shapes:8:1", max_samples=8,
                                                         out=tempfile.mkdtemp() + "/m.json", progress=False,
                                                         device="cpu")), max(1, repeats - 1)),
    }


def run_tree(src: Path, args) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--sae", args.sae, "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-src", required=False, help="the src/ folder of the tree to compare against")
    p.add_argument("--model", default=str(Path(os.environ.get("MMSAE_CACHE", Path.home() / ".cache" / "mmsae")) / "smollm2-dinov2-llava-v2"))
    p.add_argument("--sae", default="runs/demo/sae", help="an lm SAE of the model (the demo's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each stage per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per tree, alternating between the trees")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.sae, args.repeats)))
        return
    # the trees alternate, round after round, so that drift in the machine's load hits both alike
    ours, base = {}, {} if args.baseline_src else None
    for _ in range(args.rounds):
        for times, src in ((ours, ROOT / "src"), (base, Path(args.baseline_src) if args.baseline_src else None)):
            if src is not None:
                for name, t in run_tree(src, args).items():
                    times[name] = min(t, times.get(name, t))
    print(f"model {args.model}, SAE {args.sae}, best of {args.repeats} x {args.rounds} rounds")
    print(f"{'stage':12s}{'this tree, s':>14s}" + (f"{'baseline, s':>14s}{'ratio':>8s}" if base else ""))
    for name, t in ours.items():
        print(f"{name:12s}{t:14.3f}" + (f"{base[name]:14.3f}{t / base[name]:8.2f}" if base else ""))


if __name__ == "__main__":
    main()
