"""The dashboard and run report: what the site holds, that it scales, that nothing in it runs."""

from __future__ import annotations

import html.parser
import json
import re
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.errors import MmsaeError
from mmsae.io import append_jsonl, write_json
from mmsae.models.base import Tile, TokenLayout
from mmsae.report import DashboardConfig, build_dashboard, make_server
from mmsae.report.safe import js_json

# A payload that would set window.pwned or the title if any of it were ever parsed as markup or
# script: in HTML, in an attribute, and inside JSON embedded in a <script> element.
HOSTILE = ("<script>window.pwned=1;document.title='pwned'</script>"
           "<img src=x onerror=\"window.pwned=2;document.title='pwned'\">"
           "</script><script>window.pwned=3</script>\u2028\u2029 & \"quotes\" 'single' <!-- -->")
GRID = 4  # image tokens per side
N_LATENTS = 12
SHAPES = [("red", "square"), ("blue", "circle"), ("green", "triangle"), ("yellow", "square"), ("red", "circle"), ("blue", "square")]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 210, 30)}


def _picture(colour: str, cell: tuple[int, int], size: int = 64) -> Image.Image:
    """A grey picture with one coloured block in grid cell ``cell``."""
    arr = np.full((size, size, 3), 200, np.uint8)
    step = size // GRID
    r, c = cell
    arr[r * step:(r + 1) * step, c * step:(c + 1) * step] = COLOURS[colour]
    return Image.fromarray(arr)


def _layout(size: int = 64) -> TokenLayout:
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    return TokenLayout(positions=torch.arange(5, 5 + GRID * GRID), tile=torch.zeros(GRID * GRID, dtype=torch.long),
                       row=torch.from_numpy(rows), col=torch.from_numpy(cols),
                       tiles=[Tile((0.0, 0.0, float(size), float(size)), GRID, GRID)], image_size=(size, size))


def make_run(root: Path, with_index: bool = True) -> Path:
    """A small run folder with every file the dashboard reads (the index through IndexWriter)."""
    run = root / "run"
    sae = run / "sae"
    sae.mkdir(parents=True)
    write_json(sae / "cfg.json", {"d_in": 8, "num_latents": N_LATENTS, "k": 2, "expansion_factor": 1.5,
                                  "normalize_decoder": True, "architecture": "topk", "model": "tiny-llava",
                                  "layer": 2, "hook_point": "language_model.layers.2"})
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"encoder.weight": rng.normal(size=(N_LATENTS, 8)).astype(np.float32),
               "encoder.bias": np.zeros(N_LATENTS, np.float32),
               "W_dec": rng.normal(size=(N_LATENTS, 8)).astype(np.float32), "b_dec": np.zeros(8, np.float32)},
              str(sae / "sae.safetensors"))
    append_jsonl(sae / "train_log.jsonl", [{"step": s, "loss": 1.0 / (s + 1), "fvu": 0.9 / (s + 1) + 0.05, "l0": 2.0,
                                            "dead_fraction": max(0.0, 0.5 - 0.05 * s), "lr": 1e-3, "tokens": 64 * s}
                                           for s in range(0, 20)])
    # the layout mmsae.evaluate.evaluate writes
    recon = {kind: {"tokens": 100, "fvu": fvu, "explained_variance": 1 - fvu, "l0": 2.0, "dead_fraction": 0.5,
                    "dense_fraction": 0.0, "density_histogram": {"log10_edges": [-2.0, -1.5, -1.0, -0.5, 0.0],
                                                                 "counts": [1, 3, 2, 0], "dead": 6}}
             for kind, fvu in (("all", 0.12), ("image", 0.1), ("text", 0.2))}
    spliced = {"targets": 40, "ce_clean": 2.1,
               **{kind: {"ce_sae": 2.3, "ce_zero_ablation": 4.0, "ce_increase": 0.2, "ce_recovered": 0.894,
                         "kl_sae": 0.05, "kl_zero_ablation": 1.2} for kind in ("all", "image", "text")}}
    write_json(run / "metrics.json", {"sae": str(sae), "architecture": "topk", "d_in": 8, "num_latents": N_LATENTS,
                                      "k": 2, "model": "tiny-llava", "layer": 2, "reconstruction": recon,
                                      "reconstruction_source": "store", "spliced": spliced, "data": "shapes:8"})
    if with_index:
        from mmsae.index import IndexWriter

        writer = IndexWriter(run / "index", num_latents=N_LATENTS, top_n=5, model="tiny-llava", layer=2)
        for sid, (colour, shape) in enumerate(SHAPES):
            cell = (sid % GRID, (2 * sid) % GRID)
            writer.add_sample(sid, _picture(colour, cell), _layout(), meta={"colour": colour, "shape": shape},
                              text=f"a {colour} {shape}")
        # feature f fires on the block of the pictures of colour f (0 red, 1 blue, 2 green, 3 yellow);
        # features 4 and 5 fire on everything (5 is dense); 6.. never fire (dead)
        for f, colour in enumerate(["red", "blue", "green", "yellow"]):
            for sid, (c, _) in enumerate(SHAPES):
                if c == colour:
                    values = np.zeros(GRID * GRID, np.float32)
                    values[(sid % GRID) * GRID + (2 * sid) % GRID] = 3.0 + sid
                    writer.add_example(f, sid, values)
            writer.add_token(f, token=colour, context=f"a {colour} shape", activation=2.5, before="a ", after=" shape")
        for f in (4, 5):
            for sid in range(len(SHAPES)):
                writer.add_example(f, sid, np.linspace(0.1, 1.0, GRID * GRID, dtype=np.float32))
        writer.add_token(0, token=HOSTILE, context=HOSTILE, activation=1.0, before=HOSTILE, after=HOSTILE)
        writer.finish()
    explanations = ["reds", "blue circles and blue squares", "green triangles", "yellow things", "grey background",
                    "everything (dense)"]
    explanations[0] = HOSTILE
    categories = ["colour", "object", "object", "colour", "scene", "texture"]
    append_jsonl(run / "explanations.jsonl", [
        {"feature": f, "explanation": e, "concept": e.split()[0], "category": categories[f], "backend": "oracle",
         "model": "oracle", "prompt_version": "v1", "evidence": [0, 1], "binarization": "paper"}
        for f, e in enumerate(explanations)])
    rows = []
    for f in range(6):
        rows += [{"feature": f, "scorer": "iou", "baseline": "none", "value": 0.1 * (f + 1), "category": categories[f], "details": {}},
                 {"feature": f, "scorer": "iou", "baseline": "random_images", "value": 0.01, "category": categories[f], "details": {}},
                 {"feature": f, "scorer": "clip", "baseline": "none", "value": 20.0 + f, "category": categories[f], "details": {}},
                 {"feature": f, "scorer": "clip", "baseline": "shuffled", "value": 18.0, "category": categories[f], "details": {}}]
    append_jsonl(run / "scores.jsonl", rows)
    (run / "scores.md").write_text("| score | all |\n|---|---|\n| iou | 0.35 |\n" + HOSTILE + "\n")
    append_jsonl(run / "steering.jsonl", [
        {"prompt": "What colour is the shape? " + HOSTILE, "image": None,
         "interventions": [{"feature": 1, "value": 8.0, "mode": "clamp"}], "span": "all", "layer": 2,
         "clean": "It is red.", "steered": "It is blue. " + HOSTILE}])
    write_json(run / "demo_steering.json", {"targets": [
        {"kind": "colour", "target": "blue" + HOSTILE, "feature": 1, "span": "image", "value": 12.5, "success": 0.9,
         "clean_says_target": 0.1, "n": 10}], "best_success": 0.9})
    write_json(run / "sweep.json", {"feature": 1, "keywords": ["blue"],
                                    "rows": [{"value": None, "concept_rate": 0.0, "perplexity": 3.0},
                                             {"value": 8.0, "concept_rate": 1.0, "perplexity": 4.5}]})
    Image.new("RGB", (40, 30), (40, 80, 200)).save(run / "sweep.png")
    Image.new("RGB", (32, 32), (200, 80, 40)).save(run / "attribution_heatmap.png")
    write_json(run / "demo_log.json", {"quick": True, "stages": {"harvest": {"seconds": 12.5}, "train": {"seconds": 40.0}}})
    write_json(run / "attribution.json", {
        "prompt": "Is there a red shape? " + HOSTILE, "answer": "yes", "contrast": "no", "objective_kind": "logit_diff",
        "objective": 1.5, "layer": 2,
        "top_features": [{"feature": 0, "attribution": 0.8, "image": 0.6, "text": 0.2},
                         {"feature": 1, "attribution": -0.3, "image": -0.3, "text": 0.0}],
        "text_tokens": [{"position": 1, "token": "Is", "attribution": 0.1}, {"position": 2, "token": HOSTILE, "attribution": -0.5}],
        "ablation_check": {"n": 2, "pearson": 0.9, "features": [{"feature": 0, "estimate": -0.8, "real": -0.7}]},
        "heatmaps": {"all": "attribution_heatmap.png", "evil": "../../../etc/passwd"},
    })
    return run


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("report"))
    index = build_dashboard(DashboardConfig(run=str(run), chunk_size=4, page_size=3))
    assert index == run / "site" / "index.html"
    return run / "site"


def _load_data(path: Path) -> tuple[str, object]:
    """Parse a data file ``MMSAE.put(KEY,VALUE);`` as the browser would: both halves are JSON."""
    m = re.fullmatch(r"MMSAE\.put\((\".*?\"),(.*)\);\n", path.read_text(encoding="utf-8"), re.S)
    assert m, path
    return json.loads(m.group(1)), json.loads(m.group(2))


def test_site_holds_every_page_chunk_feature_and_image(site):
    for name in ("index.html", "feature.html", "report.html", "assets/app.js", "assets/index.js", "assets/feature.js",
                 "assets/style.css", "data/meta.js"):
        assert (site / name).is_file(), name
    _, meta = _load_data(site / "data/meta.js")
    assert meta["num_latents"] == N_LATENTS and meta["n_rows"] == N_LATENTS
    assert meta["n_dead"] == N_LATENTS - 6 and meta["n_live"] == 6
    assert meta["scorers"] == ["iou", "clip"] and meta["primary"] == "iou"
    # 12 rows in chunks of 4, in the default order: by IoU (feature 5 best), dead features last
    assert meta["n_chunks"] == 3
    rows = [r for i in range(3) for r in _load_data(site / f"data/list/{i:05d}.js")[1]]
    assert [r["f"] for r in rows[:6]] == [5, 4, 3, 2, 1, 0]
    assert all(r.get("d") == 1 for r in rows[6:]) and sorted(r["f"] for r in rows[6:]) == list(range(6, N_LATENTS))
    assert rows[5]["e"] == HOSTILE and rows[5]["s"] == {"iou": pytest.approx(0.1), "clip": pytest.approx(20.0)}
    # pages exist for the six live features and not for dead ones
    for f in range(N_LATENTS):
        assert (site / f"data/f/000/{f}.js").exists() == (f < 6), f
    key, detail = _load_data(site / "data/f/000/1.js")
    assert key == "f/1"
    assert detail["explanation"]["explanation"] == "blue circles and blue squares"
    assert {(s["scorer"], s["baseline"]) for s in detail["scores"]} == {("iou", "none"), ("iou", "random_images"),
                                                                        ("clip", "none"), ("clip", "shuffled")}
    assert [e["sample_id"] for e in detail["examples"]] == [5, 1]  # blue pictures, higher activation first
    assert detail["stats"]["max_activation"] == pytest.approx(8.0)
    assert detail["tokens"][0]["token"] == "blue"
    assert detail["steering"][0]["steered"].startswith("It is blue.")
    for ex in detail["examples"]:
        for mode in ("raw", "overlay", "mask"):
            with Image.open(site / ex[mode]) as im:
                assert im.format == "JPEG" and max(im.size) <= 224
    # the overlay marks the block where the feature fired: the mask keeps it and darkens the rest
    ex = detail["examples"][0]
    sid = ex["sample_id"]
    cell = (sid % GRID, (2 * sid) % GRID)
    step = 64 // GRID
    mask = np.asarray(Image.open(site / ex["mask"]).convert("L"), dtype=np.float32)
    inside = mask[cell[0] * step + 3:(cell[0] + 1) * step - 3, cell[1] * step + 3:(cell[1] + 1) * step - 3].mean()
    assert inside > mask.mean() + 10


def test_everything_is_local(site):
    for path in site.rglob("*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", text), path
            assert "@import" not in text and "url(http" not in text, path


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_hostile_explanation_is_inert_in_every_file(site):
    allowed_scripts = {"assets/app.js", "data/meta.js", "assets/index.js", "assets/feature.js"}
    for page in ("index.html", "feature.html", "report.html"):
        text = (site / page).read_text(encoding="utf-8")
        parser = _Tags()
        parser.feed(text)
        for tag, attrs in parser.tags:
            assert not any(a.startswith("on") for a in attrs), (page, tag, attrs)
            if tag == "script":
                assert attrs.get("src") in allowed_scripts, (page, attrs)
            if tag == "img":
                assert not attrs["src"].startswith(("x", "/", "..")), attrs
        assert "<script>window.pwned" not in text and "<img src=x" not in text
    report = (site / "report.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;window.pwned=1" in report  # shown, as text
    # a heat-map path leading out of the run folder is not followed
    assert sorted(p.name for p in (site / "plots").glob("attribution-*")) == ["attribution-all.png"]
    for path in (site / "data").rglob("*.js"):
        text = path.read_text(encoding="utf-8")
        # data files hold no raw markup characters and no line separators, only \u escapes
        assert not set("<>&\u2028\u2029") & set(text), path
    _, detail = _load_data(site / "data/f/000/0.js")
    assert detail["explanation"]["explanation"] == HOSTILE  # escaping keeps the text exactly


def test_js_json_escapes_and_round_trips():
    value = {"a": HOSTILE, "n": [1, 2.5, float("nan"), np.float32(0.5), np.int64(3)], "</script>": True}
    text = js_json(value)
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == {"a": HOSTILE, "n": [1, 2.5, None, 0.5, 3], "</script>": True}


def test_run_report_sections_and_paper_table(site):
    report = (site / "report.html").read_text(encoding="utf-8")
    for section in ("Run", "Pipeline (mmsae demo)", "SAE configuration", "Training", "Evaluation", "Explanation scores",
                    "Steering", "Attribution"):
        assert f"<h2>{section}</h2>" in report, section
    metric_plots = sorted(p.name for p in (site / "plots").glob("metrics-*.png"))
    assert len(metric_plots) == 1  # the density histograms of all / image / text tokens, on one plot
    for plot in ("training.png", metric_plots[0], "scores.png"):
        with Image.open(site / "plots" / plot) as im:
            assert im.format == "PNG" and im.size[0] > 100, plot
    with Image.open(site / "plots/attribution-all.png") as im:  # the run's own figures, copied
        assert im.size == (32, 32)
    with Image.open(site / "plots/steering-sweep.png") as im:
        assert im.size == (40, 30)
    steering = report[report.index("<h2>Steering</h2>"):report.index("<h2>Attribution</h2>")]
    assert "plots/steering-sweep.png" in steering and "concept_rate" in steering
    # the demo's steering search: one row per target, the target text escaped
    assert "steering features found by attribution" in steering
    assert "<td class=num>0.9</td><td class=num>0.1</td><td class=num>10</td>" in steering
    assert HOSTILE not in steering and "&lt;" in steering
    assert "<a href='feature.html#1'>#1</a>" in steering  # the steered feature links to its page
    assert "tiny-llava" in report and "language_model.layers.2" in report
    evaluation = report[report.index("<h2>Evaluation</h2>"):report.index("<h2>Explanation scores</h2>")]
    for text in ("<th>all</th><th>image</th><th>text</th>", "ce_recovered", "0.894", "explained_variance"):
        assert text in evaluation, text
    assert "Not in this run" not in report  # every piece is there
    # the paper-layout table: a line per category; IoU of the explanations for 'object' is the mean of
    # features 1 and 2 (0.2, 0.3), the total the mean over all six (0.1 ... 0.6)
    table = report[report.index("<table class='rows paper'>"):]
    table = table[:table.index("</table>")]
    assert "<th>IoU ours</th><th>IoU random img</th><th>CLIP ours</th><th>CLIP shuffled</th>" in table
    lines = {re.search(r"<th>(\w+)</th>", tr).group(1): tr for tr in table.split("<tr")[2:]}
    assert list(lines) == ["scene", "object", "texture", "colour", "total"]  # the paper's order
    assert "<td class=num>2</td><td class=num title='n = 2'>0.250 " in lines["object"]
    assert "<td class=num>6</td><td class=num title='n = 6'>0.350 " in lines["total"]


def test_missing_pieces_are_named_not_fatal(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    append_jsonl(run / "explanations.jsonl", [{"feature": 3, "explanation": "stripes"}])
    build_dashboard(DashboardConfig(run=str(run)))
    _, meta = _load_data(run / "site/data/meta.js")
    missing = " ".join(meta["missing"])
    for name in ("cfg.json", "index/", "metrics.json", "scores.jsonl", "steering.jsonl", "attribution.json"):
        assert name in missing, name
    assert meta["n_rows"] == 1 and (run / "site/data/f/000/3.js").exists()
    report = (run / "site/report.html").read_text(encoding="utf-8")
    assert "Not in this run" in report and "mmsae index" in report
    with pytest.raises(MmsaeError, match="does not exist"):
        build_dashboard(DashboardConfig(run=str(tmp_path / "nope")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(MmsaeError, match="not a dashboard folder"):
        build_dashboard(DashboardConfig(run=str(run), out=str(other)))
    assert (other / "precious.txt").read_text() == "keep me"


def test_scales_to_100k_features_in_chunks(tmp_path):
    run = tmp_path / "big"
    (run / "sae").mkdir(parents=True)
    n = 100_000
    write_json(run / "sae/cfg.json", {"d_in": 64, "num_latents": n, "k": 32})
    with open(run / "explanations.jsonl", "w") as f:
        for i in range(0, n, 2):
            f.write(json.dumps({"feature": i, "explanation": f"concept number {i}", "category": "object"}) + "\n")
    build_dashboard(DashboardConfig(run=str(run), max_features=30, chunk_size=2000))
    site = run / "site"
    _, meta = _load_data(site / "data/meta.js")
    assert meta["n_rows"] == n and meta["n_chunks"] == 50 and meta["n_feature_pages"] == 30
    chunks = sorted((site / "data/list").iterdir())
    assert len(chunks) == 50 and max(p.stat().st_size for p in chunks) < 200_000
    assert sum(1 for _ in (site / "data/f").rglob("*.js")) == 30
    assert (site / "index.html").stat().st_size < 5_000  # the page itself never grows with the features
    rows = [r for p in chunks for r in _load_data(p)[1]]
    assert sorted(r["f"] for r in rows) == list(range(n))


def test_serves_on_localhost(site):
    server = make_server(site, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as r:
            assert r.status == 200 and b"assets/app.js" in r.read()
    finally:
        server.shutdown()
        server.server_close()


def test_the_report_puts_an_sae_of_another_site_beside_this_one(tmp_path):
    run = make_run(tmp_path)
    sub = run / "vision-1"  # what `mmsae demo` writes for its vision-tower SAE: a run folder of its own
    (sub / "sae").mkdir(parents=True)
    write_json(sub / "sae" / "cfg.json", {"d_in": 8, "num_latents": 24, "k": 2, "architecture": "topk", "site": "vision:1"})
    ious = [0.5, 0.7, 0.9]
    append_jsonl(sub / "explanations.jsonl", [{"feature": f, "explanation": f"concept {f}", "concept": ["red", "disc", HOSTILE][f]}
                                              for f in range(3)])
    append_jsonl(sub / "scores.jsonl", [{"feature": f, "scorer": "iou", "baseline": b, "value": v if b == "none" else 0.02,
                                         "category": "colour", "details": {}}
                                        for f, v in enumerate(ious) for b in ("none", "shuffled")])
    write_json(sub / "steering" / "demo_steering.json", {"targets": [
        {"kind": "colour", "target": "red", "feature": 2, "success": 0.5}, {"kind": "shape", "target": "star", "feature": 1, "success": 1.0}]})
    build_dashboard(DashboardConfig(run=str(run)))
    report = (run / "site" / "report.html").read_text()
    section = report[report.index("Sites side by side"):]
    section = section[:section.index("</section>")]
    assert "lm:2 (this report)" in section and "../vision-1/site/report.html" in section and ">vision:1<" in section
    # the vision SAE's figures, computed by hand: mean IoU 0.7 of three features, the best one (#2), steering 75%
    assert "0.700 [" in section and "0.020" in section and "#2, IoU 0.900" in section
    assert "0.75" in section and "red 50%, star 100%" in section
    assert "<script>window.pwned" not in section  # the best concept is a hostile string, escaped
    # the main run's own column: its IoU mean over six features is 0.35
    assert "0.350 [" in section
