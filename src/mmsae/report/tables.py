"""Score aggregation shared by the feature list and the run report."""

from __future__ import annotations

import math
from collections import defaultdict

# The paper's concept categories, in its order; other categories follow alphabetically.
CATEGORY_ORDER = ["scene", "object", "part", "material", "texture", "colour", "color"]


def _value(row: dict) -> float | None:
    v = row.get("value")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def feature_scores(scores: list[dict]) -> dict[int, dict[str, float]]:
    """Per feature, each scorer's value for the explanation itself (baseline "none"), averaged."""
    acc: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in scores:
        v = _value(row)
        if v is not None and row.get("baseline", "none") in ("none", None):
            acc[int(row["feature"])][str(row["scorer"])].append(v)
    return {f: {s: sum(vs) / len(vs) for s, vs in by.items()} for f, by in acc.items()}


def ordered_categories(categories) -> list[str]:
    cats = {c for c in categories if c}
    known = [c for c in CATEGORY_ORDER if c in cats]
    return known + sorted(cats - set(known))


def paper_table(scores: list[dict], explanations: dict[int, dict]) -> tuple[dict, list[str], dict]:
    """Mean score per scorer, baseline and concept category, as in the paper's Table 1.

    Returns ``(means, columns, counts)`` with ``means[scorer][baseline][column]``; ``columns`` is
    ``"all"`` followed by the categories present. A row without a category takes its feature's
    category from the explanation.
    """
    acc: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in scores:
        v = _value(row)
        if v is None:
            continue
        baseline = row.get("baseline") or "none"
        category = row.get("category") or (explanations.get(int(row["feature"])) or {}).get("category")
        cell = acc[str(row["scorer"])][str(baseline)]
        cell["all"].append(v)
        if category:
            cell[str(category)].append(v)
    columns = ["all"] + ordered_categories(c for by in acc.values() for cells in by.values() for c in cells if c != "all")
    means, counts = {}, {}
    for scorer, by in acc.items():
        # the explanation first, then its baselines
        baselines = sorted(by, key=lambda b: (b != "none", b))
        means[scorer] = {b: {c: sum(vs) / len(vs) for c, vs in by[b].items()} for b in baselines}
        counts[scorer] = {b: {c: len(vs) for c, vs in by[b].items()} for b in baselines}
    return means, columns, counts
