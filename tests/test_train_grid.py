"""`mmsae train` grids: several SAEs (settings x stores) trained from one pass over the activations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmsae.activations import ActivationStore, HarvestConfig, harvest
from mmsae.cli import main as cli_main
from mmsae.errors import MmsaeError
from mmsae.sae import SparseAutoencoder, load_sae
from mmsae.sae.synthetic import SyntheticConfig, generate
from mmsae.train import TrainConfig, train
from test_sae_train import crash_after, weights, write_store
from tiny_models import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    return generate(SyntheticConfig(d=16, m=32, k=2, tokens=8000, noise=0.01, seed=0))[0]


def cfg(out, **kw) -> TrainConfig:
    # dead_tokens 512: AuxK acts from step 3 on, so the dead-latent counters must be each member's own
    base = dict(out=str(out), expansion=2, k=2, batch_size=128, steps=12, warmup=2, lr=4e-3, dead_tokens=512, auxk_coefficient=1 / 32,
                progress=False, log_every=2, checkpoint_every=4, init_tokens=1024)
    base.update(kw)
    return TrainConfig(**base)


def log(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "train_log.jsonl").read_text().splitlines()]


def assert_same_sae(a, b) -> None:
    ta, tb = weights(a), weights(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), (a, b, name, (ta[name] - tb[name]).abs().max())
    assert log(a) == log(b)


def test_each_grid_member_equals_the_same_sae_trained_alone(tmp_path, acts):
    saes = train(cfg(tmp_path / "grid", architecture=["topk", "batchtopk"], expansion=[2, 4], k=[2, 3]), source=acts)
    names = [f"{a}-x{e}-k{k}" for a in ("topk", "batchtopk") for e in (2, 4) for k in (2, 3)]
    assert list(saes) == names and all(isinstance(sae, SparseAutoencoder) for sae in saes.values())
    grid = {n: tmp_path / "grid" / n for n in names}
    assert not (tmp_path / "grid" / "cfg.json").exists()
    for name, arch, expansion, k in (("batchtopk-x4-k3", "batchtopk", 4, 3), ("topk-x2-k2", "topk", 2, 2)):
        train(cfg(tmp_path / name, architecture=arch, expansion=expansion, k=k), source=acts)
        assert_same_sae(grid[name], tmp_path / name)
        sae = load_sae(grid[name])
        assert (sae.cfg.architecture, sae.cfg.num_latents, sae.cfg.k) == (arch, 16 * expansion, k)
    # the summary: one row per member with its settings and its last logged figures
    summary = json.loads((tmp_path / "grid" / "grid.json").read_text())
    assert summary["complete"] and [r["folder"] for r in summary["members"]] == names
    for row in summary["members"]:
        last = log(grid[row["folder"]])[-1]
        assert (row["fvu"], row["l0"], row["dead_fraction"], row["steps"]) == (last["fvu"], last["l0"], last["dead_fraction"], 12)
        assert row["status"] == "done" and row["seconds"] > 0
    table = (tmp_path / "grid" / "grid.md").read_text().splitlines()
    assert table[0].startswith("# mmsae train grid") and sum(line.startswith("| batchtopk-x4-k3 |") for line in table) == 1


def test_an_interrupted_grid_resumes_every_member(tmp_path, acts):
    options = dict(expansion=[2, 4], k=3)
    train(cfg(tmp_path / "whole", **options), source=acts)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut", **options), source=acts, on_step=crash_after(6))
    for name in ("x2-k3", "x4-k3"):
        assert [p.name for p in (tmp_path / "cut" / name / "checkpoints").iterdir()] == ["step-000000004"]
    # members need not be at one step: x4 starts over while x2 resumes at step 4
    shutil.rmtree(tmp_path / "cut" / "x4-k3" / "checkpoints")
    train(cfg(tmp_path / "cut", **options), source=acts)
    for name in ("x2-k3", "x4-k3"):
        assert_same_sae(tmp_path / "whole" / name, tmp_path / "cut" / name)
        assert [r["step"] for r in log(tmp_path / "cut" / name)] == [2, 4, 6, 8, 10, 12]


def test_one_combination_is_the_plain_run_byte_for_byte(tmp_path, acts):
    assert TrainConfig(out="x", expansion=[4], k=[3], activations=["s"]).expansion == 4
    synthetic = "synthetic:d=16,m=32,k=2,tokens=8000"
    flags = ["--batch-size", "128", "--steps", "6", "--log-every", "2", "--init-tokens", "1024", "--no-progress",
             "--activations", synthetic]
    assert cli_main(["train", "--out", str(tmp_path / "cli"), "--expansion", "4", "--k", "3", *flags]) == 0
    sae = train(TrainConfig(out=str(tmp_path / "api"), activations=synthetic, expansion=4, k=3, batch_size=128, steps=6,
                              log_every=2, init_tokens=1024, progress=False))
    plain = tmp_path / "api"
    assert isinstance(sae, SparseAutoencoder) and torch.equal(sae.W_dec, load_sae(plain).W_dec)  # the SAE, as saved
    for name in ("cfg.json", "sae.safetensors", "train_log.jsonl"):
        assert (tmp_path / "cli" / name).read_bytes() == (plain / name).read_bytes(), name
    state = [json.loads((folder / "train_state.json").read_text()) for folder in (tmp_path / "cli", plain)]
    for s in state:
        s.pop("run_seconds"), s["config"].pop("out")
    assert state[0] == state[1] and state[0]["config"]["k"] == 3
    assert not (tmp_path / "cli" / "grid.json").exists()


def test_a_store_is_read_once_for_the_whole_grid(tmp_path, acts, monkeypatch):
    write_store(tmp_path / "store", acts[:4000], shard_size=500)
    loads = []
    original = ActivationStore.load_shard
    monkeypatch.setattr(ActivationStore, "load_shard", lambda self, *a, **kw: loads.append(1) or original(self, *a, **kw))
    store = dict(activations=str(tmp_path / "store"), steps=None, max_tokens=3840)  # one pass: 30 steps
    train(cfg(tmp_path / "one", **store))
    alone = len(loads)
    loads.clear()
    train(cfg(tmp_path / "three", expansion=[1, 2, 4], **store))
    assert len(loads) == alone > 0
    assert_same_sae(tmp_path / "three" / "x2-k2", tmp_path / "one")


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> dict[str, ActivationStore]:
    folder = tmp_path_factory.mktemp("grid-images")
    for i in range(4):
        Image.new("RGB", (24 + 7 * i, 40 - 3 * i), (40 * i, 90, 255 - 30 * i)).save(folder / f"img{i}.png")
    out = tmp_path_factory.mktemp("grid-stores") / "acts"
    return harvest(HarvestConfig(model=tiny_model("llava"), data=str(folder), out=str(out), site=["lm:1", "vision:1"],
                                 batch_size=2, shard_size=40))


def test_several_stores_train_a_grid_per_site(tmp_path, two_sites):
    stores = [str(two_sites[s].path) for s in ("lm:1", "vision:1")]
    options = dict(batch_size=16, steps=3, warmup=1, init_tokens=64, auxk_coefficient=0.0)
    saes = train(cfg(tmp_path / "grid", activations=stores, k=[2, 3], **options))
    assert set(saes) == {"lm-1/x2-k2", "lm-1/x2-k3", "vision-1/x2-k2", "vision-1/x2-k3"}
    for name, sae in saes.items():
        folder = tmp_path / "grid" / name
        site = name.split("/")[0].replace("-", ":")
        assert (sae.cfg.site, sae.cfg.d_in, sae.cfg.k) == (site, two_sites[site].d, int(name[-1]))
        assert json.loads((folder / "train_state.json").read_text())["source"] == str(two_sites[site].path)
    train(cfg(tmp_path / "alone", activations=stores[1], k=3, **options))
    assert_same_sae(tmp_path / "grid" / "vision-1" / "x2-k3", tmp_path / "alone")
    # one combination at several sites: a folder per site
    per_site = train(cfg(tmp_path / "sites", activations=stores, **options))
    assert list(per_site) == ["lm-1", "vision-1"] and per_site["vision-1"].cfg.site == "vision:1"
    rows = json.loads((tmp_path / "sites" / "grid.json").read_text())["members"]
    assert [(r["folder"], r["site"]) for r in rows] == [("lm-1", "lm:1"), ("vision-1", "vision:1")]


def test_a_diverging_member_stops_alone(tmp_path, acts):
    with pytest.raises(MmsaeError, match=r"^1 of 2 SAEs diverged \(x2-k2-lr1e\+30: training diverged at step \d+") as e:
        train(cfg(tmp_path / "grid", lr=[4e-3, 1e30], auxk_coefficient=0.0), source=acts)
    assert "\n" not in str(e.value)
    train(cfg(tmp_path / "alone", auxk_coefficient=0.0), source=acts)
    assert_same_sae(tmp_path / "grid" / "x2-k2-lr0.004", tmp_path / "alone")
    rows = {r["folder"]: r for r in json.loads((tmp_path / "grid" / "grid.json").read_text())["members"]}
    assert rows["x2-k2-lr0.004"]["status"] == "done" and rows["x2-k2-lr1e+30"]["status"].startswith("training diverged")
    assert not (tmp_path / "grid" / "x2-k2-lr1e+30" / "sae.safetensors").exists()


def test_bad_grids_are_one_line_errors(tmp_path, acts, capsys):
    cases = [
        (dict(k=[4, 4]), r"^--k 4 4 names a value twice"),
        (dict(expansion=[2, 4], num_latents=64), r"^the grid holds n64-k2 twice: --expansion has no effect"),
        (dict(k=[]), r"^--k needs at least one value"),
        (dict(k=[2, 0]), r"^--k must be at least 1"),
        (dict(architecture=["topk", "nope"]), "nope"),
    ]
    for options, message in cases:
        with pytest.raises(MmsaeError, match=message):
            train(cfg(tmp_path / "bad", **options), source=acts)
    # a single SAE's folder never takes a grid, nor a grid's folder a single SAE
    train(cfg(tmp_path / "single"), source=acts)
    with pytest.raises(MmsaeError, match=r"holds a single SAE, but a grid trains one SAE per folder"):
        train(cfg(tmp_path / "single", k=[2, 3]), source=acts)
    train(cfg(tmp_path / "grid", k=[2, 3], steps=2), source=acts)
    with pytest.raises(MmsaeError, match=r"holds a grid of SAEs \(grid.json\)"):
        train(cfg(tmp_path / "grid"), source=acts)
    # stores: one per site, one model, stores only
    for name, model in (("a", "tiny-model"), ("b", "tiny-model"), ("c", "other-model")):
        write_store(tmp_path / name, acts[:2000])
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        manifest.update(model=model, site="lm:2" if name != "c" else "lm:3")
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    stores = {n: str(tmp_path / n) for n in "abc"}
    with pytest.raises(MmsaeError, match=r"activation stores .*a and .*b are both at lm:2; give each site once"):
        train(cfg(tmp_path / "s1", activations=[stores["a"], stores["b"]]))
    with pytest.raises(MmsaeError, match=r"from different models \(other-model, tiny-model\)"):
        train(cfg(tmp_path / "s2", activations=[stores["a"], stores["c"]]))
    with pytest.raises(MmsaeError, match="must all be activation stores; synthetic:d=16"):
        train(cfg(tmp_path / "s3", activations=[stores["a"], "synthetic:d=16,m=32,k=2,tokens=4000"]))
    code = cli_main(["train", "--activations", "synthetic:d=16,m=32,k=2,tokens=4000", "--out", str(tmp_path / "cli"),
                     "--k", "2", "2", "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["mmsae train: error: --k 2 2 names a value twice; give each value of a grid once"]
