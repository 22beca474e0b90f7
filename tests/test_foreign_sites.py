"""SAEs saved by other tools, under their own names for the site, through index, steer and attribute.

One set of weights is written by hand in each foreign layout (the paper's release and sparsify:
a sub-folder per hook point named ``model.layers.L`` / ``layers.L`` with sparsify's cfg keys;
SAELens: ``blocks.L.hook_resid_post``, ``blocks.L+1.hook_resid_pre`` or a module path in its
metadata), with no mmsae keys. Each must land at the same site as mmsae's own copy and give the
same index, steering and attribution.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmsae.attribute import AttributeConfig, attribute
from mmsae.index import IndexConfig, build_index
from mmsae.sae import SaeConfig, SparseAutoencoder, load_sae, save_sae
from mmsae.steer import SteerConfig, steer
from tiny_models import tiny_adapter, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYER = 1


def sparsify_folder(root: Path, sub: str, sae: SparseAutoencoder) -> Path:
    """sparsify's own files: cfg keys of sparsify only (no layer, hook point or model)."""
    folder = root / sub
    folder.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": sae.cfg.num_latents // sae.cfg.d_in, "normalize_decoder": True,
           "num_latents": sae.cfg.num_latents, "k": sae.cfg.k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": sae.cfg.d_in}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": sae.encoder.weight.detach().contiguous(), "encoder.bias": sae.encoder.bias.detach(),
               "W_dec": sae.W_dec.detach().contiguous(), "b_dec": sae.b_dec.detach()}, str(folder / "sae.safetensors"))
    return root


def saelens_folder(folder: Path, sae: SparseAutoencoder, hook_name: str) -> Path:
    """SAELens v6 files: W_enc [d, n], the hook in its metadata, nothing of mmsae's."""
    folder.mkdir(parents=True)
    cfg = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.num_latents, "architecture": "topk", "k": sae.cfg.k, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": False,
           "metadata": {"sae_lens_version": "6.5.0", "model_name": tiny_model("llava"), "hook_name": hook_name}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": sae.encoder.weight.detach().t().contiguous(), "b_enc": sae.encoder.bias.detach(),
               "W_dec": sae.W_dec.detach().contiguous(), "b_dec": sae.b_dec.detach()}, str(folder / "sae_weights.safetensors"))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (30 + 5 * i, 26), (60 * i, 200 - 40 * i, 90)).save(images / f"img{i}.png")
    adapter = tiny_adapter("llava")
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=64, k=4, site=f"lm:{LAYER}",
                                      model=tiny_model("llava")))
    with torch.no_grad():
        sae.encoder.weight.mul_(3.0)
    save_sae(sae, root / "native")
    lm_module = adapter.hook_point(LAYER)  # the model's own module path of decoder layer 1
    foreign = {
        "paper release (model.layers.1)": sparsify_folder(root / "release", f"model.layers.{LAYER}", sae),
        "sparsify (layers.1)": sparsify_folder(root / "sparsify", f"layers.{LAYER}", sae),
        "SAELens hook_resid_post": saelens_folder(root / "post", sae, f"blocks.{LAYER}.hook_resid_post"),
        "SAELens hook_resid_pre of the next block": saelens_folder(root / "pre", sae, f"blocks.{LAYER + 1}.hook_resid_pre"),
        "module path": saelens_folder(root / "module", sae, lm_module),
    }
    return root, images, foreign


def index_tensors(root: Path, images: Path, sae: Path, name: str) -> tuple[dict, dict]:
    index = build_index(IndexConfig(sae=str(sae), model=tiny_model("llava"), data=str(images), out=str(root / "idx" / name),
                                    top_n=2, random_n=2, batch_size=2, device="cpu"))
    manifest = json.loads((index.path / "manifest.json").read_text())
    return load_file(str(index.path / "examples.safetensors")), manifest


def test_foreign_namings_load_at_the_same_site(world):
    root, _, foreign = world
    adapter = tiny_adapter("llava")
    from mmsae.models.sites import check_sae_site

    for name, folder in foreign.items():
        assert str(check_sae_site(load_sae(folder), adapter)) == f"lm:{LAYER}", name
    assert load_sae(foreign["SAELens hook_resid_pre of the next block"]).cfg.layer == LAYER  # resid_pre of block 2 is lm:1


def test_index_steer_and_attribute_agree_with_the_native_sae(world, tmp_path):
    root, images, foreign = world
    img = sorted(images.iterdir())[1]
    ref_examples, ref_manifest = index_tensors(root, images, root / "native", "native")
    ref_steer = steer(SteerConfig(model=tiny_model("llava"), sae=str(root / "native"), feature=[5], value=[25.0], mode="add",
                                  prompt=["what is it?"], image=[str(img)], out=str(tmp_path / "s-native"), max_new_tokens=4,
                                  device="cpu"))
    ref_att = attribute(AttributeConfig(model=tiny_model("llava"), sae=str(root / "native"), prompt="what colour?",
                                        answer="red", image=str(img), out=str(tmp_path / "a-native"), check=2, device="cpu"))
    assert ref_manifest["site"] == f"lm:{LAYER}" and ref_steer[0]["steered"] != ref_steer[0]["clean"]
    for i, (name, folder) in enumerate(foreign.items()):
        examples, manifest = index_tensors(root, images, folder, f"f{i}")
        assert manifest["site"] == f"lm:{LAYER}" and manifest["layer"] == LAYER, name
        assert examples.keys() == ref_examples.keys()
        for key in examples:
            torch.testing.assert_close(examples[key], ref_examples[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
        rows = steer(SteerConfig(model=tiny_model("llava"), sae=str(folder), feature=[5], value=[25.0], mode="add",
                                 prompt=["what is it?"], image=[str(img)], out=str(tmp_path / f"s{i}"), max_new_tokens=4,
                                 device="cpu"))
        assert (rows[0]["site"], rows[0]["steered"], rows[0]["clean"]) == (f"lm:{LAYER}", ref_steer[0]["steered"], ref_steer[0]["clean"]), name
        att = attribute(AttributeConfig(model=tiny_model("llava"), sae=str(folder), prompt="what colour?", answer="red",
                                        image=str(img), out=str(tmp_path / f"a{i}"), check=2, device="cpu"))
        assert att["site"] == f"lm:{LAYER}", name
        assert [r["feature"] for r in att["top_features"]] == [r["feature"] for r in ref_att["top_features"]], name
        assert att["objective"] == pytest.approx(ref_att["objective"], abs=1e-6)
