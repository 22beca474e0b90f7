"""The paper-layout table: per concept category and in total, each score against its baselines.

Rows of ``scores.jsonl`` are summarised per (category, scorer, baseline) as a mean over features
with a bootstrap 95% interval, then laid out with one line per category (the paper's six, any
others, and the total) and one column per score and baseline.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict

from .baselines import bootstrap_ci

CATEGORIES = ["scene", "object", "part", "material", "texture", "colour"]
_ALIASES = {"color": "colour", "colors": "colour", "colours": "colour", "scenes": "scene", "objects": "object",
            "parts": "part", "materials": "material", "textures": "texture"}

# (scorer, baseline, column title), in display order; absent combinations are left out
COLUMNS = [
    ("iou", "none", "IoU ours"),
    ("iou", "random_images", "IoU random img"),
    ("iou", "shuffled", "IoU shuffled"),
    ("iou", "full_mask", "IoU full mask"),
    ("iou", "ceiling", "IoU ceiling"),
    ("iou", "best_concept", "IoU best concept"),
    ("iou_dataset", "none", "NetDissect IoU ours"),
    ("iou_dataset", "shuffled", "NetDissect IoU shuffled"),
    # Pach et al.'s monosemanticity of the feature's top images (no explanation involved), beside IoU
    ("monosemanticity", "none", "MS"),
    ("monosemanticity", "shuffled", "MS shuffled latents"),
    ("clip", "none", "CLIP ours"),
    ("clip", "random_images", "CLIP random img"),
    ("clip", "shuffled", "CLIP shuffled"),
    ("text_similarity", "none", "text-sim ours"),
    ("text_similarity", "random_images", "text-sim random img"),
    ("text_similarity", "shuffled", "text-sim shuffled"),
    ("detection", "none", "detection bal-acc ours"),
    ("detection", "shuffled", "detection bal-acc shuffled"),
    ("detection_auroc", "none", "detection AUROC ours"),
    ("detection_auroc", "shuffled", "detection AUROC shuffled"),
]


def normalize_category(category: str | None) -> str:
    """One spelling per category (British 'colour', singular); missing ones are 'other'."""
    if not category:
        return "other"
    c = str(category).strip().lower()
    return _ALIASES.get(c, c)


def summarize(rows: list[dict], seed: int = 0, n_boot: int = 1000) -> list[dict]:
    """Mean and bootstrap CI over features per (category, scorer, baseline), plus category 'total'.

    Detection rows also give a ``detection_auroc`` entry from their ``details["auroc"]``.
    """
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        entries = [(row["scorer"], row["value"])]
        if row["scorer"] == "detection":
            entries.append(("detection_auroc", (row.get("details") or {}).get("auroc")))
        for scorer, value in entries:
            if value is None or value != value:  # missing or NaN
                continue
            for category in (normalize_category(row.get("category")), "total"):
                values[(category, scorer, row["baseline"])].append(float(value))
    out = []
    for (category, scorer, baseline), vals in values.items():
        mean, low, high = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
        out.append({"category": category, "scorer": scorer, "baseline": baseline, "n": len(vals),
                    "mean": mean, "ci_low": low, "ci_high": high})
    return sorted(out, key=lambda s: (_category_order(s["category"]), s["scorer"], s["baseline"]))


def _category_order(category: str) -> tuple[int, str]:
    if category == "total":
        return (2, "")
    if category in CATEGORIES:
        return (0, f"{CATEGORIES.index(category):02d}")
    return (1, category)


def _fmt(mean: float, scorer: str) -> str:
    return f"{mean:.1f}" if scorer in ("clip", "text_similarity") else f"{mean:.3f}"


def markdown_table(summary: list[dict], with_ci: bool = True) -> str:
    """The paper-layout table as Markdown: one line per category, one column per score/baseline."""
    cells = {(s["category"], s["scorer"], s["baseline"]): s for s in summary}
    columns = [c for c in COLUMNS if any((cat, c[0], c[1]) in cells for cat, _, _ in cells)]
    categories = sorted({s["category"] for s in summary}, key=_category_order)
    n_by_category = {}
    for s in summary:
        if s["baseline"] == "none":
            n_by_category[s["category"]] = max(n_by_category.get(s["category"], 0), s["n"])
    lines = ["| category | features | " + " | ".join(title for _, _, title in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for category in categories:
        row = []
        for scorer, baseline, _ in columns:
            s = cells.get((category, scorer, baseline))
            if s is None:
                row.append("")
            elif with_ci and s["n"] > 1:
                row.append(f"{_fmt(s['mean'], scorer)} [{_fmt(s['ci_low'], scorer)}, {_fmt(s['ci_high'], scorer)}]")
            else:
                row.append(_fmt(s["mean"], scorer))
        name = f"**{category}**" if category == "total" else category
        lines.append(f"| {name} | {n_by_category.get(category, 0)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def csv_table(summary: list[dict]) -> str:
    """The summary in long form: category, scorer, baseline, n, mean, ci_low, ci_high."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["category", "scorer", "baseline", "n", "mean", "ci_low", "ci_high"],
                            lineterminator="\n")
    writer.writeheader()
    for s in summary:
        writer.writerow({**s, **{k: f"{s[k]:.6g}" for k in ("mean", "ci_low", "ci_high")}})
    return buf.getvalue()
