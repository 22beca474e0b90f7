"""Attribution: activation x gradient against finite differences (float64), the ablation check, the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.attribute import (AttributeConfig, ablation_effects, attribute, attribute_answer, build_objective,
                             correlation)
from mmsae.errors import MmsaeError
from mmsae.hooks import edit
from mmsae.models import load_adapter
from mmsae.sae import SaeConfig, SparseAutoencoder
from tiny_models import tiny_adapter, tiny_model

LAYER = 1


def make_sae(adapter, dtype=torch.float32, seed=0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=96, k=8, layer=LAYER,
                                      hook_point=adapter.hook_point(LAYER)), dtype=dtype)
    with torch.no_grad():
        sae.encoder.weight.mul_(3.0)
        sae.b_dec.normal_(0, 0.1)
    return sae


def image(seed=0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(36, 44, 3) * 255).astype("uint8"))


def rms_norm_keeping_float64(self, hidden_states):
    """Llama's RMSNorm, but computed in float64 when the model is (the stock one drops to float32)."""
    x = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


@pytest.fixture(scope="module")
def adapter64():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    adapter = load_adapter(tiny_model("llava"))
    adapter.model.to(torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlamaRMSNorm, "forward", rms_norm_keeping_float64)
        yield adapter


def objective_with_latent_shift(adapter, sae, objective, t, f, eps):
    """The objective with latent f at position t moved by eps (a plain edit of x along W_dec[f])."""
    def fn(x):
        x = x.clone()
        x[0, t] += eps * sae.W_dec[f].to(x.dtype)
        return x

    with torch.no_grad(), edit(adapter.layer_module(LAYER), fn):
        return float(objective(adapter.model(**objective.inputs.inputs).logits)[0])


@pytest.mark.parametrize("contrast", [None, "b"])
def test_attribution_matches_finite_differences(adapter64, contrast):
    sae = make_sae(adapter64, torch.float64)
    objective = build_objective(adapter64, image(), "what colour is it?", "red", contrast)
    att = attribute_answer(adapter64, sae, objective)
    # the error term is kept: the objective equals the clean model's
    with torch.no_grad():
        clean = float(objective(adapter64.model(**objective.inputs.inputs).logits)[0])
    assert att.objective == pytest.approx(clean, abs=1e-10)
    image_pos = objective.inputs.layouts[0].positions
    last = int(objective.answer_positions[0]) - 1
    picks = [(int(image_pos[2]), 0), (int(image_pos[-1]), 3), (last, 0), (last - 2, 5)]
    eps = 1e-5
    for t, j in picks:
        f, a = int(att.indices[t, j]), float(att.values[t, j])
        up = objective_with_latent_shift(adapter64, sae, objective, t, f, eps)
        down = objective_with_latent_shift(adapter64, sae, objective, t, f, -eps)
        fd = a * (up - down) / (2 * eps)
        assert float(att.scores[t, j]) == pytest.approx(fd, rel=1e-6, abs=1e-10)
    # positions after the last predicting one cannot influence the objective
    assert att.scores[int(objective.answer_positions[-1]):].abs().max() == 0
    assert att.scores[int(objective.answer_positions[-1]) - 1].abs().max() > 0


def test_manual_logit_difference(adapter64):
    objective = build_objective(adapter64, image(), "what colour?", "red", "blue")
    with torch.no_grad():
        logits = adapter64.model(**objective.inputs.inputs).logits[0]
    t = int(objective.answer_positions[0])
    tok = adapter64.tokenizer
    red, blue = tok("red", add_special_tokens=False)["input_ids"][0], tok("blue", add_special_tokens=False)["input_ids"][0]
    expected = logits[t - 1, red] - logits[t - 1, blue]
    assert float(objective(logits[None])[0]) == pytest.approx(float(expected), abs=1e-10)


def test_ablation_estimates_track_real_effects():
    adapter = tiny_adapter("llava")
    sae = make_sae(adapter)
    with torch.no_grad():  # small decoder rows: zeroing a feature is a small step, where first order holds
        sae.W_dec.mul_(0.01)
    objective = build_objective(adapter, image(1), "what colour is the star?", "red")
    att = attribute_answer(adapter, sae, objective)
    totals = att.feature_totals()
    top = totals.abs().argsort(descending=True)[:8].tolist()
    real = ablation_effects(adapter, sae, objective, top, batch_size=3)
    # one at a time, through a plain edit that zeroes the feature (error term kept)
    for f, r in zip(top[:2], real[:2]):
        def zero(x, f=f):
            values, indices = sae.encode_sparse(x)
            a = (values * (indices == f)).sum(-1, keepdim=True)
            return x - a * sae.W_dec[f]

        with torch.no_grad(), edit(adapter.layer_module(LAYER), zero):
            ablated = float(objective(adapter.model(**objective.inputs.inputs).logits)[0])
        assert r == pytest.approx(ablated - att.objective, abs=1e-4)
    c = correlation([-float(totals[f]) for f in top], real)
    assert c["n"] == 8 and c["pearson"] > 0.99, c


def test_correlation_by_hand():
    c = correlation([1, 2, 3, 4], [2, 4, 6, 8.5])
    assert c["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [2, 4, 6, 8.5])[0, 1])
    assert c["spearman"] == pytest.approx(1.0)
    assert correlation([1.0], [2.0])["pearson"] is None


def test_stage_writes_report_and_heatmaps(tmp_path):
    adapter = tiny_adapter("llava")
    make_sae(adapter).save(tmp_path / "sae")
    image(2).save(tmp_path / "img.png")
    cfg = AttributeConfig(model=tiny_model("llava"), sae=str(tmp_path / "sae"), prompt="what colour is the star?",
                          answer="red", contrast="blue", image=str(tmp_path / "img.png"), out=str(tmp_path / "out"),
                          top=6, check=4)
    result = attribute(cfg)
    saved = json.loads((tmp_path / "out" / "attribution.json").read_text())
    assert saved["objective_kind"] == "logit_difference" and len(saved["top_features"]) == 6
    assert saved["ablation_check"]["n"] == 4
    assert len(saved["image_patches"]) == 16  # the tiny LLaVA's 4 x 4 patch grid
    assert result["top_features"] == saved["top_features"]
    for row in saved["top_features"]:  # every position is an image patch or a text token (batch 1: no padding)
        assert row["image"] + row["text"] == pytest.approx(row["attribution"], abs=1e-6)
    assert (tmp_path / "out" / "attribution_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert all((tmp_path / "out" / name).exists() for name in saved["heatmaps"].values())


def test_bad_input_is_one_line_error(tmp_path):
    adapter = tiny_adapter("llava")
    for answer, contrast in [("", None), ("red", "red"), ("red", "rose"), ("red", " ")]:
        with pytest.raises(MmsaeError) as err:
            build_objective(adapter, image(), "what colour?", answer, contrast)
        assert "\n" not in str(err.value)
    bad = SparseAutoencoder(SaeConfig(d_in=16, num_latents=32, k=4, layer=LAYER, hook_point=adapter.hook_point(LAYER)))
    objective = build_objective(adapter, image(), "what colour?", "red")
    with pytest.raises(MmsaeError, match="d_in=16"):
        attribute_answer(adapter, bad, objective)
    other = SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=32, k=4, layer=LAYER,
                                        hook_point="vision_tower.layers.1"))
    with pytest.raises(MmsaeError, match="hook point"):
        attribute_answer(adapter, other, objective)


def test_demo_steering_writes_its_findings(tmp_path):
    from mmsae.demo.steering import _mentions, demo_steering

    adapter = tiny_adapter("llava")
    summary = demo_steering(adapter, make_sae(adapter), tmp_path, n_images=3, targets={"colour": ("red",)}, n_find=1,
                            candidates=1, multiples=(4.0,), spans=("image",), n_validate=2, max_new_tokens=3)
    saved = json.loads((tmp_path / "steering" / "demo_steering.json").read_text())
    assert saved == summary and len(saved["targets"]) == 1
    target = saved["targets"][0]
    assert target["target"] == "red" and target["n"] == 3 and target["span"] == "image"
    rows = [json.loads(line) for line in (tmp_path / "steering" / "steering.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["true_answer"] != "red" for r in rows)  # held-out scenes that are not red
    assert target["success"] == sum(_mentions(r["steered"], "red") for r in rows) / 3
    assert all((tmp_path / "steering" / r["image"]).exists() for r in rows)
    att = json.loads((tmp_path / "attribution" / "attribution.json").read_text())
    assert att["answer"] == "red" and att["objective_kind"] == "logit_difference"
    assert (tmp_path / "attribution" / att["heatmaps"]["all"]).exists()
