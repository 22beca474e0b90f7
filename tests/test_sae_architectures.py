"""The architecture registry: JumpReLU's training loss and straight-through gradients against a
float64 reference, the threshold updates after a step, unknown names, and a fourth architecture
added by registering one class."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmsae.cli import main as cli_main
from mmsae.errors import MmsaeError
from mmsae.sae import SaeConfig, SparseAutoencoder, load_sae
from mmsae.sae.architectures import ARCHITECTURES, Architecture, Codes
from mmsae.train import SaeTrainingStep, TrainConfig, train


def test_jumprelu_loss_and_straight_through_gradients_equal_a_float64_reference():
    torch.manual_seed(0)
    d, n, batch, bw, coef = 6, 10, 40, 0.5, 0.02
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=3, architecture="jumprelu"), dtype=torch.float64)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.threshold.uniform_(0.2, 0.6)
    x = torch.randn(batch, d, dtype=torch.float64)
    variance = (x - x.mean(0)).pow(2).sum()
    loss, parts = SaeTrainingStep(sae, TrainConfig(out="unused", architecture="jumprelu", jumprelu_bandwidth=bw,
                                                   l0_coefficient=coef))(x, None, variance, 1)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)

    # reference: the active set is a constant for every parameter but the threshold ...
    thr = sae.threshold.detach()
    pre = (x - sae.b_dec) @ sae.encoder.weight.t() + sae.encoder.bias
    mask = (pre > thr).double().detach()
    acts = (pre * mask).detach().requires_grad_()  # (a leaf, for dL/d acts)
    fvu = lambda z: (z @ sae.W_dec + sae.b_dec - x).pow(2).sum() / variance  # noqa: E731
    l0 = mask.sum(-1)
    reference = fvu(pre * mask) + coef * l0.mean()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-12)
    assert float(parts["l0"]) == pytest.approx(float(l0.mean()), rel=1e-6) and 0 < float(l0.mean()) < n
    reference.backward()
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        p = dict(sae.named_parameters())[name]
        assert torch.allclose(grads[name], p.grad, atol=1e-12), name
    # ... whose gradient is the pseudo-derivative of a rectangle kernel of width bw around it:
    # d acts / d thr = -(thr / bw) * window, d l0 / d thr = -(1 / bw) * window
    fvu(acts).backward()
    window = ((pre.detach() - thr).abs() < bw / 2).double()
    expected = (acts.grad * -(thr / bw) * window).sum(0) + coef / batch * (-(1 / bw) * window).sum(0)
    assert expected.abs().max() > 0
    assert torch.allclose(grads["threshold"], expected, atol=1e-12)


def test_threshold_updates_after_a_step():
    btk = SparseAutoencoder(SaeConfig(d_in=4, num_latents=8, k=2, architecture="batchtopk"))
    state = {"threshold_initialised": False}
    with torch.no_grad():
        btk.arch.after_step(btk, {"cut": torch.tensor(2.0)}, state)  # the first cut sets it
        assert torch.equal(btk.threshold, torch.full((8,), 2.0)) and state["threshold_initialised"]
        btk.arch.after_step(btk, {"cut": torch.tensor(4.0)}, state)  # then a 1% moving average
        assert torch.allclose(btk.threshold, torch.full((8,), 2.02))
        jr = SparseAutoencoder(SaeConfig(d_in=4, num_latents=8, k=2, architecture="jumprelu"))
        jr.threshold.fill_(-1.0)
        jr.arch.after_step(jr, {}, {})  # a JumpReLU threshold stays positive
        assert torch.equal(jr.threshold, torch.full((8,), 1e-6))
    assert "threshold" in dict(jr.named_parameters()) and "threshold" in dict(btk.named_buffers())


def test_an_unknown_architecture_is_one_line_naming_the_registered_ones(tmp_path, capsys):
    message = "unknown SAE architecture 'relu'; use one of topk, batchtopk, jumprelu"
    for make in (lambda: SaeConfig(d_in=4, architecture="relu"), lambda: TrainConfig(out="x", architecture="relu")):
        with pytest.raises(MmsaeError) as err:
            make()
        assert str(err.value) == message
    argv = ["train", "--activations", "synthetic:d=8,m=16,k=2,tokens=512", "--architecture", "relu", "--out", str(tmp_path / "s")]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"mmsae train: error: {message}"


class ReLU(Architecture):
    """A fourth architecture, as a user would add it: a plain ReLU SAE with an L1 penalty."""

    # (saelens None: SAELens cannot hold it; not at_most_k: decoded densely; no Matryoshka, no AuxK)

    def activate(self, sae, values, indices):
        return values.relu()

    def encode(self, sae, x):
        return sae.pre_activations(x).relu()

    def train_encode(self, sae, centred, k, cfg, world):
        acts = F.linear(centred, sae.encoder.weight, sae.encoder.bias).relu()
        return Codes(acts, penalty=1e-3 * acts.sum() / centred.shape[0])


def test_a_fourth_architecture_is_one_registered_class(tmp_path, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "relu", ReLU)
    torch.manual_seed(0)
    acts = torch.randn(4096, 8)
    train(TrainConfig(out=str(tmp_path / "sae"), architecture="relu", expansion=2, k=4, batch_size=256, steps=6, warmup=1,
                      progress=False, init_tokens=512, log_every=3), source=acts)
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "relu"
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae.arch, ReLU) and set(sae.state_dict()) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    x = acts[:50]
    z = ((x - sae.b_dec) @ sae.encoder.weight.t() + sae.encoder.bias).relu()  # plain reference
    assert torch.allclose(sae.encode(x), z, atol=1e-5)
    assert torch.allclose(sae(x), z @ sae.W_dec + sae.b_dec, atol=1e-4)  # decoded densely: more than k fire
    assert float((z > 0).sum(-1).float().mean()) > sae.cfg.k
    with pytest.raises(MmsaeError, match="SAELens has no equivalent of a relu SAE; save it with layout='sparsify'"):
        sae.save(tmp_path / "lens", layout="saelens")
    assert not (tmp_path / "lens").exists()
    with pytest.raises(MmsaeError, match="--matryoshka-groups needs --architecture topk or batchtopk \\(not relu\\)"):
        SaeConfig(d_in=8, num_latents=16, k=4, architecture="relu", matryoshka_groups=[4, 12])
