"""Pach et al.'s monosemanticity score: the formula, the shuffled baseline, the image encoders, score()."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.errors import MmsaeError
from mmsae.index import FeatureIndex, IndexWriter
from mmsae.io import read_jsonl
from mmsae.score import ScoreConfig, score
from mmsae.score.monosemanticity import ImageEncoder, minmax, monosemanticity, shuffled_assignments

from test_score_pipeline import grid_layout


def reference_ms(activations, embeddings):
    """The definition in plain float64 Python: min-max (min 0, max over the images), then
    sum_{n<m} w_n w_m cos(n, m) / sum_{n<m} w_n w_m."""
    top = max(activations)
    w = [a / top for a in activations]

    def cos(u, v):
        dot = sum(x * y for x, y in zip(u, v))
        return dot / math.sqrt(sum(x * x for x in u)) / math.sqrt(sum(y * y for y in v))

    num = den = 0.0
    for n, m in itertools.combinations(range(len(w)), 2):
        num += w[n] * w[m] * cos(embeddings[n], embeddings[m])
        den += w[n] * w[m]
    return num / den


def test_formula_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    for n, d in [(2, 3), (4, 5), (7, 2)]:
        acts = rng.uniform(0.1, 5.0, n)
        emb = rng.normal(size=(n, d)).astype(np.float32)
        expected = reference_ms(acts.tolist(), emb.astype(np.float64).tolist())
        assert monosemanticity(minmax(acts), emb) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # scaling is min-max with the minimum 0: the top image weighs 1, the others their fraction of it
    assert minmax([2.0, 1.0, 0.5]).tolist() == [1.0, 0.5, 0.25]
    assert minmax([3.0, 2.0], low=1.0).tolist() == [1.0, 0.5]


def test_identical_images_score_one_and_orthogonal_ones_zero():
    rng = np.random.default_rng(1)
    weights = minmax(rng.uniform(0.5, 2.0, 5))
    same = np.tile(rng.normal(size=(1, 8)), (5, 1))
    assert monosemanticity(weights, same) == pytest.approx(1.0, abs=1e-12)
    assert monosemanticity(weights, np.eye(5) * 3.0) == pytest.approx(0.0, abs=1e-12)
    # with equal weights MS is the plain mean pairwise similarity (the encoder's baseline on these images)
    emb = rng.normal(size=(4, 6))
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    pairs = [float(e[i] @ e[j]) for i, j in itertools.combinations(range(4), 2)]
    assert monosemanticity([1.0] * 4, emb) == pytest.approx(np.mean(pairs), abs=1e-12)
    # undefined: one image, or no weight on any pair
    assert math.isnan(monosemanticity([1.0], emb[:1]))
    assert math.isnan(monosemanticity([1.0, 0.0, 0.0], emb[:3]))


def test_shuffled_baseline_deals_out_the_same_images():
    sets = {f: [(10 * f + i, 1.0 - 0.1 * i) for i in range(4)] for f in range(6)}
    shuffled = shuffled_assignments(sets, seed=0)
    assert shuffled == shuffled_assignments(sets, seed=0)  # seeded
    assert shuffled != shuffled_assignments(sets, seed=1)
    assert set(shuffled) == set(sets) and all(len(shuffled[f]) == 4 for f in sets)
    # the same (image, weight) pairs, each used once, under other features
    assert sorted(p for ps in shuffled.values() for p in ps) == sorted(p for ps in sets.values() for p in ps)
    assert any(shuffled[f] != sets[f] for f in sets)
    # an image dealt twice to one feature counts once, with its larger weight
    dup = shuffled_assignments({0: [(1, 0.2), (1, 0.9)]}, seed=0)
    assert dup == {0: [(1, 0.9)]}


# --- image encoders, built from configs and loaded by path like a hub id -------------------------


def _tiny_dinov2(folder, processor=True):
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             image_size=28, patch_size=14)).save_pretrained(folder)
    if processor:
        BitImageProcessorPil(size={"height": 28, "width": 28}, do_center_crop=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    return _tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def _noise_images(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_vision_encoder_embeds_with_the_pooler_output_once_per_image(tiny_dinov2):
    from transformers import AutoImageProcessor, Dinov2Model

    images = _noise_images(3)
    encoder = ImageEncoder(str(tiny_dinov2), batch_size=2)
    calls = []
    encoder.model.register_forward_hook(lambda *_: calls.append(1))
    emb = encoder.embed_samples([0, 1, 2, 1], images.__getitem__)
    assert emb.shape == (4, 16) and np.array_equal(emb[1], emb[3]) and len(calls) == 2  # 3 images, batches of 2
    encoder.embed_samples([2, 0], images.__getitem__)
    assert len(calls) == 2  # cached
    # independent: the model's pooled output (DINOv2: the normalised CLS token) on the processor's pixels
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_dinov2)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_allclose(emb[:3], expected, atol=1e-5)


def test_dual_encoder_uses_its_image_embedding(tmp_path):
    from test_score_models import build_tiny_clip
    from transformers import CLIPModel, CLIPProcessor

    folder = build_tiny_clip(tmp_path / "clip")
    images = _noise_images(2)
    emb = ImageEncoder(str(folder)).embed(images)
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert emb.shape == (2, 16)  # the projection, not the 32-wide vision tower
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)


def test_bad_encoders_are_one_line_errors_naming_the_option(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path / "llama")
    _tiny_dinov2(tmp_path / "no_processor", processor=False)
    for folder, says in [(tmp_path / "llama", "llama model, not an image encoder"),
                         (tmp_path / "missing", "cannot read a model config"),
                         (tmp_path / "no_processor", "image processor")]:
        with pytest.raises(MmsaeError, match="--ms-model") as err:
            ImageEncoder(str(folder))
        assert says in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MmsaeError, match="--ms-top"):  # MS needs a pair of images
        ScoreConfig(ms_top=1)


def test_demo_vision_folder_loads_as_an_encoder(tmp_path):
    """The demo build's converted tower (here a tiny stand-in already cached) gets its processor and
    loads through the same path as a hub id; images are squashed to 224 px, not centre-cropped."""
    from mmsae.demo.build import build_vision

    _tiny_dinov2(tmp_path / "stages" / "vision", processor=False)
    folder = build_vision(tmp_path / "stages", progress=False)
    encoder = ImageEncoder(str(folder))
    pixels = encoder.processor(images=_noise_images(1, size=30), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert encoder.embed(_noise_images(2)).shape == (2, 16)


# --- score() end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ms_run(tmp_path_factory):
    """Feature 0 fires on four copies of one image, features 1-3 on unrelated noise images."""
    root = tmp_path_factory.mktemp("ms_run")
    writer = IndexWriter(root / "index", num_latents=4, top_n=4)
    layout = grid_layout()
    same = _noise_images(1, seed=99, size=64)[0]
    noise = _noise_images(12, seed=5, size=64)
    rng = np.random.default_rng(0)
    for i in range(4):
        writer.add_sample(i, same, layout)
        writer.add_example(0, i, rng.uniform(0, 1 + i, 64).astype(np.float32))
    for j, image in enumerate(noise):
        sid = 4 + j
        writer.add_sample(sid, image, layout)
        writer.add_example(1 + j // 4, sid, rng.uniform(0, 1 + j, 64).astype(np.float32))
    writer.finish()
    rows = [{"feature": f, "explanation": f"thing {f}", "concept": f"thing {f}", "category": "object"} for f in range(4)]
    (root / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_score_writes_ms_per_feature_and_in_the_table(ms_run, tiny_dinov2, tmp_path):
    from transformers import AutoImageProcessor, Dinov2Model

    out = tmp_path / "out"
    summary = score(ScoreConfig(run=str(ms_run), out=str(out), scorers=["monosemanticity"],
                                ms_model=str(tiny_dinov2), n_boot=50))
    rows = {(r["feature"], r["baseline"]): r for r in read_jsonl(out / "scores.jsonl")}
    assert set(rows) == {(f, b) for f in range(4) for b in ("none", "shuffled")}
    assert all(r["scorer"] == "monosemanticity" for r in rows.values())

    # independent expectation: the model's pooled embeddings of the index's images, the definition in plain Python
    index = FeatureIndex(ms_run / "index")
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_dinov2)
    for f in range(4):
        top = index.top_examples(f)
        with torch.no_grad():
            emb = model(**processor(images=[index.image(e.sample_id) for e in top], return_tensors="pt")).pooler_output
        expected = reference_ms([e.score for e in top], emb.double().tolist())
        row = rows[(f, "none")]
        assert row["value"] == pytest.approx(expected, abs=1e-5)
        assert row["details"]["sample_ids"] == [e.sample_id for e in top]
        assert row["details"]["weights"][0] == 1.0 and row["details"]["model"] == str(tiny_dinov2)
    assert rows[(0, "none")]["value"] == pytest.approx(1.0, abs=1e-5)  # one image, four times
    assert max(rows[(f, "none")]["value"] for f in (1, 2, 3)) < 1 - 1e-4

    # the baseline deals out the same images: every shuffled set comes from the pool of top images
    pool = {s for f in range(4) for s in rows[(f, "none")]["details"]["sample_ids"]}
    dealt = [s for f in range(4) for s in rows[(f, "shuffled")]["details"]["sample_ids"]]
    assert set(dealt) <= pool and len(dealt) >= 12 and "explanation_of" not in rows[(0, "shuffled")]["details"]
    total = {s["baseline"]: s for s in summary if s["category"] == "total" and s["scorer"] == "monosemanticity"}
    assert total["none"]["mean"] == pytest.approx(np.mean([rows[(f, "none")]["value"] for f in range(4)]))
    table = (out / "scores.md").read_text()
    assert "| MS | MS shuffled latents |" in table and f"MS encoder {tiny_dinov2}" in table
    assert (out / "scores.csv").read_text().count("monosemanticity") == 4  # object and total, two baselines


def test_report_shows_ms_beside_iou(tmp_path):
    """The run report's paper table and the feature list put MS next to IoU and name the encoder."""
    from mmsae.io import append_jsonl
    from mmsae.report import DashboardConfig, build_dashboard
    from test_report import _load_data, make_run

    run = make_run(tmp_path)
    append_jsonl(run / "scores.jsonl", [
        {"feature": f, "scorer": "monosemanticity", "baseline": b, "value": v, "category": "object",
         "details": {"model": "enc-<x>", "sample_ids": [0, 1], "weights": [1.0, 0.5]}}
        for f in range(6) for b, v in (("none", 0.8), ("shuffled", 0.5))])
    build_dashboard(DashboardConfig(run=str(run)))
    _, meta = _load_data(run / "site/data/meta.js")
    assert meta["scorers"] == ["iou", "monosemanticity", "clip"]
    report = (run / "site/report.html").read_text(encoding="utf-8")
    table = report[report.index("<table class='rows paper'>"):]
    assert "<th>IoU random img</th><th>MS</th><th>MS shuffled latents</th><th>CLIP ours</th>" in table
    assert "image encoder enc-&lt;x&gt;" in report and "own vision tower" in report
    _, detail = _load_data(run / "site/data/f/000/1.js")
    assert [r["scorer"] for r in detail["scores"]][:4] == ["iou", "iou", "monosemanticity", "monosemanticity"]
