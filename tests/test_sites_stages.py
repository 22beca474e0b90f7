"""Sites through the stages: harvest at several sites in one pass, the site recorded from store to
SAE, and the one SAE/site compatibility check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmsae.activations import ActivationStore, HarvestConfig, harvest
from mmsae.cli import main as cli_main
from mmsae.errors import MmsaeError
from mmsae.models.sites import Site, check_sae_site
from mmsae.sae import SaeConfig, SparseAutoencoder, load_sae, save_sae
from mmsae.train import TrainConfig, train
from tiny_models import tiny_adapter, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site-images")
    for i in range(5):
        Image.new("RGB", (24 + 7 * i, 40 - 3 * i), (40 * i, 90, 255 - 30 * i)).save(folder / f"img{i}.png")
    return folder


def run(out: Path, images: Path, **kwargs):
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("shard_size", 40)
    return harvest(HarvestConfig(model=tiny_model("llava"), data=str(images), out=str(out), **kwargs))


def shard_bytes(store: ActivationStore) -> list[bytes]:
    return [(store.path / s["file"]).read_bytes() for s in store.shards]


def without_config(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("config", "ranks")}


def test_one_pass_at_several_sites_equals_one_harvest_per_site(tmp_path, images):
    both = run(tmp_path / "both", images, site=["lm:1", "vision:1"])
    assert set(both) == {"lm:1", "vision:1"}
    assert both["lm:1"].path == tmp_path / "both" / "lm-1" and both["vision:1"].path == tmp_path / "both" / "vision-1"
    lm = run(tmp_path / "lm", images, site=["lm:1"])
    vision = run(tmp_path / "vision", images, site=["vision:1"])
    by_layer = run(tmp_path / "layer", images, layer=1)  # the --layer shorthand: the store as before sites
    assert isinstance(lm, ActivationStore) and lm.path == tmp_path / "lm"
    for multi, single in ((both["lm:1"], lm), (both["vision:1"], vision), (by_layer, lm)):
        assert shard_bytes(multi) == shard_bytes(single) and len(shard_bytes(single)) >= 2
        assert without_config(multi.manifest) == without_config(single.manifest)
    assert sorted(p.name for p in by_layer.path.iterdir() if not p.name.startswith(".")) == \
        sorted(["manifest.json", "progress-0.json"] + [s["file"] for s in by_layer.shards])
    m = both["vision:1"].manifest
    assert (m["site"], m["d"], m["layer"]) == ("vision:1", tiny_adapter("llava").vision_width(), None)
    assert (lm.manifest["site"], lm.manifest["layer"], lm.cfg["site"]) == ("lm:1", 1, "lm:1")
    # a rerun resumes each store and finds it complete; the stores stay as they were
    again = run(tmp_path / "both", images, site=["lm:1", "vision:1"])
    assert shard_bytes(again["vision:1"]) == shard_bytes(vision)


def test_vision_store_rows_are_the_towers_hidden_states_without_cls(tmp_path, images):
    store = run(tmp_path / "v", images, site=["vision:0"])
    adapter = tiny_adapter("llava")
    t = {k: torch.cat([s[k] for s in store.iter_shards()]) for k in ("acts", "sample", "pos", "is_image", "tile", "row", "col")}
    assert t["is_image"].all() and (t["tile"] == 0).all()
    for i, path in enumerate(sorted(images.iterdir())):
        inputs = adapter.build_inputs([Image.open(path).convert("RGB")], ["Describe this image."]).inputs
        with torch.no_grad():
            hidden = adapter.vision_tower()(inputs["pixel_values"], output_hidden_states=True).hidden_states[1]
        mine = t["sample"] == i
        n = hidden.shape[1] - 1  # CLS first, then the patches row by row
        side = int(n ** 0.5)
        torch.testing.assert_close(t["acts"][mine], hidden[0, 1:], rtol=0, atol=1e-6)
        assert torch.equal(t["pos"][mine].long(), torch.arange(n))
        assert torch.equal(t["row"][mine].long(), torch.arange(n) // side)
        assert torch.equal(t["col"][mine].long(), torch.arange(n) % side)


def test_the_store_site_is_recorded_in_the_sae_cfg(tmp_path, images):
    stores = run(tmp_path / "s", images, site=["lm:2", "vision:1"])
    for name, store in stores.items():
        out = tmp_path / f"sae-{name.replace(':', '-')}"
        train(TrainConfig(out=str(out), activations=str(store.path), expansion=2, k=2, batch_size=32, steps=3,
                          warmup=1, progress=False, init_tokens=64, checkpoint_every=100))
        assert json.loads((out / "cfg.json").read_text())["site"] == name
        sae = load_sae(out)
        assert sae.cfg.site == name and sae.cfg.d_in == store.d
        assert check_sae_site(sae, tiny_adapter("llava")) == tiny_adapter("llava").resolve_site(name)


def saved(tmp_path: Path, name: str, d_in: int, **recorded) -> SparseAutoencoder:
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, expansion_factor=2, k=2, **recorded))
    save_sae(sae, tmp_path / name)
    return load_sae(tmp_path / name)


def test_one_check_refuses_other_sites_and_widths_and_reads_released_namings(tmp_path):
    adapter = tiny_adapter("llava_next")
    d = adapter.hidden_size
    released = saved(tmp_path, "released", d, hook_point="model.layers.1")  # the paper's release: no layer
    assert released.cfg.layer is None and released.cfg.site is None
    assert check_sae_site(released, adapter) == Site.lm(1) == check_sae_site(released, adapter, "lm:1")
    with pytest.raises(MmsaeError, match=r"^SAE X was trained at lm:1 but --site is lm:2; ") as e:
        check_sae_site(released, adapter, "lm:2", name="SAE X")
    assert "\n" not in str(e.value)
    with pytest.raises(MmsaeError, match=r"^the SAE was trained at lm:1 but --site is lm:0"):
        check_sae_site(released, adapter, 0)  # steer / attribute / evaluate --layer / --site go through the same check
    narrow = saved(tmp_path, "narrow", d // 2, layer=1)
    with pytest.raises(MmsaeError, match=rf"^the SAE has input width d_in={d // 2} but lm:1 of .* has width {d}; "):
        check_sae_site(narrow, adapter)
    with pytest.raises(MmsaeError, match="records no site or layer; pass --site"):
        check_sae_site(saved(tmp_path, "bare", d), adapter)
    vision = saved(tmp_path, "vision", adapter.vision_width(), site="vision:1")
    assert check_sae_site(vision, adapter) == Site.vision(1)
    # an SAE folder from before sites were recorded (no "site" key) still loads and checks
    cfg = json.loads((tmp_path / "narrow" / "cfg.json").read_text())
    cfg.pop("site")
    (tmp_path / "narrow" / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(tmp_path / "narrow").cfg.site is None


def test_bad_sites_and_rules_are_one_line_errors(tmp_path, images, capsys):
    code = cli_main(["harvest", "--model", tiny_model("llava"), "--site", "vision:99", "--data", str(images),
                     "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("mmsae harvest: error: vision:99 is out of range: the vision tower of ")
    with pytest.raises(MmsaeError, match="apply to lm sites only; harvest vision:1 without them"):
        run(tmp_path / "x", images, site=["lm:1", "vision:1"], exclude_token_ids=[1])
    with pytest.raises(MmsaeError, match="--layer L or --site SITE"):
        run(tmp_path / "y", images, layer=1, site=["lm:1"])


def test_evaluate_on_a_store_refuses_an_sae_of_another_site(tmp_path, images):
    from mmsae.evaluate import EvaluateConfig, evaluate

    store = run(tmp_path / "store", images, site=["vision:1"], max_samples=2)
    d = store.d
    saved(tmp_path, "lm-sae", d, hook_point="model.layers.1")
    with pytest.raises(MmsaeError, match=r"^SAE .*lm-sae was trained at lm:1 but store .* holds vision:1; "):
        evaluate(EvaluateConfig(sae=str(tmp_path / "lm-sae"), activations=str(store.path), out=str(tmp_path / "m.json"), progress=False))
    saved(tmp_path, "vision-sae", d, site="vision:1")
    metrics = evaluate(EvaluateConfig(sae=str(tmp_path / "vision-sae"), activations=str(store.path), out=str(tmp_path / "m2.json"), progress=False))
    assert (tmp_path / "m2.json").exists() and metrics


def test_index_reads_a_released_naming_and_refuses_an_sae_of_another_layer(tmp_path, images):
    from mmsae.index import IndexConfig, build_index

    d = tiny_adapter("llava").hidden_size
    released = saved(tmp_path, "released", d, hook_point="model.layers.1", model=tiny_model("llava"))
    index = build_index(IndexConfig(sae=str(tmp_path / "released"), data=str(images), out=str(tmp_path / "index"),
                                    top_n=2, random_n=2, batch_size=2, device="cpu"))
    manifest = json.loads((index.path / "manifest.json").read_text())
    assert manifest["layer"] == 1 and manifest["site"] == "lm:1"
    assert released.cfg.layer is None  # the layer came from the recorded hook point
    with pytest.raises(MmsaeError, match=r"^SAE .* was trained at lm:1 but --site is lm:0; "):
        build_index(IndexConfig(sae=str(tmp_path / "released"), layer=0, data=str(images), out=str(tmp_path / "index0"),
                                device="cpu"))
