"""The feature index against a brute-force reference on a tiny LLaVA with a small random SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.errors import MmsaeError
from mmsae.index import FeatureIndex, IndexConfig, IndexWriter, build_index, quantile_from_hist, hist_edges
from mmsae.models.base import Tile, TokenLayout
from tiny_models import tiny_adapter, tiny_model

N_IMAGES = 14
LAYER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(N_IMAGES):
        h, w = 30 + 3 * i, 50 - i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / f"{i:03d}.png")
    from mmsae.sae import SaeConfig, SparseAutoencoder

    adapter = tiny_adapter("llava")
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=24, k=4, model=tiny_model("llava"), layer=LAYER))
    sae.save(root / "sae")
    return root, adapter, sae


def _cfg(root, out, **kw):
    base = dict(sae=str(root / "sae"), data=str(root / "imgs"), out=str(root / out), top_n=3, random_n=4,
                batch_size=3, device="cpu", checkpoint_every=6)
    return IndexConfig(**{**base, **kw})


def _reference(root, adapter, sae):
    """Dense per-patch activations [P, F] of every image, from output_hidden_states and sae.encode."""
    from mmsae.data.sources import open_source

    out = {}
    for s in open_source(str(root / "imgs")).samples():
        inputs = adapter.build_inputs([s.image], [s.text])
        with torch.no_grad():
            hs = adapter.model(**inputs.inputs, output_hidden_states=True).hidden_states[LAYER + 1]
        lt = inputs.layouts[0]
        out[s.id] = (_plain_topk(sae, hs[0, lt.positions]), _plain_topk(sae, hs[0, lt.text_positions]))
    return out


def _plain_topk(sae, x):
    """TopK SAE codes in float64 plain torch: relu of the k largest pre-activations, zeros elsewhere."""
    with torch.no_grad():
        pre = (x.double() - sae.b_dec.double()) @ sae.encoder.weight.double().T + sae.encoder.bias.double()
        top = pre.topk(sae.cfg.k, dim=-1)
        dense = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return dense.float().numpy()


@pytest.fixture(scope="module")
def built(setup):
    root, adapter, sae = setup
    return build_index(_cfg(root, "index")), _reference(root, adapter, sae)


def test_top_examples_match_brute_force(built):
    index, ref = built
    F = index.num_latents
    for f in range(F):
        scores = {sid: float(dense[0][:, f].max()) for sid, dense in ref.items()}
        firing = sorted((s for s in scores if scores[s] > 0), key=lambda s: -scores[s])
        got = index.top_examples(f)
        assert [e.sample_id for e in got] == firing[:3]
        for e in got:
            np.testing.assert_allclose(e.score, scores[e.sample_id], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(e.patch_values, ref[e.sample_id][0][:, f], rtol=1e-5, atol=1e-6)
    assert index.features() == [f for f in range(F) if any(d[0][:, f].max() > 0 for d in ref.values())]


def test_stats_match_brute_force(built):
    index, ref = built
    patches = np.concatenate([d[0] for d in ref.values()])  # [all patches, F]
    text = np.concatenate([d[1] for d in ref.values()])
    for f in index.features():
        st = index.stats(f)
        assert st["n_patches"] == patches.shape[0] and st["n_images"] == N_IMAGES
        assert st["frequency"] == pytest.approx((patches[:, f] > 0).mean())
        assert st["text_frequency"] == pytest.approx((text[:, f] > 0).mean())
        assert st["max_activation"] == pytest.approx(patches[:, f].max(), rel=1e-5)
        assert sum(st["histogram"]["counts"]) == (patches[:, f] > 0).sum()
        # the log-binned quantile is within one bin (15%) of the exact one
        exact = np.quantile(patches[:, f], 0.9, method="higher")
        q = st["quantiles"]["0.9"]
        assert (exact == 0 and q == 0) or abs(np.log10(q) - np.log10(exact)) <= 1 / 16 + 1e-6


def test_random_examples_are_activating_images_with_their_maps(built):
    index, ref = built
    for f in index.features():
        rnd = index.random_examples(f)
        firing = {s for s, d in ref.items() if d[0][:, f].max() > 0}
        assert 0 < len(rnd) <= 4 and len(rnd) == min(4, len(firing))
        assert {e.sample_id for e in rnd} <= firing
        assert [e.score for e in rnd] == sorted((e.score for e in rnd), reverse=True)
        for e in rnd:
            np.testing.assert_allclose(e.patch_values, ref[e.sample_id][0][:, f], rtol=1e-5, atol=1e-6)


def test_top_tokens_match_brute_force(built):
    index, ref = built
    for f in index.features()[:6]:
        best = sorted((v for d in ref.values() for v in d[1][:, f] if v > 0), reverse=True)[:10]
        got = [t["activation"] for t in index.top_tokens(f)]
        np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-6)
        for t in index.top_tokens(f):
            assert t["context"] == t["before"] + t["token"] + t["after"]


def test_images_heatmaps_and_meta(built):
    index, _ = built
    f = index.features()[0]
    e = index.top_examples(f, n=1)[0]
    image = index.image(e.sample_id)
    hm = e.heatmap()
    assert hm.shape == (image.height, image.width) and hm.max() == pytest.approx(e.patch_values.max(), rel=1e-5)
    kept = {p.name for p in (index.path / "images").iterdir()}
    assert len(kept) == len(index.sample_ids()) <= N_IMAGES


def test_mean_score(setup):
    root, adapter, sae = setup
    index = build_index(_cfg(root, "index-mean", image_score="mean", max_samples=6))
    assert index.cfg["n_images"] == 6
    for f in index.features():
        for e in index.top_examples(f):
            assert e.score == pytest.approx(float(e.patch_values.mean()), rel=1e-5)


def test_interrupted_build_resumes_to_the_same_index(setup, monkeypatch, built):
    root, adapter, sae = setup
    import mmsae.index.build as index_mod  # (the module whose build_index calls it)

    real = index_mod.encode_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint at 6 images, inside the second stretch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(index_mod, "encode_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_index(_cfg(root, "index-resume"))
    assert (root / "index-resume" / "checkpoint.safetensors").exists()
    monkeypatch.setattr(index_mod, "encode_batch", real)
    resumed = build_index(_cfg(root, "index-resume"))
    clean, _ = built
    assert not (root / "index-resume" / "checkpoint.safetensors").exists()
    for f in range(clean.num_latents):
        a, b = clean.top_examples(f), resumed.top_examples(f)
        assert [(e.sample_id, e.score) for e in a] == [(e.sample_id, e.score) for e in b]
        assert [(e.sample_id, e.score) for e in clean.random_examples(f)] == [(e.sample_id, e.score) for e in resumed.random_examples(f)]
        assert clean.stats(f) == resumed.stats(f)
    # a finished index is returned as it is; other options are refused
    assert build_index(_cfg(root, "index-resume")).features() == clean.features()
    with pytest.raises(MmsaeError, match="other options"):
        build_index(_cfg(root, "index-resume", top_n=5))


def test_other_sae_and_bad_feature_are_refused(setup, built):
    root, adapter, sae = setup
    index, _ = built
    index.check_sae(str(root / "sae"))
    from mmsae.sae import SaeConfig, SparseAutoencoder

    other = SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=24, k=4))
    with pytest.raises(MmsaeError, match="another SAE"):
        FeatureIndex(index.path, sae=other)
    with pytest.raises(MmsaeError, match="out of range"):
        index.top_examples(24)
    with pytest.raises(MmsaeError, match="not a feature index"):
        FeatureIndex(root)


def _layout(rows=2, cols=3, size=(30, 20)):
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return TokenLayout(positions=torch.arange(rows * cols) + 4, tile=torch.zeros(rows * cols, dtype=torch.long),
                       row=r.reshape(-1), col=c.reshape(-1), tiles=[Tile((0, 0, *size), rows, cols)], image_size=size)


def test_index_writer_round_trip(tmp_path):
    w = IndexWriter(tmp_path / "ix", num_latents=5, top_n=2, model="m", layer=3)
    for s in range(3):
        w.add_sample(s, Image.new("RGB", (30, 20), (50 * s, 0, 0)), _layout(), meta={"scene": "sky", "n": np.int64(s)})
    w.add_example(1, 0, [0, 1, 0, 0, 0, 0])
    w.add_example(1, 1, [0, 0, 3, 0, 0, 2])
    w.add_example(1, 2, [0, 0, 0.5, 0, 0, 0])
    w.add_example(1, 2, [0, 0, 0.5, 0, 0, 0], kind="random")
    w.add_activations(1, [0] * 190 + [1] * 9 + [3])
    ix = w.finish()
    assert ix.features() == [1]
    assert [(e.sample_id, e.score) for e in ix.top_examples(1)] == [(1, 3.0), (0, 1.0)]
    assert ix.sample_meta(0) == {"scene": "sky", "n": 0}
    assert ix.image(2).getpixel((0, 0)) == (100, 0, 0)
    st = ix.stats(1)
    assert st["frequency"] == pytest.approx(10 / 200) and st["max_activation"] == 3.0
    # the 0.995 quantile of 200 values is the top 1: between the bins of 1 and 3, never above 3
    assert 1.0 <= ix.quantile(1, 0.995) <= 3.0 and ix.quantile(1, 0.9) == 0.0
    hm = ix.top_examples(1)[0].heatmap()
    assert hm[5, 25] == 3.0 and hm[15, 25] == 2.0 and hm[5, 5] == 0.0  # patch 2 = row 0, col 2


def test_quantile_from_hist_hand_computed():
    counts = np.zeros(len(hist_edges()) - 1, dtype=np.int64)
    b = int((np.log10(2.0) + 4) * 16)
    counts[b] = 10  # ten activations of 2.0 among 1000 patches
    edges = hist_edges()
    q = quantile_from_hist(counts, 1000, 0.995, max_value=2.0)  # 5 values above: half-way through the bin
    assert edges[b] <= q <= 2.0
    assert q == pytest.approx(10 ** ((np.log10(edges[b]) + np.log10(edges[b + 1])) / 2), rel=1e-9) or q == 2.0
    assert quantile_from_hist(counts, 1000, 0.98, max_value=2.0) == 0.0
