"""Steering: exactness with no (or a no-op) intervention, spans, batching with padding, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.errors import MmsaeError
from mmsae.hooks import capture
from mmsae.sae import SaeConfig, SparseAutoencoder
from mmsae.intervene import Intervention, Rows, SaeSplice, generate_inputs, spliced
from mmsae.models.sites import Site
from mmsae.steer import SteerConfig, steer
from tiny_models import tiny_adapter, tiny_model

LAYER = 1


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter("llava")


def make_sae(adapter, seed: int = 0, d_in: int | None = None, hook_point: str | None = None) -> SparseAutoencoder:
    torch.manual_seed(seed)
    cfg = SaeConfig(d_in=d_in or adapter.hidden_size, num_latents=128, k=8, layer=LAYER,
                    hook_point=hook_point or adapter.hook_point(LAYER))
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():  # a non-trivial error term: the reconstruction is not the input
        sae.encoder.weight.mul_(3.0)
        sae.b_dec.normal_(0, 0.1)
    return sae


def image(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def batch(adapter):
    # different prompt lengths: the shorter one is left-padded
    return adapter.build_inputs([image(0), image(1)], ["hi", "what colour is the big star?"])


def scores(adapter, inputs, n=6, sae=None, ivs=(), span="all"):
    kwargs = dict(max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=adapter.tokenizer.pad_token_id)
    with torch.no_grad():
        if sae is None:
            out = adapter.model.generate(**inputs.inputs, **kwargs)
        else:
            with spliced(adapter, sae, inputs, interventions=ivs, span=span):
                out = adapter.model.generate(**inputs.inputs, **kwargs)
    return out.sequences, torch.stack(out.scores, 1)


def test_no_op_interventions_give_the_clean_model(adapter):
    sae = make_sae(adapter)
    inputs = batch(adapter)
    seq0, sc0 = scores(adapter, inputs)
    for ivs in ([], [Intervention(5, 0.0, "add")], [Intervention(5, 1.0, "scale"), Intervention(9, 1.0, "scale")]):
        seq, sc = scores(adapter, inputs, sae=sae, ivs=ivs)
        assert torch.equal(seq, seq0)
        torch.testing.assert_close(sc, sc0, rtol=0, atol=1e-5)
    # ...while a real intervention through the same path does change the output
    _, sc = scores(adapter, inputs, sae=sae, ivs=[Intervention(5, 30.0, "add")])
    assert (sc - sc0).abs().max() > 1e-2


def test_clamping_a_feature_to_its_own_value_changes_nothing(adapter):
    sae = make_sae(adapter)
    f = 7
    with torch.no_grad():  # feature 7 reads a constant: pre-activation 1000 at every position
        sae.encoder.weight[f] = 0.0
        sae.encoder.bias[f] = 1000.0
    inputs = batch(adapter)
    seq0, sc0 = scores(adapter, inputs)
    seq, sc = scores(adapter, inputs, sae=sae, ivs=[Intervention(f, 1000.0, "clamp")])
    assert torch.equal(seq, seq0)
    torch.testing.assert_close(sc, sc0, rtol=0, atol=1e-5)
    _, sc = scores(adapter, inputs, sae=sae, ivs=[Intervention(f, 1030.0, "clamp")])
    assert (sc - sc0).abs().max() > 1e-2


def test_edit_equals_decode_of_edited_latents_plus_error(adapter):
    """x' = decode(edited latents) + (x - decode(latents)), computed independently with dense latents."""
    sae = make_sae(adapter)
    inputs = batch(adapter)
    with torch.no_grad(), capture(adapter.layer_module(LAYER)) as rec:
        adapter.model(**inputs.inputs)
    x = rec.last
    ivs = [Intervention(3, 4.0, "clamp"), Intervention(11, 2.5, "add"), Intervention(20, 0.5, "scale")]
    edited = SaeSplice(sae, Site.lm(LAYER), Rows(), ivs)(x)
    with torch.no_grad():
        lat = sae.encode(x)
        new = lat.clone()
        new[..., 3] = 4.0
        new[..., 11] += 2.5
        new[..., 20] *= 0.5
        expected = sae.decode(new) + (x - sae.decode(lat))
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("span", ["image", "text", "prompt", "generated"])
def test_spans_edit_only_their_positions(adapter, span):
    sae = make_sae(adapter)
    inputs = batch(adapter)
    module = adapter.layer_module(LAYER)
    with torch.no_grad(), capture(module) as clean:
        adapter.model.generate(**inputs.inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # the steered prefill is compared with the clean prefill, position by position
    with torch.no_grad(), spliced(adapter, sae, inputs, interventions=[Intervention(5, 30.0, "add")], span=span):
        # hooks run in registration order: the capture sees the edited output
        with capture(module) as edited:
            adapter.model(**inputs.inputs)
    changed = (edited.last - clean.outputs[0]).abs().amax(-1) > 1e-6  # prefill positions [B, T]
    expected = torch.zeros_like(changed)  # the span's positions, from the layouts and the padding
    for b, layout in enumerate(inputs.layouts):
        if span == "prompt":
            expected[b] = inputs.attention_mask[b].bool()
        elif span in ("image", "text"):
            expected[b, layout.positions if span == "image" else layout.text_positions] = True
    assert torch.equal(changed, expected)
    if span == "image":
        assert changed.sum() == sum(len(lay.positions) for lay in inputs.layouts)


def test_decode_steps_are_steered_for_generated_span_only(adapter):
    sae = make_sae(adapter)
    inputs = batch(adapter)
    seq0, sc0 = scores(adapter, inputs)
    ivs = [Intervention(5, 30.0, "add")]
    _, sc_gen = scores(adapter, inputs, sae=sae, ivs=ivs, span="generated")
    torch.testing.assert_close(sc_gen[:, 0], sc0[:, 0], rtol=0, atol=0)  # prefill untouched
    assert (sc_gen[:, 1] - sc0[:, 1]).abs().max() > 1e-2  # decode steps steered
    _, sc_prompt = scores(adapter, inputs, sae=sae, ivs=ivs, span="prompt")
    assert (sc_prompt[:, 0] - sc0[:, 0]).abs().max() > 1e-2


def test_batch_with_padding_matches_each_prompt_alone(adapter):
    sae = make_sae(adapter)
    prompts, images = ["hi", "what colour is the big star?"], [image(0), image(1)]
    ivs = [Intervention(5, 8.0, "add"), Intervention(9, 3.0, "clamp")]
    both = adapter.build_inputs(images, prompts)
    assert both.inputs["attention_mask"][0, 0] == 0  # the short prompt really is padded
    seq_b, sc_b = scores(adapter, both, sae=sae, ivs=ivs, span="text")
    prompt_len = both.inputs["input_ids"].shape[1]
    for i in range(2):
        one = adapter.build_inputs([images[i]], [prompts[i]])
        seq_1, sc_1 = scores(adapter, one, sae=sae, ivs=ivs, span="text")
        assert torch.equal(seq_b[i, prompt_len:], seq_1[0, one.inputs["input_ids"].shape[1]:])
        torch.testing.assert_close(sc_b[i], sc_1[0], rtol=1e-4, atol=1e-4)


def test_generate_helper_and_stage_write_rows_and_sweep(adapter, tmp_path, capsys):
    sae = make_sae(adapter)
    sae_dir = tmp_path / "sae"
    sae.save(sae_dir)
    img = tmp_path / "img.png"
    image(3).save(img)
    gen = generate_inputs(adapter, batch(adapter), 4)
    assert len(gen.texts) == 2 and gen.new_tokens.shape == (2, 4)
    cfg = SteerConfig(model=tiny_model("llava"), sae=str(sae_dir), feature=[5, 9], value=[20.0, 5.0], mode="add",
                      prompt=["hi", "name a colour"], image=[str(img)], out=str(tmp_path / "out"), max_new_tokens=4,
                      sweep=[], keywords=[])
    rows = steer(cfg)
    assert "clean" in capsys.readouterr().out
    saved = [json.loads(line) for line in (tmp_path / "out" / "steering.jsonl").read_text().splitlines()]
    assert len(saved) == 2 and saved == rows
    assert saved[0]["interventions"][1] == {"feature": 9, "value": 5.0, "mode": "add"}
    # the sweep: value 0 in add mode is the clean model, so its outputs equal the clean ones
    cfg.feature, cfg.value, cfg.sweep = [5], [1.0], [0.0, 40.0]
    cfg.keywords = [saved[0]["clean"][:1] or "x"]
    steer(cfg)
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    clean_row, zero_row = sweep["rows"][0], sweep["rows"][1]
    assert clean_row["value"] is None and zero_row["value"] == 0.0
    assert zero_row["outputs"] == clean_row["outputs"]
    assert zero_row["perplexity"] == pytest.approx(clean_row["perplexity"], rel=1e-4)
    assert all(r["perplexity"] > 1 for r in sweep["rows"])
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line_error(adapter, tmp_path):
    sae = make_sae(adapter)
    inputs = batch(adapter)
    cases = [
        lambda: spliced(adapter, sae, interventions=[Intervention(128, 1.0)]).__enter__(),
        lambda: spliced(adapter, make_sae(adapter, d_in=16), interventions=[Intervention(1, 1.0)]).__enter__(),
        lambda: spliced(adapter, make_sae(adapter, hook_point="language_model.layers.2"), site=LAYER,
                        interventions=[Intervention(1, 1.0)]).__enter__(),  # not the SAE's site
        lambda: spliced(adapter, sae, inputs, interventions=[Intervention(1, 1.0, "multiply")]).__enter__(),
        lambda: spliced(adapter, sae, interventions=[Intervention(1, 1.0)], span="image").__enter__(),  # span needs inputs
    ]
    for case in cases:
        with pytest.raises(MmsaeError) as err:
            case()
        assert "\n" not in str(err.value)
    sae.save(tmp_path / "sae")
    cfg = SteerConfig(model=tiny_model("llava"), sae=str(tmp_path / "sae"), feature=[500], prompt=["hi"],
                      out=str(tmp_path / "o"))
    with pytest.raises(MmsaeError, match="feature 500 is out of range"):
        steer(cfg)


def test_values_relative_to_the_index_max_activation(tmp_path):
    from mmsae.index import IndexWriter
    from mmsae.steer import build_interventions, relative_scale

    writer = IndexWriter(tmp_path / "index", num_latents=16, top_n=2)
    writer.add_activations(5, [0.0, 2.5, 1.0])
    writer.add_activations(9, [4.0, 0.5])
    writer.finish()
    scales = relative_scale(str(tmp_path / "index"), [5, 9])
    assert scales == pytest.approx([2.5, 4.0])
    ivs = build_interventions([5, 9], [2.0], "clamp", scales)
    assert [(iv.feature, iv.value, iv.mode) for iv in ivs] == [(5, 5.0, "clamp"), (9, 8.0, "clamp")]
    assert [iv.value for iv in build_interventions([5, 9], [0.5, 3.0], "scale", scales)] == [0.5, 3.0]
    with pytest.raises(MmsaeError, match="no positive max_activation"):
        relative_scale(str(tmp_path / "index"), [3])
    with pytest.raises(MmsaeError, match="2 values for 3 features"):
        build_interventions([1, 2, 3], [1.0, 2.0], "add")


def test_relative_values_refuse_an_index_of_another_sae(tmp_path, adapter):
    from mmsae.index import FeatureIndex, IndexConfig, build_index
    from mmsae.steer import relative_scale

    (tmp_path / "images").mkdir()
    Image.new("RGB", (30, 24), (200, 40, 40)).save(tmp_path / "images" / "img.png")
    sae, other = make_sae(adapter, seed=0), make_sae(adapter, seed=1)
    sae.save(tmp_path / "sae")
    build_index(IndexConfig(sae=str(tmp_path / "sae"), model=tiny_model("llava"), data=str(tmp_path / "images"),
                            out=str(tmp_path / "index"), top_n=1, random_n=1, device="cpu"))
    fired = [f for f in FeatureIndex(tmp_path / "index").features()
             if (FeatureIndex(tmp_path / "index").stats(f).get("max_activation") or 0) > 0][:1]
    assert relative_scale(str(tmp_path / "index"), fired, sae)[0] > 0  # its own SAE: fine
    with pytest.raises(MmsaeError, match="was built with another SAE"):
        relative_scale(str(tmp_path / "index"), fired, other)


def test_sweep_with_a_judge(adapter):
    from mmsae.steer import sweep

    seen = []

    def judge(text):
        seen.append(text)
        return len(seen) % 2 == 0  # every second output "expresses" the concept

    rows = sweep(adapter, make_sae(adapter), 5, [30.0], ["hi", "name a colour"], [image(0), image(1)],
                 mode="add", max_new_tokens=3, judge=judge)
    assert [r["value"] for r in rows] == [None, 30.0]
    assert len(seen) == 4 and [r["concept_rate"] for r in rows] == [0.5, 0.5]
    assert seen == rows[0]["outputs"] + rows[1]["outputs"]
    with pytest.raises(MmsaeError, match="needs keywords"):
        sweep(adapter, make_sae(adapter), 5, [1.0], ["hi"])
