"""SAE evaluation: reconstruction metrics and the spliced-in loss, checked on SAEs whose answers are known."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mmsae.errors import MmsaeError
from mmsae.sae import SaeConfig, SparseAutoencoder
from mmsae.evaluate import EvaluateConfig, evaluate
from tiny_models import tiny_adapter, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def exact_sae(d: int, layer: int | None = 1, k: int | None = None) -> SparseAutoencoder:
    """Latents relu(x) and relu(-x) with decoder rows +e_i and -e_i: reconstructs any x exactly
    (k = d); with k = 1 it keeps each token's largest coordinate by magnitude."""
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=2 * d, k=k or d, layer=layer))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int) -> SparseAutoencoder:
    sae = exact_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def test_spliced_loss_of_an_exact_and_of_a_zero_sae(tmp_path):
    d = tiny_adapter("llava").hidden_size
    exact_sae(d).save(tmp_path / "exact")
    zero_sae(d).save(tmp_path / "zero")
    common = dict(model=tiny_model("llava"), data="shapes:3", max_samples=3, batch_size=2, progress=False)
    exact = evaluate(EvaluateConfig(sae=str(tmp_path / "exact"), out=str(tmp_path / "e"), **common))
    zero = evaluate(EvaluateConfig(sae=str(tmp_path / "zero"), out=str(tmp_path / "z"), **common))
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["spliced"]["targets"] == exact["spliced"]["targets"] > 0
    for where in ("image", "text", "all"):
        e, z = exact["spliced"][where], zero["spliced"][where]
        assert abs(e["ce_increase"]) < 1e-4 and e["kl_sae"] < 1e-5, (where, e)
        # an SAE that outputs zeros is exactly zero-ablation
        assert z["ce_sae"] == pytest.approx(z["ce_zero_ablation"], abs=1e-5)
        assert z["kl_sae"] == pytest.approx(z["kl_zero_ablation"], abs=1e-5)
        if abs(e["ce_zero_ablation"] - exact["spliced"]["ce_clean"]) > 1e-3:
            assert e["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
            assert z["ce_recovered"] == pytest.approx(0.0, abs=1e-3)
    # zero-ablating every position changes the loss more than zero-ablating only the images
    assert zero["spliced"]["all"]["kl_zero_ablation"] > 0
    recon = exact["reconstruction"]
    assert recon["image"]["tokens"] > 0 and recon["text"]["tokens"] > 0
    assert recon["all"]["tokens"] == recon["image"]["tokens"] + recon["text"]["tokens"]
    assert recon["all"]["fvu"] < 1e-8 and recon["all"]["explained_variance"] > 1 - 1e-8


def test_spliced_loss_at_a_vision_site_against_a_hand_made_splice(tmp_path):
    """A vision:0 SAE: the exact one changes nothing, the zero one is zero-ablation of the patch
    rows, which is computed here by hand (CLS rows untouched) from the model's own logits."""
    from mmsae.data.sources import open_source
    from mmsae.hooks import edit

    adapter = tiny_adapter("llava")  # its projector reads block 0's output: vision:0 feeds the answer
    d = adapter.vision_width()
    for name, sae in (("exact", exact_sae(d, layer=None)), ("zero", zero_sae(d))):
        sae.cfg.site, sae.cfg.layer = "vision:0", None
        sae.save(tmp_path / name)
    common = dict(model=tiny_model("llava"), data="shapes:3", max_samples=3, batch_size=3, progress=False)
    exact = evaluate(EvaluateConfig(sae=str(tmp_path / "exact"), out=str(tmp_path / "e"), **common))
    zero = evaluate(EvaluateConfig(sae=str(tmp_path / "zero"), out=str(tmp_path / "z"), **common))
    assert set(exact["spliced"]) >= {"image", "all"} and "text" not in exact["spliced"]
    assert abs(exact["spliced"]["image"]["ce_increase"]) < 1e-4 and exact["spliced"]["image"]["kl_sae"] < 1e-5
    assert exact["reconstruction"]["image"]["fvu"] < 1e-8 and "text" not in exact["reconstruction"]
    # by hand: zero the tower's patch rows (not CLS) at block 0, next-token loss on the text positions
    samples = list(open_source("shapes:3").samples(stop=3))
    inputs = adapter.build_inputs([s.image for s in samples], [s.text for s in samples])
    rows = adapter.site_rows("vision:0", inputs)

    def zero_patches(hidden):
        flat = hidden.reshape(-1, hidden.shape[-1]).clone()
        flat[rows.index] = 0
        return flat.reshape(hidden.shape)

    def loss(logits):
        ids, targets = inputs.input_ids, torch.zeros_like(inputs.input_ids, dtype=torch.bool)
        for b, layout in enumerate(inputs.layouts):
            targets[b, layout.text_positions] = True
        targets[:, 0] = False
        logp = logits[:, :-1].float().log_softmax(-1)[targets[:, 1:]]
        return float(-logp.gather(-1, ids[:, 1:][targets[:, 1:]][:, None]).mean())

    with torch.no_grad(), edit(adapter.site_module("vision:0"), zero_patches):
        ce_zero = loss(adapter.model(**inputs.inputs, use_cache=False).logits)
    with torch.no_grad():
        ce_clean = loss(adapter.model(**inputs.inputs, use_cache=False).logits)
    for result in (zero, exact):
        assert result["spliced"]["image"]["ce_zero_ablation"] == pytest.approx(ce_zero, abs=1e-5)
        assert result["spliced"]["ce_clean"] == pytest.approx(ce_clean, abs=1e-5)
    assert zero["spliced"]["image"]["ce_sae"] == pytest.approx(ce_zero, abs=1e-5) and abs(ce_zero - ce_clean) > 1e-3
    assert zero["spliced"]["all"] == zero["spliced"]["image"]


def test_several_saes_in_one_call_equal_separate_calls(tmp_path):
    adapter = tiny_adapter("llava")
    lm, vision = exact_sae(adapter.hidden_size, layer=1, k=1), zero_sae(adapter.vision_width())
    vision.cfg.site, vision.cfg.layer = "vision:0", None
    lm.save(tmp_path / "lm")
    vision.save(tmp_path / "vision")
    common = dict(model=tiny_model("llava"), data="shapes:3", max_samples=3, batch_size=2, progress=False)
    both = evaluate(EvaluateConfig(sae=[str(tmp_path / "lm"), str(tmp_path / "vision")], out=str(tmp_path / "both"), **common))
    alone = [evaluate(EvaluateConfig(sae=str(tmp_path / name), out=str(tmp_path / f"{name}.json"), **common))
             for name in ("lm", "vision")]
    assert [m["site"] for m in both] == ["lm:1", "vision:0"]
    assert both == alone
    for name, metrics in zip(("lm-1", "vision-0"), both):
        assert json.loads((tmp_path / "both" / name / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    with pytest.raises(MmsaeError, match="give each SAE once"):
        evaluate(EvaluateConfig(sae=[str(tmp_path / "lm")] * 2, out=str(tmp_path / "x"), **common))
    with pytest.raises(MmsaeError, match="share the model's forward pass"):
        evaluate(EvaluateConfig(sae=[str(tmp_path / "lm"), str(tmp_path / "vision")], activations=str(tmp_path), out=str(tmp_path / "y")))


def write_store(path, acts: torch.Tensor, is_image: torch.Tensor) -> None:
    path.mkdir(parents=True)
    n = len(acts)
    save_file({"acts": acts, "sample": torch.arange(n), "pos": torch.zeros(n, dtype=torch.int32), "is_image": is_image,
               "tile": torch.zeros(n, dtype=torch.int16), "row": torch.zeros(n, dtype=torch.int16),
               "col": torch.zeros(n, dtype=torch.int16)}, str(path / "shard-0-00000.safetensors"))
    manifest = {"format": "mmsae-activations", "version": 1, "model": "m", "layer": 1, "hook_point": "h", "d": acts.shape[1],
                "dtype": "float32", "source": "s", "tokens": "all", "world": 1, "complete": True,
                "shards": [{"file": "shard-0-00000.safetensors", "rank": 0, "n_tokens": n, "n_image_tokens": int(is_image.sum()),
                            "first_sample": 0, "last_sample": n - 1, "norm_sum": 0.0}],
                "ranks": {"0": {"samples_done": n}}, "stats": {"n_tokens": n, "mean_norm": 1.0}, "config": {"data": "s"}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_store_metrics_match_hand_computed_values(tmp_path):
    """A 1-sparse SAE on 4-d data: FVU, L0, dead and dense fractions computed by hand."""
    torch.manual_seed(0)
    d = 4
    acts = torch.randn(300, d)
    is_image = torch.arange(300) % 3 == 0
    write_store(tmp_path / "store", acts, is_image)
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=8, k=1))
    eye = torch.eye(d)
    with torch.no_grad():  # latents 0-3: +e_i, 4-7: -e_i; a -100 bias keeps latent 7 dead
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0, -100.0]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    sae.save(tmp_path / "sae")
    metrics = evaluate(EvaluateConfig(sae=str(tmp_path / "sae"), activations=str(tmp_path / "store"), out=str(tmp_path / "m.json"), progress=False))
    assert (tmp_path / "m.json").exists()
    for kind, mask in (("all", torch.ones(300, dtype=torch.bool)), ("image", is_image), ("text", ~is_image)):
        x = acts[mask]
        pre = torch.cat([x, -x], dim=1) + sae.encoder.bias
        top = pre.topk(1, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        recon = z @ torch.cat([eye, -eye])
        fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        freq = (z > 0).double().mean(0)
        got = metrics["reconstruction"][kind]
        assert got["tokens"] == int(mask.sum())
        assert got["fvu"] == pytest.approx(fvu, rel=1e-5)
        assert got["l0"] == pytest.approx(float((z > 0).sum(1).double().mean()))
        assert got["dead_fraction"] == pytest.approx(float((freq == 0).double().mean()))
        assert got["dense_fraction"] == pytest.approx(float((freq > 0.1).double().mean()))
        assert sum(got["density_histogram"]["counts"]) + got["density_histogram"]["dead"] == 8
    assert metrics["reconstruction"]["all"]["dead_fraction"] >= 1 / 8  # latent 7


def test_bad_input(tmp_path):
    exact_sae(5).save(tmp_path / "sae")
    write_store(tmp_path / "store", torch.randn(10, 4), torch.zeros(10, dtype=torch.bool))
    with pytest.raises(MmsaeError, match="width 4 but the SAE expects d_in=5"):
        evaluate(EvaluateConfig(sae=str(tmp_path / "sae"), activations=str(tmp_path / "store"), out=str(tmp_path), progress=False))
    with pytest.raises(MmsaeError, match="--activations STORE, or --model and --data"):
        evaluate(EvaluateConfig(sae=str(tmp_path / "sae"), out=str(tmp_path)))
    with pytest.raises(MmsaeError, match="width"):
        evaluate(EvaluateConfig(sae=str(tmp_path / "sae"), model=tiny_model("llava"), data="shapes:1", out=str(tmp_path), progress=False))
