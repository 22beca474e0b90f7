"""The sweep behind the demo's SAE settings: each setting runs the demo's stages up to `score`.

    python bench/demo_sweep.py                       # every setting below, into runs/demo-sweep/
    python bench/demo_sweep.py --only mat8-k16 --out /tmp/sweep

All settings share one harvest (the demo's training slice of the shapes world, layer 6), then
train, evaluate, index, explain and score exactly as `mmsae demo` does. It prints, per setting:
the fraction of latents that fire on the held-out index, FVU on image tokens, the spliced-in
cross-entropy increase on text tokens (with and without the excluded attention-sink tokens), and
IoU of the explained features against shuffled explanations. A setting whose folder is complete
is read, not rerun, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from mmsae.demo import DemoConfig, build_demo_model  # noqa: E402
from mmsae.demo.pipeline import FULL, MATRYOSHKA_SINKS, DemoSizes, run_pipeline  # noqa: E402
from mmsae.index import FeatureIndex  # noqa: E402
from mmsae.io import read_json, read_jsonl  # noqa: E402

# the recipe before the defaults changed (peak lr 2e-4 / sqrt(n / 2^14) at d = 576, AuxK 1/32,
# 100 warm-up steps, a 10M-token dead window that never triggers in a 250k-token run)
OLD_RECIPE = {"lr": 2e-4 / (16 * 576 / 2**14) ** 0.5, "auxk_coefficient": 1 / 32, "warmup": 100, "dead_tokens": 10_000_000}
SETTINGS: dict[str, DemoSizes] = {
    "topk-16x-k4": dataclasses.replace(FULL, expansion=16, k=4, train_options={}),
    "topk-16x-k4-old-recipe": dataclasses.replace(FULL, expansion=16, k=4, train_options=OLD_RECIPE),
    "mat-8x-k8-sink": dataclasses.replace(FULL, expansion=8, k=8, train_options=MATRYOSHKA_SINKS),
    "mat-16x-k4-sink": dataclasses.replace(FULL, expansion=16, k=4, train_options=MATRYOSHKA_SINKS),
    "topk-4x-k4-sink": dataclasses.replace(FULL, expansion=4, k=4, train_options={"exclude_norm_above": 4.0}),
    "mat-2x-k8-sink": dataclasses.replace(FULL, expansion=2, k=8, train_options=MATRYOSHKA_SINKS),
    "mat-4x-k8-sink-auxk": dataclasses.replace(FULL, expansion=4, k=8, train_options={**MATRYOSHKA_SINKS, "auxk_coefficient": 1 / 32}),
    "mat-8x-k8-sink-auxk": dataclasses.replace(FULL, expansion=8, k=8, train_options={**MATRYOSHKA_SINKS, "auxk_coefficient": 1 / 32}),
    "mat-4x-k8-sink-resample": dataclasses.replace(FULL, expansion=4, k=8, train_options={**MATRYOSHKA_SINKS, "resample_every": 25}),
}


def summarise(run: Path) -> dict:
    """The figures the demo's targets are stated in, read from one run folder."""
    metrics = read_json(run / "metrics.json")
    index = FeatureIndex(run / "index")
    n = metrics["num_latents"]
    spliced = metrics["spliced"]
    kept = metrics.get("spliced_without_excluded") or spliced
    iou = {}
    for row in read_jsonl(run / "scores.jsonl"):
        if row["scorer"] in ("iou", "monosemanticity") and row["baseline"] in ("none", "shuffled"):
            iou.setdefault((row["scorer"], row["baseline"]), []).append(row["value"])
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {
        "alive_index": len(index.features()) / n,
        "fvu_image": metrics["reconstruction"]["image"]["fvu"],
        "ce_text": spliced["text"]["ce_increase"],
        "ce_text_kept": kept["text"]["ce_increase"],
        "iou": mean(iou.get(("iou", "none"), [])),
        "iou_shuffled": mean(iou.get(("iou", "shuffled"), [])),
        "ms": mean(iou.get(("monosemanticity", "none"), [])),
        "ms_shuffled": mean(iou.get(("monosemanticity", "shuffled"), [])),
        "explained": len(iou.get(("iou", "none"), [])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo-sweep")
    p.add_argument("--only", nargs="+", choices=sorted(SETTINGS), help="run only these settings")
    args = p.parse_args()
    out = Path(args.out)
    model = build_demo_model(DemoConfig(out=str(out)))
    run_pipeline(DemoConfig(out=str(out / "shared")), model, FULL, last="harvest")
    rows = {}
    for name in args.only or SETTINGS:
        run = out / name
        if not (run / "scores.jsonl").exists():
            run.mkdir(parents=True, exist_ok=True)
            if not (run / "activations").exists():
                os.symlink((out / "shared" / "activations").resolve(), run / "activations")
            start = time.perf_counter()
            run_pipeline(DemoConfig(out=str(run), overwrite=True), model, SETTINGS[name], last="score")
            print(f"[sweep] {name}: {time.perf_counter() - start:.0f} s", flush=True)
        rows[name] = summarise(run)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    print("\n| setting | alive on held-out index | FVU image | text CE increase (all / sinks kept out) "
          "| IoU ours / shuffled | MS / shuffled | explained |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['alive_index']:.2f} | {r['fvu_image']:.3f} | {r['ce_text']:.2f} / {r['ce_text_kept']:.2f} "
              f"| {r['iou']:.3f} / {r['iou_shuffled']:.3f} | {r['ms']:.3f} / {r['ms_shuffled']:.3f} | {r['explained']} |")


if __name__ == "__main__":
    main()
