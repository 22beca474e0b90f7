"""Several runs scored in one call (``mmsae score --run A B``) against one call per run.

Copies each given run's ``index/`` and ``explanations.jsonl`` to a temporary folder (twice), then
scores, each variant in a fresh process (models load in each, as on the command line):

  separate  one score call per run, one after the other
  shared    one call with every run: models loaded once, each (image, phrase) segmented once

and reports wall seconds, segmenter calls (a counting wrapper around the segmenter) and whether
every run's scores.jsonl / .md / .csv are byte-identical between the two. The runs are only read.

    python bench/bench_score_runs.py runs/demo runs/demo/vision-11
    python bench/bench_score_runs.py A B --scorers iou detection --ms-model PATH
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUTPUTS = ("scores.jsonl", "scores.md", "scores.csv")


def run_variant(runs: list[str], options: dict, together: bool) -> dict:
    """Score ``runs`` (in this process) together or one call each; seconds and segmenter calls."""
    from mmsae.score import ScoreConfig, score
    from mmsae.score.segmenters import load_segmenter

    class Counting:
        def __init__(self, inner):
            self.inner, self.name, self.calls = inner, inner.name, 0

        def segment(self, image, phrase, meta=None):
            self.calls += 1
            return self.inner.segment(image, phrase, meta)

    calls, start = 0, time.perf_counter()
    for group in [runs] if together else [[r] for r in runs]:
        segmenter = Counting(load_segmenter(options["segmenter"], device=options.get("device", "cpu")))
        score(ScoreConfig(run=group, **options), segmenter=segmenter)
        calls += segmenter.calls
    return {"seconds": round(time.perf_counter() - start, 2), "segmenter_calls": calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders with index/ and explanations.jsonl")
    p.add_argument("--scorers", nargs="+", default=["iou", "text_similarity", "detection"])
    p.add_argument("--segmenter", default="oracle")
    p.add_argument("--judge", default="oracle")
    p.add_argument("--ms-model", help="image encoder for the monosemanticity scorer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--variant", choices=["separate", "shared"], help=argparse.SUPPRESS)  # the child process
    p.add_argument("--options", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.runs, json.loads(args.options), args.variant == "shared")))
        return

    options = {"scorers": args.scorers, "segmenter": args.segmenter, "judge": args.judge, "device": args.device}
    if args.ms_model:
        options["ms_model"] = args.ms_model
    tmp = Path(tempfile.mkdtemp(prefix="bench-score-runs-"))
    try:
        results, folders = {}, {}
        for variant in ("separate", "shared"):
            folders[variant] = []
            for i, run in enumerate(args.runs):
                copy = tmp / variant / f"{i}-{Path(run).name}"
                shutil.copytree(Path(run) / "index", copy / "index")
                shutil.copy(Path(run) / "explanations.jsonl", copy / "explanations.jsonl")
                folders[variant].append(str(copy))
            out = subprocess.run([sys.executable, __file__, *folders[variant], "--variant", variant,
                                  "--options", json.dumps(options)], check=True, capture_output=True, text=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        results["identical"] = all((Path(a) / name).read_bytes() == (Path(b) / name).read_bytes()
                                   for a, b in zip(folders["separate"], folders["shared"]) for name in OUTPUTS)
        results["options"] = options
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
