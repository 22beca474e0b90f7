"""The feature index at vision and projector sites, and several SAEs indexed in one pass.

References are independent of the index: each image run alone through ``run_sites``, its patch
rows taken with ``site_rows`` and encoded densely with ``sae.encode``; a feature built to fire on
a white square must light exactly that square of the image, whatever tiles the model cut.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmsae.index.build as index_build
from mmsae.cli import main as cli_main
from mmsae.data.sources import open_source
from mmsae.errors import MmsaeError
from mmsae.hooks import run_sites
from mmsae.index import FeatureIndex, IndexConfig, build_index
from mmsae.models.base import image_heatmap
from mmsae.sae import SaeConfig, SparseAutoencoder
from tiny_models import tiny_adapter, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

N_IMAGES = 7
OPTIONS = dict(top_n=3, random_n=3, batch_size=3, checkpoint_every=3, device="cpu")


def make_sae(folder, family: str, site: str, seed: int) -> SparseAutoencoder:
    adapter = tiny_adapter(family)
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=adapter.site_width(site), num_latents=24, k=4, model=tiny_model(family), site=site))
    with torch.no_grad():
        sae.encoder.weight.mul_(3.0)  # (the projector's activations are small: make features fire)
    sae.save(folder)
    return sae


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_sites")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (30 + 5 * i, 48 - 2 * i, 3), dtype=np.uint8)).save(root / "imgs" / f"{i:03d}.png")
    saes = {site: make_sae(root / site.replace(":", "-"), "llava", site, seed)
            for seed, site in enumerate(["lm:1", "vision:0", "projector"])}
    return root, saes


def dense_reference(adapter, sae, site: str, data: str) -> dict[int, tuple[np.ndarray, object]]:
    """Per sample: its patch rows' dense codes [P, F] at ``site`` (one image per pass) and their layout."""
    out = {}
    site = adapter.resolve_site(site)
    for s in open_source(data).samples():
        inputs = adapter.build_inputs([s.image], [s.text or "Describe the image."])
        with torch.no_grad():
            rows = adapter.site_rows(site, inputs)
            out[s.id] = (sae.encode(rows.take(run_sites(adapter, [site], inputs)[site]).float()).numpy(), rows.layouts[0])
    return out


@pytest.mark.parametrize("site", ["vision:0", "projector"])
def test_an_image_site_index_matches_the_dense_reference(world, site):
    root, saes = world
    adapter = tiny_adapter("llava")
    index = build_index(IndexConfig(sae=str(root / site.replace(":", "-")), data=str(root / "imgs"), out=str(root / f"ix-{site}"), **OPTIONS))
    ref = dense_reference(adapter, saes[site], site, str(root / "imgs"))
    manifest = json.loads((index.path / "manifest.json").read_text())
    assert manifest["site"] == site and manifest["layer"] is None and manifest["signature"]["site"] == site
    assert index.features() == [f for f in range(24) if any(d[:, f].max() > 0 for d, _ in ref.values())] != []
    for f in index.features():
        scores = {sid: float(d[:, f].max()) for sid, (d, _) in ref.items()}
        firing = sorted((s for s in scores if scores[s] > 0), key=lambda s: -scores[s])
        top = index.top_examples(f)
        assert [e.sample_id for e in top] == firing[:3]
        for e in top + index.random_examples(f):
            dense, layout = ref[e.sample_id]
            np.testing.assert_allclose(e.score, scores[e.sample_id], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(e.patch_values, dense[:, f], rtol=1e-5, atol=1e-6)
            assert e.layout.positions.tolist() == list(range(len(dense)))  # the patch order
            np.testing.assert_allclose(e.heatmap(), image_heatmap(layout, dense[:, f]), rtol=1e-5, atol=1e-6)
        st = index.stats(f)
        assert st["n_patches"] == sum(len(d) for d, _ in ref.values()) and st["text_frequency"] == 0.0
        assert index.top_tokens(f) == []  # image patches only
    # the index knows its site: the same weights recorded at another site are not its SAE
    index.check_sae(saes[site])
    other = SparseAutoencoder(dataclasses.replace(saes[site].cfg, site="lm:1"))
    other.load_state_dict(saes[site].state_dict())
    with pytest.raises(MmsaeError, match=rf"^the SAE was trained at lm:1 but index .* holds {site}"):
        index.check_sae(other)


def marked_images(folder) -> None:
    """A black 64 px square with a white top-left quarter, and the plain black square."""
    folder.mkdir()
    plain = Image.new("RGB", (64, 64), (0, 0, 0))
    marked = plain.copy()
    marked.paste((255, 255, 255), (0, 0, 32, 32))
    marked.save(folder / "0-marked.png")
    plain.save(folder / "1-plain.png")


def square_detector(family: str, site: str, folder) -> None:
    """An SAE whose feature 0 fires on the rows the white square changes and nowhere else.

    The rows come from comparing the two images' activations, not from any layout."""
    adapter = tiny_adapter(family)
    site = adapter.resolve_site(site)
    acts = []
    for image in (Image.open(folder / "0-marked.png"), Image.open(folder / "1-plain.png")):
        inputs = adapter.build_inputs([image], ["Describe the image."])
        with torch.no_grad():
            acts.append(adapter.site_rows(site, inputs).take(run_sites(adapter, [site], inputs)[site]).float())
    changed = (acts[0] - acts[1]).norm(dim=1)
    mark = changed > 0.5 * changed.max()
    direction = acts[0][mark].mean(0) - acts[0][~mark].mean(0)
    direction /= direction.norm()
    proj = acts[0] @ direction
    assert proj[mark].min() > proj[~mark].max()  # (the tiny models separate them by a wide margin)
    sae = SparseAutoencoder(SaeConfig(d_in=adapter.site_width(site), num_latents=4, k=1, model=tiny_model(family), site=str(site)))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.encoder.weight[0] = direction
        sae.encoder.bias[0] = -(proj[mark].min() + proj[~mark].max()) / 2
    sae.save(folder.parent / "square-sae")


@pytest.mark.parametrize("family,site", [("llava", "vision:0"), ("llava_next", "vision:0"), ("idefics3", "projector")])
def test_a_square_detector_lights_the_square_over_every_tile(tmp_path, family, site):
    marked_images(tmp_path / "imgs")
    square_detector(family, site, tmp_path / "imgs")
    index = build_index(IndexConfig(sae=str(tmp_path / "square-sae"), data=str(tmp_path / "imgs"), out=str(tmp_path / "ix"), **OPTIONS))
    assert index.features() == [0]
    (top,) = index.top_examples(0)
    assert top.sample_id == 0
    if family != "llava":
        assert len(top.layout.tiles) == 5  # the base image and four crops
        assert set(top.layout.tile.tolist()) == set(range(5))
    hm = top.heatmap()
    square = np.zeros((64, 64), dtype=bool)
    square[:32, :32] = True
    assert hm.shape == (64, 64) and np.array_equal(hm > 0, square)


def test_two_saes_in_one_pass_equal_two_separate_builds(world, tmp_path, monkeypatch):
    root, saes = world
    lm, vision = str(root / "lm-1"), str(root / "vision-0")
    data = str(root / "imgs")
    calls = []
    real = index_build.encode_batch

    def counted(adapter, sae_list, sites, images, prompts):
        calls.append([str(s) for s in sites])
        return real(adapter, sae_list, sites, images, prompts)

    monkeypatch.setattr(index_build, "encode_batch", counted)
    flags = ["--top-n", "3", "--random-n", "3", "--batch-size", "3", "--checkpoint-every", "3", "--device", "cpu"]
    assert cli_main(["index", "--sae", lm, vision, "--data", data, "--out", str(tmp_path / "both"), *flags]) == 0
    batches = -(-N_IMAGES // 3)
    assert calls == [["lm:1", "vision:0"]] * batches  # one forward pass per batch for both
    calls.clear()
    separate = {site: build_index(IndexConfig(sae=sae, data=data, out=str(tmp_path / site), **OPTIONS))
                for site, sae in (("lm-1", lm), ("vision-0", vision))}
    assert len(calls) == 2 * batches
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [".mmsae-owner.json", "lm-1", "vision-0"]
    for site, alone in separate.items():
        both = tmp_path / "both" / site
        for name in ("examples.safetensors", "stats.safetensors", "layouts.safetensors"):
            a, b = load_file(str(alone.path / name)), load_file(str(both / name))
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (site, name, key)
        for name in ("samples.json", "tokens.json", ".mmsae-images"):
            assert (alone.path / name).read_text() == (both / name).read_text(), (site, name)
        ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (alone.path, both))
        assert {k for k in ma if ma[k] != mb[k]} <= {"created", "run_seconds"}
        assert FeatureIndex(both).fingerprint == alone.fingerprint
    assert separate["lm-1"].top_tokens(separate["lm-1"].features()[0]) != []

    # interrupted after a checkpoint, a two-SAE build resumes to the same indexes
    monkeypatch.setattr(index_build, "encode_batch", real)
    flaky = {"n": 0}

    def interrupted(*args):
        flaky["n"] += 1
        if flaky["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(index_build, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(IndexConfig(sae=[lm, vision], data=data, out=str(tmp_path / "resumed"), **OPTIONS))
    assert (tmp_path / "resumed" / "vision-0" / "checkpoint.safetensors").exists()
    # (one index starts over, the other resumes after its checkpoint: each skips the samples it holds)
    (tmp_path / "resumed" / "lm-1" / "checkpoint.safetensors").unlink()
    resumed = build_index(IndexConfig(sae=[lm, vision], data=data, out=str(tmp_path / "resumed"), **OPTIONS))
    assert [ix.path.name for ix in resumed] == ["lm-1", "vision-0"]
    for ix in resumed:
        alone = separate[ix.path.name]
        assert ix.fingerprint == alone.fingerprint
        for f in alone.features():
            assert [(e.sample_id, e.score) for e in ix.random_examples(f)] == [(e.sample_id, e.score) for e in alone.random_examples(f)]
            assert ix.stats(f) == alone.stats(f)


def test_saes_of_one_site_get_numbered_folders_and_bad_combinations_are_refused(world, tmp_path):
    root, saes = world
    make_sae(tmp_path / "vision-b", "llava", "vision:0", seed=7)
    a, b = str(root / "vision-0"), str(tmp_path / "vision-b")
    indexes = build_index(IndexConfig(sae=[a, b], data=str(root / "imgs"), out=str(tmp_path / "ix"), max_samples=3, **OPTIONS))
    assert [ix.path.name for ix in indexes] == ["0", "1"]
    assert [ix.sae_fingerprint for ix in indexes] == [FeatureIndex(ix.path, sae=s).sae_fingerprint for ix, s in zip(indexes, (a, b))]
    with pytest.raises(MmsaeError, match="names an SAE twice"):
        IndexConfig(sae=[a, a], data="d", out="o")
    with pytest.raises(MmsaeError, match="pick the site of one SAE"):
        IndexConfig(sae=[a, b], data="d", out="o", layer=1)
    with pytest.raises(MmsaeError, match=r"^SAE .*vision-0 was trained at vision:0 but --site is vision:1; "):
        build_index(IndexConfig(sae=a, site="vision:1", data=str(root / "imgs"), out=str(tmp_path / "ix1"), **OPTIONS))
