"""Matryoshka SAEs: the nested-prefix loss, planted hierarchical features, files, bad input, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mmsae.cli import main as cli_main
from mmsae.errors import MmsaeError
from mmsae.sae import load_sae
from mmsae.sae.kernels import sparse_decode_groups
from mmsae.sae.model import SaeConfig, SparseAutoencoder
from mmsae.sae.synthetic import generate_hierarchical
from mmsae.train import SaeTrainingStep, TrainConfig, matryoshka_group_sizes, train


def dense_prefix_fvus(sae: SparseAutoencoder, x: torch.Tensor, arch: str, groups: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference: dense latents, then each prefix's reconstruction's FVU (and the full reconstruction)."""
    pre = (x - sae.b_dec) @ sae.encoder.weight.t() + sae.encoder.bias
    k = sae.cfg.k
    if arch == "topk":
        top = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    else:  # batchtopk: the batch's k * B largest activations
        acts = pre.relu()
        z = acts * (acts >= acts.flatten().topk(k * x.shape[0]).values.min())
    variance = (x - x.mean(0)).pow(2).sum()
    ends = torch.tensor(groups).cumsum(0).tolist()
    fvus = torch.stack([(z[:, :end] @ sae.W_dec[:end] + sae.b_dec - x).pow(2).sum() / variance for end in ends])
    return fvus, z @ sae.W_dec + sae.b_dec


def dense_auxk(sae: SparseAutoencoder, x: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK on the whole SAE's residual: the top d/2 dead latents reconstruct it, over its variance."""
    pre = (x - sae.b_dec) @ sae.encoder.weight[dead].t() + sae.encoder.bias[dead]
    top = pre.topk(min(sae.cfg.d_in // 2, len(dead)), dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    residual = (x - recon).detach()
    return (z @ sae.W_dec[dead] - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_auxk", [False, True])
def test_loss_and_gradients_equal_a_dense_float64_reference(arch, with_auxk):
    torch.manual_seed(0)
    d, n, k, batch, groups = 6, 12, 3, 10, [2, 4, 6]
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=k, architecture=arch, matryoshka_groups=groups), dtype=torch.float64)
    with torch.no_grad():
        sae.encoder.weight.normal_()
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(batch, d, dtype=torch.float64)
    variance = (x - x.mean(0)).pow(2).sum()
    # candidates = every latent: BatchTopK's cut is then the exact global one
    dead = torch.tensor([0, 5, 7, 11])
    dead_mask = torch.zeros(n, dtype=torch.bool).index_fill(0, dead, True) if with_auxk else None
    step = SaeTrainingStep(sae, TrainConfig(out="unused", batchtopk_candidates=n, auxk_coefficient=0.5))
    loss, parts = step(x, dead_mask, variance, 1)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)

    fvus, recon = dense_prefix_fvus(sae, x, arch, groups)
    assert fvus.std() > 0.1 * fvus.mean()  # the prefixes differ: a plain FVU would not match
    reference = fvus.mean()  # the mean over prefixes, the last being the whole SAE
    if with_auxk:
        auxk = dense_auxk(sae, x, recon, dead)
        assert float(parts["auxk_part"]) == pytest.approx(float(auxk), rel=1e-6) and float(auxk) > 0
        reference = reference + 0.5 * auxk
    reference.backward()
    # (the kernels take activations through float32, hence 1e-6 and not 1e-12)
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    assert float(parts["fvu_part"]) == pytest.approx(float(fvus[-1]), rel=1e-6)
    for name, p in sae.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6 * float(p.grad.abs().max())), name


def test_group_decode_kernel_matches_dense_per_group_products():
    torch.manual_seed(1)
    batch, k, n, d = 9, 5, 20, 4
    indices = torch.stack([torch.randperm(n)[:k] for _ in range(batch)])
    values = torch.randn(batch, k, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    ends = torch.tensor([3, 8, 20])
    out = sparse_decode_groups(values, indices, weight, ends)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    got_values, got_weight = values.grad.clone(), weight.grad.clone()
    values.grad = weight.grad = None
    dense = torch.zeros(batch, n, dtype=torch.float64).scatter(1, indices, values)
    reference = torch.stack([dense[:, a:b] @ weight[a:b] for a, b in [(0, 3), (3, 8), (8, 20)]], dim=1)
    (reference * upstream).sum().backward()
    assert torch.allclose(out, reference, atol=1e-12)
    assert torch.allclose(got_values, values.grad, atol=1e-12) and torch.allclose(got_weight, weight.grad, atol=1e-12)


def test_k_anneals_from_the_width_down_to_k():
    from mmsae.train import annealed_k

    sae_cfg = SaeConfig(d_in=64, num_latents=256, k=4)
    cfg = TrainConfig(out="unused", k=4, k_anneal_steps=10)
    ks = [annealed_k(cfg, sae_cfg, step) for step in range(12)]
    assert ks[0] == 64 and ks[5] == 34 and ks[10:] == [4, 4]
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert annealed_k(TrainConfig(out="unused", k=4), sae_cfg, 0) == 4  # off by default


def test_one_group_is_the_plain_fvu():
    torch.manual_seed(2)
    x = torch.randn(32, 8)
    variance = (x - x.mean(0)).pow(2).sum()
    losses = []
    for groups in (None, [64]):
        sae = SparseAutoencoder(SaeConfig(d_in=8, num_latents=64, k=4, matryoshka_groups=groups))
        sae.reset_parameters(torch.Generator().manual_seed(0))
        losses.append(float(SaeTrainingStep(sae, TrainConfig(out="unused"))(x, None, variance, 1)[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# --- ground truth: planted hierarchical features --------------------------------------------------


def best_cosines(directions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    rows = rows / rows.norm(dim=1, keepdim=True)
    return (directions @ rows.t()).max(dim=1).values


def train_batchtopk(tmp_path, acts: torch.Tensor, name: str, groups: list[int] | None) -> torch.Tensor:
    """Decoder rows of a 32-latent BatchTopK SAE (k = 2, about the data's L0 of 2.1), k annealed
    from the width over the first half (without it, which latent takes which parent is decided
    by the initialisation, and the first group found all four parents in 1 of 8 seeds)."""
    cfg = TrainConfig(out=str(tmp_path / name), architecture="batchtopk", num_latents=32, k=2, batch_size=256, steps=500,
                      k_anneal_steps=250, warmup=10, lr=4e-3, dead_tokens=5000, progress=False, log_every=100,
                      checkpoint_every=10**6, init_tokens=2048, matryoshka_groups=groups)
    train(cfg, source=acts)
    return load_sae(tmp_path / name).W_dec.detach()


def test_first_group_learns_the_parents_and_the_rest_the_children(tmp_path):
    # 4 parents, each with 4 children; a child fires only with its parent and adds its own direction
    acts, parents, children = generate_hierarchical(d=64, parents=4, children=4, tokens=40_000, seed=0)
    untrained = SparseAutoencoder(SaeConfig(d_in=64, num_latents=32, k=2))
    untrained.reset_parameters(torch.Generator().manual_seed(0))  # the training seed: no planted row to start from
    assert best_cosines(torch.cat([parents, children]), untrained.W_dec.detach()).max() < 0.6

    rows = train_batchtopk(tmp_path, acts, "matryoshka", [4, 28])
    assert best_cosines(parents, rows[:4]).min() > 0.9  # the first group alone: the parents
    assert best_cosines(children, rows[4:]).min() > 0.9  # the rest: each child's own direction

    # contrast: a plain BatchTopK SAE of the same width and schedule absorbs parents into children
    # (a latent for parent + child), so most child directions have no latent of their own
    plain = train_batchtopk(tmp_path, acts, "plain", None)
    assert (best_cosines(children, plain) > 0.9).float().mean() < 0.75


# --- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("layout", ["sparsify", "saelens"])
def test_round_trip_keeps_the_groups_and_encodes_identically(tmp_path, arch, layout):
    torch.manual_seed(3)
    sae = SparseAutoencoder(SaeConfig(d_in=16, num_latents=64, k=4, architecture=arch, matryoshka_groups=[8, 16, 40]))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if arch == "batchtopk":
            sae.threshold.uniform_(0.0, 0.3)
    sae.save(tmp_path / "sae", layout=layout)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # what other tools read: a plain TopK (sparsify) / TopK or JumpReLU (SAELens) SAE
    if layout == "sparsify":
        assert cfg["activation"] == "topk" and cfg["matryoshka_groups"] == [8, 16, 40]
    else:
        assert cfg["architecture"] == ("topk" if arch == "topk" else "jumprelu")
        assert cfg["metadata"]["mmsae"]["matryoshka_groups"] == [8, 16, 40]
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.matryoshka_groups == [8, 16, 40] and loaded.cfg.architecture == arch
    x = torch.randn(13, 16)
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-6)
    v1, i1 = loaded.encode_sparse(x)
    v2, i2 = sae.encode_sparse(x)
    assert torch.equal(i1, i2) and torch.allclose(v1, v2, atol=1e-6)
    assert torch.allclose(loaded(x), sae(x), atol=1e-6)


# --- bad input --------------------------------------------------------------------------------------


def test_bad_groups_are_one_line_errors_naming_the_option(tmp_path):
    acts = torch.randn(2048, 8)
    base = dict(out=str(tmp_path / "sae"), num_latents=32, k=2, batch_size=128, steps=2, progress=False, init_tokens=256)
    cases = [(dict(matryoshka_groups=[8, 16]), "--matryoshka-groups 8 16 .*sum to the number of latents \\(32\\)"),
             (dict(matryoshka_groups=[0, 32]), "--matryoshka-groups .*(positive|at least 1)"),
             (dict(matryoshka_groups=[8, 24], architecture="jumprelu"), "--matryoshka-groups needs --architecture topk or batchtopk"),
             (dict(matryoshka_fractions=[0.5, 0.4]), "--matryoshka-fractions 0.5 0.4 must be positive and sum to 1"),
             (dict(matryoshka_fractions=[0.01, 0.99]), "--matryoshka-fractions .* leave a group empty at 32 latents"),
             (dict(matryoshka_groups=[8, 24], matryoshka_fractions=[0.25, 0.75]), "not both")]
    for options, message in cases:
        with pytest.raises(MmsaeError, match=message) as err:
            train(TrainConfig(**base, **options), source=acts)
        assert "\n" not in str(err.value)
    # resuming with other groups is refused
    train(TrainConfig(**base, matryoshka_groups=[8, 24], checkpoint_every=1), source=acts)
    with pytest.raises(MmsaeError, match="different matryoshka_groups"):
        train(TrainConfig(**{**base, "steps": 4}, matryoshka_groups=[16, 16]), source=acts)


def test_fractions_become_sizes_that_sum_to_the_width():
    def sizes(fractions, n):
        return matryoshka_group_sizes(TrainConfig(out="unused", matryoshka_fractions=fractions), n)

    assert sizes([0.25, 0.75], 32) == [8, 24]
    assert sizes([1 / 3, 1 / 3, 1 / 3], 100) == [33, 34, 33]
    assert sum(sizes([0.03125, 0.0625, 0.125, 0.25, 0.53125], 24576)) == 24576


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_trains_a_matryoshka_sae(tmp_path, capsys):
    common = ["train", "--activations", "synthetic:d=16,m=32,k=2,tokens=4096", "--num-latents", "32", "--k", "2",
              "--batch-size", "128", "--steps", "6", "--no-progress", "--init-tokens", "512"]
    assert cli_main(common + ["--out", str(tmp_path / "a"), "--architecture", "batchtopk", "--matryoshka-groups", "8", "24"]) == 0
    assert json.loads((tmp_path / "a" / "cfg.json").read_text())["matryoshka_groups"] == [8, 24]
    assert load_sae(tmp_path / "a").cfg.architecture == "batchtopk"
    assert cli_main(common + ["--out", str(tmp_path / "b"), "--matryoshka-fractions", "0.25", "0.75"]) == 0
    assert load_sae(tmp_path / "b").cfg.matryoshka_groups == [8, 24]
    assert cli_main(common + ["--out", str(tmp_path / "c"), "--matryoshka-groups", "8", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--matryoshka-groups 8 8" in err and len(err.splitlines()) == 1
