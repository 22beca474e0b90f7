"""SAE training: ground-truth recovery, exact resume, several processes, the store, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmsae.errors import MmsaeError
from mmsae.sae import load_sae
from mmsae.activation_sources import TensorSource
from mmsae.sae.synthetic import SyntheticConfig, generate, recovery_score
from mmsae.train import TrainConfig, geometric_median, train
from tiny_models import run_in_one_and_two_processes



@pytest.fixture(scope="module")
def synthetic():
    return generate(SyntheticConfig(d=32, m=64, k=3, tokens=40_000, noise=0.01, seed=0))


def small_cfg(out, **kw) -> TrainConfig:
    base = dict(out=str(out), expansion=4, k=3, batch_size=256, steps=12, warmup=3, lr=4e-3, dead_tokens=2000, auxk_coefficient=1 / 32,
                progress=False, log_every=2, checkpoint_every=4, init_tokens=2048)
    base.update(kw)
    return TrainConfig(**base)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "sae.safetensors"))


def test_training_recovers_planted_directions(tmp_path, synthetic):
    acts, directions = synthetic
    # before training, random decoder rows recover nothing, nor does the SAE's own seeded start
    # (it once drew the planted directions themselves from the same seed)
    assert recovery_score(directions, torch.randn(128, 32))["fraction_recovered"] < 0.05
    from mmsae.sae.model import SaeConfig, SparseAutoencoder

    start = SparseAutoencoder(SaeConfig(d_in=32, num_latents=128, k=3))
    start.reset_parameters(torch.Generator().manual_seed(0))
    assert recovery_score(directions, start.W_dec.detach())["fraction_recovered"] < 0.05
    train(small_cfg(tmp_path / "sae", steps=300, warmup=10, dead_tokens=10_000, log_every=100, checkpoint_every=1000), source=acts)
    sae = load_sae(tmp_path / "sae").requires_grad_(False)
    score = recovery_score(directions, sae.W_dec)
    assert score["fraction_recovered"] >= 0.9, score
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-4)
    # the saved SAE works on raw (unscaled) activations: low FVU, exactly k active
    x = acts[:4000]
    fvu = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.15
    values, _ = sae.encode_sparse(x)
    assert values.shape == (4000, 3)
    log = [json.loads(line) for line in (tmp_path / "sae" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [100, 200, 300]
    assert set(log[0]) >= {"step", "loss", "fvu", "l0", "dead_fraction", "lr", "tokens"}
    assert log[-1]["fvu"] < log[0]["fvu"] and log[-1]["tokens"] == 300 * 256 and log[-1]["l0"] == pytest.approx(3.0)


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_other_architectures_train(tmp_path, synthetic, arch):
    acts, directions = synthetic
    train(small_cfg(tmp_path / arch, architecture=arch, steps=200, log_every=200, checkpoint_every=1000), source=acts)
    sae = load_sae(tmp_path / arch).requires_grad_(False)
    assert sae.cfg.architecture == arch
    x = acts[:2000]
    fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((sae.encode(x) > 0).sum(-1).float().mean())
    assert fvu < 0.5 and 0 < l0 < 64, (fvu, l0)
    if arch == "batchtopk":
        assert 1.0 <= l0 <= 9.0  # the learned threshold keeps about k active at inference


def crash_after(steps: int):
    """An ``on_step`` hook that interrupts the run after ``steps`` steps."""
    def on_step(done: int) -> None:
        if done == steps:
            raise KeyboardInterrupt
    return on_step


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, synthetic):
    acts, _ = synthetic
    cfg_a = small_cfg(tmp_path / "a", dead_tokens=1000)  # AuxK active: dead counters must resume too
    train(cfg_a, source=acts)

    cfg_b = small_cfg(tmp_path / "b", dead_tokens=1000)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, source=acts, on_step=crash_after(6))
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-000000004"]
    train(cfg_b, source=acts)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from mmsae.train import TrainConfig, train\n"
        "for arch in ('topk', 'batchtopk'):\n"
        "    train(TrainConfig(out=sys.argv[1] + '-' + arch, activations='synthetic:d=16,m=32,k=2,tokens=4096', expansion=2,\n"
        "                      k=2, batch_size=128, steps=6, warmup=2, lr=3e-3, dead_tokens=256, auxk_coefficient=1 / 32,\n"
        "                      progress=False,\n"
        "                      log_every=3, init_tokens=512, architecture=arch))\n"
        "train(TrainConfig(out=sys.argv[1] + '-grid', activations='synthetic:d=16,m=32,k=2,tokens=4096', expansion=2, k=[2, 3],\n"
        "                  batch_size=128, steps=6, warmup=2, lr=3e-3, dead_tokens=256, auxk_coefficient=1 / 32, progress=False,\n"
        "                  log_every=3, init_tokens=512))\n")
    run_in_one_and_two_processes(script, tmp_path)
    # dead_tokens=256: AuxK is active from step 3 on; a grid's members (mmsae.train grids) too
    for arch in ("topk", "batchtopk", "grid/x2-k2", "grid/x2-k3"):
        a, b = weights(tmp_path / f"one-{arch}"), weights(tmp_path / f"two-{arch}")
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), (arch, name, (a[name] - b[name]).abs().max())
        assert json.loads((tmp_path / f"two-{arch}" / "train_state.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "two-grid" / "grid.json").read_text())["complete"]


def write_store(path: Path, acts: torch.Tensor, shard_size: int = 1000) -> None:
    """A store in the documented format (manifest.json + shards)."""
    path.mkdir(parents=True)
    shards = []
    for i, start in enumerate(range(0, len(acts), shard_size)):
        part = acts[start:start + shard_size]
        n = len(part)
        save_file({"acts": part.contiguous(), "sample": torch.arange(start, start + n) // 10, "pos": (torch.arange(n) % 10).to(torch.int32),
                   "is_image": torch.arange(n) % 2 == 0, "tile": torch.zeros(n, dtype=torch.int16),
                   "row": torch.zeros(n, dtype=torch.int16), "col": torch.zeros(n, dtype=torch.int16)},
                  str(path / f"shard-0-{i:05d}.safetensors"))
        shards.append({"file": f"shard-0-{i:05d}.safetensors", "rank": 0, "n_tokens": n, "n_image_tokens": (n + 1) // 2,
                       "first_sample": start // 10, "last_sample": (start + n - 1) // 10, "norm_sum": 0.0})
    manifest = {"format": "mmsae-activations", "version": 1, "model": "tiny-model", "layer": 2, "hook_point": "model.layers.2",
                "d": acts.shape[1], "dtype": "float32", "source": "s", "tokens": "all", "world": 1, "complete": True,
                "shards": shards, "ranks": {"0": {"samples_done": len(acts) // 10}},
                "stats": {"n_tokens": len(acts), "mean_norm": 1.0}, "config": {"data": "s"}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_trains_from_a_store_and_records_the_hook_point(tmp_path, synthetic):
    acts, _ = synthetic
    write_store(tmp_path / "store", acts[:6000])
    train(small_cfg(tmp_path / "sae", activations=str(tmp_path / "store"), steps=None, max_tokens=2560))
    sae = load_sae(tmp_path / "sae")
    assert (sae.cfg.model, sae.cfg.layer, sae.cfg.hook_point) == ("tiny-model", 2, "model.layers.2")
    assert json.loads((tmp_path / "sae" / "train_state.json").read_text())["steps"] == 10


def test_live_training_from_a_model_and_data(tmp_path):
    from tiny_models import tiny_model

    cfg = small_cfg(tmp_path / "live", model=tiny_model("llava"), layer=1, data="shapes:6", expansion=2, k=4, batch_size=32,
                    steps=4, shuffle_buffer=64, model_batch_size=2, init_tokens=64)
    train(cfg)
    sae = load_sae(tmp_path / "live")
    assert (sae.cfg.layer, sae.cfg.hook_point, sae.cfg.d_in) == (1, "language_model.layers.1", 32)
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "live").values())
    with pytest.raises(MmsaeError, match="needs --steps or --max-tokens"):
        train(small_cfg(tmp_path / "live2", model=tiny_model("llava"), layer=1, data="shapes:6", steps=None))


def test_bad_input_is_a_one_line_error_and_keeps_checkpoints(tmp_path, synthetic):
    acts, _ = synthetic
    with pytest.raises(MmsaeError, match="larger than the number of latents"):
        train(small_cfg(tmp_path / "k", k=500), source=acts)
    with pytest.raises(MmsaeError, match="does not exist"):
        train(small_cfg(tmp_path / "x", activations=str(tmp_path / "nowhere")))

    class PoisonedAfter(TensorSource):
        """Clean batches, then NaN from step 6 on."""

        def batches(self, local_batch, seed, rank, world, skip=0):
            for step, batch in enumerate(super().batches(local_batch, seed, rank, world, skip), start=skip):
                if step >= 6:
                    batch = batch.clone()
                    batch[3, 1] = float("nan")
                yield batch

    with pytest.raises(MmsaeError, match="NaN or inf.*step 6") as err:
        train(small_cfg(tmp_path / "nan"), source=PoisonedAfter(acts, name="poisoned"))
    assert "\n" not in str(err.value)
    assert (tmp_path / "nan" / "checkpoints" / "step-000000004" / "state.json").exists()

    bad = acts[:3000].clone()
    bad[1234, 5] = float("inf")
    with pytest.raises(MmsaeError, match="row 1234"):
        train(small_cfg(tmp_path / "inf"), source=TensorSource(bad, name="acts"))

    # resuming onto activations of another width is refused
    with pytest.raises(MmsaeError, match="width 32 but the data has width 16"):
        train(small_cfg(tmp_path / "nan"), source=acts[:, :16])
    with pytest.raises(MmsaeError, match="different k"):
        train(small_cfg(tmp_path / "nan", k=4), source=acts)


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    points = torch.randn(200, 4) * 0.1 + 3.0
    points[:20] = 1000.0  # 10% far outliers pull the mean, not the median
    median = geometric_median(points)
    assert torch.allclose(median, torch.full((4,), 3.0), atol=0.1)
    assert points.mean(0)[0] > 90
