"""The SAE model, its sparse kernels (against dense float64 references) and its file formats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mmsae.errors import MmsaeError
from mmsae.sae import SaeConfig, SparseAutoencoder, load_sae
from mmsae.sae.kernels import sparse_decode, sparse_encode, topk_preactivations


def random_sae(arch: str = "topk", d: int = 16, n: int = 64, k: int = 4, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=k, architecture=arch, model="m", layer=3, hook_point="layers.3"))
    with torch.no_grad():
        sae.encoder.weight.normal_(0, 0.25)
        sae.encoder.bias.normal_(0, 0.5)
        sae.b_dec.normal_()
        if arch != "topk":
            sae.threshold.uniform_(2.0, 2.5)  # high enough that at most k fire on these inputs
    return sae


# --- kernels -----------------------------------------------------------------------------------


def test_topk_preactivations_match_dense_topk_across_blocks(monkeypatch):
    import mmsae.sae.kernels as kernels

    monkeypatch.setattr(kernels, "_ENCODE_CHUNK_ELEMENTS", 10 * 7)  # blocks of 7 latents (the last one 1)
    x, w, b = torch.randn(10, 8), torch.randn(50, 8), torch.randn(50)
    values, indices = topk_preactivations(x, w, b, 5)
    ref = (x @ w.T + b).topk(5, dim=-1)
    assert torch.allclose(values.sort(-1).values, ref.values.sort(-1).values, atol=1e-5)
    assert torch.equal(indices.sort(-1).values, ref.indices.sort(-1).values)


def test_sparse_kernel_gradients_equal_dense_float64_reference():
    torch.manual_seed(1)
    B, d, n, k = 7, 6, 20, 4
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    w_enc = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(n, dtype=torch.float64, requires_grad=True)
    w_dec = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, d, dtype=torch.float64)

    pre_values, indices = sparse_encode(x, w_enc, b_enc, k)
    out = sparse_decode(pre_values.relu(), indices, w_dec)
    ((out - target) ** 2).sum().backward()
    ours = [t.grad.clone() for t in (x, w_enc, b_enc, w_dec)]
    for t in (x, w_enc, b_enc, w_dec):
        t.grad = None

    pre = x @ w_enc.T + b_enc  # dense reference: mask of the same top-k
    mask = torch.zeros_like(pre).scatter(1, pre.topk(k, dim=-1).indices, 1.0)
    dense_out = (pre.relu() * mask) @ w_dec
    assert torch.allclose(out, dense_out, atol=1e-12)
    ((dense_out - target) ** 2).sum().backward()
    for mine, ref in zip(ours, (x.grad, w_enc.grad, b_enc.grad, w_dec.grad)):
        assert torch.allclose(mine, ref, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_kernels_take_half_precision_weights(dtype):
    torch.manual_seed(2)
    B, d, n, k = 6, 8, 30, 3
    leaves = [torch.randn(shape).to(dtype).requires_grad_() for shape in ((B, d), (n, d), (n,), (n, d))]
    values, indices = sparse_encode(*leaves[:3], k)
    sparse_decode(values.relu(), indices, leaves[3]).float().pow(2).sum().backward()
    # the same in float32 from the same (rounded) numbers, with the same active set
    ref = [t.detach().float().requires_grad_() for t in leaves]
    pre = ref[0] @ ref[1].T + ref[2]
    mask = torch.zeros_like(pre).scatter(1, indices, 1.0)
    ((pre.relu() * mask) @ ref[3]).pow(2).sum().backward()
    for mine, theirs in zip(leaves, ref):
        assert mine.grad.dtype == dtype
        assert torch.allclose(mine.grad.float(), theirs.grad, rtol=0.05, atol=0.05 * float(theirs.grad.abs().max()))


# --- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_encode_decode_agree_and_match_a_plain_reference(arch):
    sae = random_sae(arch, k=8)
    x = torch.randn(3, 5, 16)
    dense = sae.encode(x)
    values, indices = sae.encode_sparse(x)
    assert dense.shape == (3, 5, 64) and values.shape == indices.shape == (3, 5, 8)
    pre = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    if arch == "topk":
        ref = torch.zeros_like(pre).scatter(-1, pre.topk(8, dim=-1).indices, pre.topk(8, dim=-1).values.relu())
    else:
        ref = pre.relu() * (pre > sae.threshold)
    assert torch.allclose(dense, ref, atol=1e-5)
    assert ((dense > 0).sum(-1) <= 8).all() and (dense > 0).sum() >= 10
    recon = ref @ sae.W_dec + sae.b_dec
    assert torch.allclose(sae.decode(dense), recon, atol=1e-4)
    assert torch.allclose(sae.decode_sparse(values, indices), recon, atol=1e-4)
    assert torch.allclose(sae(x), recon, atol=1e-4)


def test_fold_scale_gives_the_same_sae_on_raw_inputs():
    sae = random_sae("topk")
    x = torch.randn(9, 16)
    scale = 0.37
    on_scaled = sae(x * scale) / scale
    latents_scaled = sae.encode(x * scale) / scale
    sae.fold_scale(scale)
    assert torch.allclose(sae(x), on_scaled, atol=1e-4)
    assert torch.allclose(sae.encode(x), latents_scaled, atol=1e-4)
    assert sae.cfg.input_scale == pytest.approx(scale)


def test_config_errors_are_one_line():
    with pytest.raises(MmsaeError, match="k=100"):
        SaeConfig(d_in=4, num_latents=8, k=100)
    with pytest.raises(MmsaeError, match="architecture"):
        SaeConfig(d_in=4, architecture="relu")
    sae = random_sae()
    with pytest.raises(MmsaeError, match="width 5"):
        sae.encode(torch.randn(2, 5))


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("layout", ["sparsify", "saelens"])
def test_round_trip_keeps_encode_and_decode(tmp_path, arch, layout):
    sae = random_sae(arch)
    sae.save(tmp_path / "sae", layout=layout)
    names = {p.name for p in (tmp_path / "sae").iterdir()}
    assert names == {"cfg.json", "sae.safetensors" if layout == "sparsify" else "sae_weights.safetensors"}
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.architecture == arch
    assert (loaded.cfg.model, loaded.cfg.layer, loaded.cfg.hook_point, loaded.cfg.k) == ("m", 3, "layers.3", 4)
    x = torch.randn(11, 16)
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
    v1, i1 = loaded.encode_sparse(x)
    v2, i2 = sae.encode_sparse(x)
    assert torch.allclose(loaded.decode_sparse(v1, i1), sae.decode_sparse(v2, i2), atol=1e-5)
    assert torch.allclose(loaded(x), sae(x), atol=1e-5)


def test_sparsify_cfg_keys_and_tensor_layout(tmp_path):
    sae = random_sae("topk")
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    for key, value in {"d_in": 16, "num_latents": 64, "k": 4, "expansion_factor": 4, "normalize_decoder": True}.items():
        assert cfg[key] == value
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "s" / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in t.items()} == {"encoder.weight": (64, 16), "encoder.bias": (64,), "W_dec": (64, 16), "b_dec": (16,)}


def test_loads_a_plain_sparsify_folder_per_hook_point(tmp_path):
    """sparsify writes one sub-folder per hook point with its own (smaller) cfg keys."""
    torch.manual_seed(0)
    d, n, k = 8, 32, 3
    w_enc, b_enc, w_dec, b_dec = torch.randn(n, d), torch.randn(n), torch.randn(n, d), torch.randn(d)
    for hook in ("layers.1", "layers.2"):
        folder = tmp_path / "repo" / hook
        folder.mkdir(parents=True)
        (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                     "num_latents": n, "k": k, "multi_topk": False, "skip_connection": False,
                                                     "transcode": False, "d_in": d}))
        save_file({"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(folder / "sae.safetensors"))
    with pytest.raises(MmsaeError, match="several hook points"):
        load_sae(tmp_path / "repo")
    sae = load_sae(tmp_path / "repo", hook_point="layers.2")
    assert sae.cfg.hook_point == "layers.2"
    x = torch.randn(5, d)
    pre = (x - b_dec) @ w_enc.T + b_enc  # sparsify: relu then top-k
    acts = pre.relu()
    top = acts.topk(k, dim=-1)
    ref = torch.zeros_like(acts).scatter(-1, top.indices, top.values) @ w_dec + b_dec
    assert torch.allclose(sae(x), ref, atol=1e-5)
    with pytest.raises(MmsaeError, match="no SAE for hook point"):
        load_sae(tmp_path / "repo", hook_point="layers.9")


def test_loads_saelens_pre_v6_and_no_b_dec_on_input(tmp_path):
    torch.manual_seed(0)
    d, n = 8, 24
    w_enc, b_enc, w_dec, b_dec = torch.randn(d, n), torch.randn(n), torch.randn(n, d), torch.randn(d)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": n, "hook_point": "blocks.5.hook_resid_pre", "hook_point_layer": 5,
                                                 "model_name": "gpt2", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
                                                 "apply_b_dec_to_input": False, "normalize_activations": "none"}))
    save_file({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder)
    # hook_resid_pre of block 5 reads the output of block 4: mmsae's layer 4 (SAELens' hook_point_layer says 5)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.layer, sae.cfg.model) == ("topk", 3, 4, "gpt2")
    x = torch.randn(6, d)
    pre = x @ w_enc + b_enc  # no b_dec subtracted on the way in
    top = pre.topk(3, dim=-1)
    ref = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ w_dec + b_dec
    assert torch.allclose(sae(x), ref, atol=1e-4)


def test_loads_saelens_v6_jumprelu(tmp_path):
    torch.manual_seed(0)
    d, n = 8, 24
    w_enc, b_enc, w_dec, b_dec, thr = torch.randn(d, n), torch.randn(n), torch.randn(n, d), torch.randn(d), torch.rand(n) * 2
    folder = tmp_path / "jr"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": n, "architecture": "jumprelu", "dtype": "float32", "device": "cpu",
                                                 "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                                                 "metadata": {"sae_lens_version": "6.5.0", "model_name": "gemma", "hook_name": "blocks.7.hook_resid_post"}}))
    save_file({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec, "threshold": thr}, str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder)
    assert (sae.cfg.architecture, sae.cfg.layer, sae.cfg.hook_point) == ("jumprelu", 7, "blocks.7.hook_resid_post")
    x = torch.randn(6, d)
    pre = (x - b_dec) @ w_enc + b_enc
    ref = (pre.relu() * (pre > thr)) @ w_dec + b_dec
    assert torch.allclose(sae(x), ref, atol=1e-4)


def test_bad_folders_are_one_line_errors(tmp_path):
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "cfg.json").write_text(json.dumps({"hidden": 3, "width": 9}))
    with pytest.raises(MmsaeError, match="unknown SAE format"):
        load_sae(tmp_path / "unknown")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmsaeError, match="no cfg.json"):
        load_sae(tmp_path / "empty")
    random_sae().save(tmp_path / "broken")
    (tmp_path / "broken" / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(MmsaeError, match="not a readable safetensors"):
        load_sae(tmp_path / "broken")
    with pytest.raises(MmsaeError):
        load_sae(str(tmp_path / "does" / "not" / "exist"))
