"""The intervention layer at every kind of site: exact no-ops, edits that land on the right rows,
vision and projector steering that changes the answer, latents per token with their layout,
attribution and ablation away from the language model, and several SAEs in one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mmsae
from mmsae.attribute import ablation_effects, attribute_answer, build_objective
from mmsae.errors import MmsaeError
from mmsae.hooks import capture, run_sites
from mmsae.intervene import Intervention, generate_inputs, run_with_saes, spliced
from mmsae.models.sites import Site
from mmsae.sae import SaeConfig, SparseAutoencoder
from tiny_models import FAMILIES, family_params, tiny_adapter

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

VISION = [f for f in FAMILIES if f != "llama"]


def make_sae(adapter, site: str, seed: int = 0, num_latents: int = 64, k: int = 6) -> SparseAutoencoder:
    torch.manual_seed(seed)
    site = adapter.resolve_site(site)
    sae = SparseAutoencoder(SaeConfig(d_in=adapter.site_width(site), num_latents=num_latents, k=k, site=str(site)))
    with torch.no_grad():  # a non-trivial error term: the reconstruction is not the input
        sae.encoder.weight.mul_(3.0)
        sae.b_dec.normal_(0, 0.1)
    return sae.to(adapter.device).eval()


def picture(seed: int, size=(40, 32)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def two_images(adapter):
    return adapter.build_inputs([picture(0), picture(1, (28, 44))], ["hi", "what is in the picture?"])


def logits(adapter, inputs, saes=None) -> torch.Tensor:
    with torch.no_grad(), mmsae.intervene.attached(adapter, saes or {}, inputs):
        return adapter.model(**inputs.inputs, use_cache=False).logits


def strongest_feature(adapter, sae, site, inputs) -> tuple[int, float]:
    """A feature that fires on the batch's image patches, and its largest activation there."""
    act = run_sites(adapter, [site], inputs)[adapter.resolve_site(site)]
    x = adapter.site_rows(site, inputs).take(act)
    with torch.no_grad():
        dense = sae.encode(x.float())
    f = int(dense.amax(0).argmax())
    return f, float(dense[:, f].max())


@pytest.mark.parametrize("family", family_params(VISION))
@pytest.mark.parametrize("site", ["vision:0", "projector"])
def test_image_sites_steer_the_answer_and_a_no_op_changes_nothing(family, site):
    adapter = tiny_adapter(family)
    sae = make_sae(adapter, site)
    inputs = two_images(adapter)
    clean = logits(adapter, inputs)
    f, top = strongest_feature(adapter, sae, site, inputs)
    # no edit, an add of 0, a scale by 1: the SAE is spliced in but the model is exactly the clean one
    for ivs in ([], [Intervention(f, 0.0, "add")], [Intervention(f, 1.0, "scale")]):
        torch.testing.assert_close(logits(adapter, inputs, {sae: ivs}), clean, rtol=0, atol=1e-5)
    # clamping the feature on the image patches changes what the language model reads, so the answer
    steered = logits(adapter, inputs, {sae: [Intervention(f, 20 * top + 20, "clamp")]})
    assert (steered[:, -1] - clean[:, -1]).abs().max() > 1e-3
    assert not torch.equal(steered[:, -1].argmax(-1), clean[:, -1].argmax(-1)) or (steered - clean).abs().max() > 1e-2


def test_a_vision_edit_touches_only_patch_rows_and_equals_the_dense_reference():
    adapter = tiny_adapter("llava")  # CLIP tower: one CLS row per image
    site = adapter.resolve_site("vision:0")
    sae = make_sae(adapter, "vision:0")
    inputs = two_images(adapter)
    rows = adapter.site_rows(site, inputs, include_special=True)
    module = adapter.site_module(site)
    with torch.no_grad(), capture(module) as clean:
        adapter.model(**inputs.inputs, use_cache=False)
    ivs = [Intervention(3, 4.0, "clamp"), Intervention(9, 1.5, "add"), Intervention(11, 0.5, "scale")]
    with torch.no_grad(), spliced(adapter, sae, inputs, interventions=ivs):
        with capture(module) as edited:  # registered after the edit: it sees the edited output
            adapter.model(**inputs.inputs, use_cache=False)
    x = clean.outputs[0].reshape(-1, sae.cfg.d_in)
    got = edited.outputs[0].reshape(-1, sae.cfg.d_in)
    with torch.no_grad():  # x' = decode(edited latents) + (x - decode(latents)), with dense latents
        lat = sae.encode(x)
        new = lat.clone()
        new[:, 3] = 4.0
        new[:, 9] += 1.5
        new[:, 11] *= 0.5
        expected = sae.decode(new) + (x - sae.decode(lat))
    patch = rows.index[~rows.special]
    cls = rows.index[rows.special]
    assert len(cls) == 2 and len(patch) > 0
    torch.testing.assert_close(got[patch], expected[patch], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[cls], x[cls])  # CLS rows are no patch: never edited


def test_generate_steers_through_a_vision_sae_and_keeps_the_clean_model_without_edits():
    adapter = tiny_adapter("llava")  # its projector reads the tower's hidden_states[-2], block 0's output
    sae = make_sae(adapter, "vision:0")
    inputs = two_images(adapter)
    clean = generate_inputs(adapter, inputs, 5)
    assert generate_inputs(adapter, inputs, 5, {sae: []}).texts == clean.texts
    f, top = strongest_feature(adapter, sae, "vision:0", inputs)
    steered = generate_inputs(adapter, inputs, 5, {sae: [Intervention(f, 50 * top + 50, "clamp")]})
    assert steered.texts != clean.texts
    with pytest.raises(MmsaeError, match="holds image patches only"):
        generate_inputs(adapter, inputs, 2, {sae: [Intervention(f, 1.0)]}, span="text")


def test_run_with_saes_gives_latents_per_row_with_their_layout():
    adapter = tiny_adapter("llava")
    lm, vision = make_sae(adapter, "lm:1", seed=1), make_sae(adapter, "vision:1", seed=2)
    img = picture(4, (36, 30))
    run = mmsae.run_with_saes(adapter, [lm, vision], img, "Describe the image.")
    inputs = run.inputs
    captured = run_sites(adapter, ["lm:1", "vision:1"], inputs)
    with torch.no_grad():
        ref_logits = adapter.model(**inputs.inputs, use_cache=False).logits
    torch.testing.assert_close(run.logits, ref_logits, rtol=0, atol=1e-5)  # attached without edits: the clean model
    for sae, site in ((lm, Site.lm(1)), (vision, Site.vision(1))):
        got = run.latents[sae]
        assert run.latents[str(site)] is got and got.site == site
        x = captured[site].reshape(-1, sae.cfg.d_in)
        with torch.no_grad():
            dense = sae.encode(x)  # the reference: dense latents of the captured activation
        f = int(dense.amax(0).argmax())
        torch.testing.assert_close(got.feature(f), dense[:, f], rtol=1e-5, atol=1e-5)
        layout = got.layouts[0]
        torch.testing.assert_close(got.feature(f)[layout.positions], dense[layout.positions, f])
        heat = got.heatmap(f)
        assert heat.shape == (img.height, img.width) and heat.max() == pytest.approx(float(dense[layout.positions, f].max()), rel=1e-5)
        top = got.top_features(n=3)
        assert top[0][1] == pytest.approx(float(dense[layout.positions].max()), rel=1e-5)
    assert len(run.latents[lm].text_rows[0]) > 0 and len(run.latents[vision].text_rows[0]) == 0


def test_attribution_at_a_vision_site_matches_real_ablation_to_first_order():
    adapter = tiny_adapter("llava")
    sae = make_sae(adapter, "vision:0", num_latents=48, k=4)
    objective = build_objective(adapter, picture(5), "what colour?", "red")
    att = attribute_answer(adapter, sae, objective)
    rows = adapter.site_rows("vision:0", objective.inputs, include_special=True)
    assert att.site == "vision:0" and att.values.shape[0] == rows.num_rows
    assert torch.equal(att.image_rows, att.layout.positions) and len(att.text_rows) == 0
    totals = att.feature_totals()
    top = [int(f) for f in totals.abs().argsort(descending=True)[:3]]
    real = ablation_effects(adapter, sae, objective, top)
    assert max(abs(r) for r in real) > 1e-4  # the site feeds the answer
    # the ablation is a clamp to 0 at every row: compare with zeroing each feature by hand (dense)
    for f, effect in zip(top, real):
        def zero(hidden, f=f):
            x = hidden.reshape(-1, sae.cfg.d_in)
            lat = sae.encode(x)
            cut = lat.clone()
            cut[:, f] = 0
            return (x + sae.decode(cut) - sae.decode(lat)).reshape(hidden.shape)
        with torch.no_grad():
            clean = float(objective(adapter.model(**objective.inputs.inputs).logits)[0])
            with mmsae.hooks.edit(adapter.site_module("vision:0"), zero):
                cut = float(objective(adapter.model(**objective.inputs.inputs).logits)[0])
        assert effect == pytest.approx(cut - clean, rel=1e-4, abs=1e-5)


def test_bad_sites_and_spans_are_one_line_errors():
    adapter = tiny_adapter("llava")
    text_only = tiny_adapter("llama")
    sae = make_sae(adapter, "vision:1")
    cases = [
        (lambda: spliced(adapter, sae).__enter__(), "needs the batch's inputs"),
        (lambda: spliced(text_only, sae).__enter__(), "vision"),  # a text-only model has no vision:1
        (lambda: spliced(adapter, SparseAutoencoder(SaeConfig(d_in=7, num_latents=8, k=2, site="lm:1"))).__enter__(), "d_in=7"),
        (lambda: spliced(adapter, make_sae(adapter, "lm:1"), site="vision:1").__enter__(), "trained at lm:1"),
        (lambda: spliced(adapter, sae, two_images(adapter), span="generated").__enter__(), "image patches only"),
    ]
    for case, match in cases:
        with pytest.raises(MmsaeError, match=match) as err:
            case()
        assert "\n" not in str(err.value)
    # tiny LLaVA's projector reads hidden_states[-2], block 0's output: an edit at vision:1 would do nothing
    assert adapter.deepest_vision_block_read() == 0
    with pytest.raises(MmsaeError, match=r"vision:1 of .* comes after vision:0, the deepest block the language model reads"):
        spliced(adapter, sae, two_images(adapter), interventions=[Intervention(1, 5.0)]).__enter__()
    assert mmsae.run_with_saes(adapter, [sae], picture(0), "hi").latents[sae].values.numel() > 0  # reading it is fine
    # attached for one batch, run on another: the row count tells
    with pytest.raises(MmsaeError, match="attach it for the inputs being run"):
        with torch.no_grad(), spliced(adapter, make_sae(adapter, "vision:0"), adapter.build_inputs([picture(0)], ["hi"]),
                                      interventions=[Intervention(1, 1.0)]):
            adapter.model(**two_images(adapter).inputs, use_cache=False)
