"""Nothing lost, nothing leaked: stages never delete or replace what mmsae did not write, refuse
stale or concurrent outputs, and say so when the input gives nothing to work on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fake_server import FakeChatServer
from mmsae.activations import HarvestConfig, harvest
from mmsae.cli import main as cli_main
from mmsae.errors import MmsaeError
from mmsae.explain import ExplainConfig, explain
from mmsae.index import IndexConfig, IndexWriter, build_index
from mmsae.io import read_jsonl
from mmsae.models.base import Tile, TokenLayout
from mmsae.report import DashboardConfig, build_dashboard
from mmsae.train import TrainConfig, train
from tiny_models import tiny_adapter, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NOT_OURS = "that mmsae did not write"


def _user_png(path, colour=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)
    return path.read_bytes()


# --- index -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_setup(tmp_path_factory):
    """A tiny LLaVA, a random SAE for its layer 1 and 8 images."""
    from mmsae.sae import SaeConfig, SparseAutoencoder

    root = tmp_path_factory.mktemp("outputs_index")
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (28 + 2 * i, 30, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    adapter = tiny_adapter("llava")
    torch.manual_seed(0)
    SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=16, k=2, model=tiny_model("llava"), layer=1)).save(root / "sae")
    return root


def _index_cfg(root, out, **kw):
    return IndexConfig(sae=str(root / "sae"), data=str(root), out=str(out), top_n=1, random_n=1, batch_size=2,
                       checkpoint_every=2, device="cpu", **kw)


def test_index_refuses_a_folder_of_user_images_and_overwrite_keeps_them(index_setup, tmp_path, capsys):
    out = tmp_path / "photos"
    mine = {name: _user_png(out / "images" / name, (40 * i, 90, 200)) for i, name in enumerate(["cat.png", "000000000.png"])}
    (out / "notes.txt").write_text("mine")
    code = cli_main(["index", "--sae", str(index_setup / "sae"), "--data", str(index_setup), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and NOT_OURS in err[0] and "--overwrite" in err[0]
    # --overwrite writes beside them; a user file at a copy's own name is refused, never replaced
    with pytest.raises(MmsaeError, match="000000000.png exists and was not written by mmsae index"):
        build_index(_index_cfg(index_setup, out, overwrite=True))
    assert (out / "images" / "000000000.png").read_bytes() == mine["000000000.png"]
    (out / "images" / "000000000.png").rename(out / "mine-0.png")
    index = build_index(_index_cfg(index_setup, out, overwrite=True, seed=1))  # (its random examples leave an image out)
    # the checkpoints every 2 images dropped copies no example needs any more: only its own copies
    referenced = {f"{s:09d}.png" for s in index.sample_ids()}
    assert {p.name for p in (out / "images").iterdir()} == referenced | {"cat.png"}
    assert len(referenced) < 8  # some copies were written, then dropped
    assert (out / "images" / "cat.png").read_bytes() == mine["cat.png"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine-0.png").exists()
    assert index.cfg["n_images"] == 8 and index.cfg["n_skipped"] == 0


# --- train -------------------------------------------------------------------------------------


def _train_cfg(out, **kw):
    base = dict(out=str(out), expansion=2, k=2, batch_size=64, steps=4, warmup=1, checkpoint_every=2, progress=False,
                init_tokens=256)
    return TrainConfig(**{**base, **kw})


def test_train_refuses_a_folder_with_user_files_and_overwrite_writes_beside(tmp_path):
    acts = torch.randn(1024, 8)
    out = tmp_path / "work"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "mine.txt").write_text("keep")
    (out / "notes.txt").write_text("keep too")
    with pytest.raises(MmsaeError, match=f"2 files {NOT_OURS} .*--overwrite"):
        train(_train_cfg(out), source=acts)
    train(_train_cfg(out, overwrite=True), source=acts)
    assert (out / "sae.safetensors").exists() and (out / "checkpoints" / "step-000000004").is_dir()
    # a fresh run drops its own checkpoints (and only those)
    train(_train_cfg(out, steps=2, resume=False), source=acts)
    assert not (out / "checkpoints" / "step-000000004").exists()
    assert (out / "checkpoints" / "mine.txt").read_text() == "keep" and (out / "notes.txt").read_text() == "keep too"
    # a file at a name train replaces must be mmsae's, even with --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "cfg.json").write_text('{"my": "settings"}')
    with pytest.raises(MmsaeError, match="cfg.json exists and was not written by mmsae"):
        train(_train_cfg(other, overwrite=True), source=acts)
    assert json.loads((other / "cfg.json").read_text()) == {"my": "settings"}


def _hand_store(path, complete: bool, n: int = 600, d: int = 8) -> None:
    """A one-shard store in the documented format, its harvest finished or not."""
    path.mkdir(parents=True)
    acts = torch.randn(n, d)
    idx = torch.arange(n)
    save_file({"acts": acts, "sample": idx // 10, "pos": (idx % 10).to(torch.int32), "is_image": torch.zeros(n, dtype=torch.bool),
               "tile": torch.full((n,), -1, dtype=torch.int16), "row": torch.full((n,), -1, dtype=torch.int16),
               "col": torch.full((n,), -1, dtype=torch.int16)}, str(path / "shard-0-00000.safetensors"),
              metadata={"format": "mmsae-activations"})
    shard = {"file": "shard-0-00000.safetensors", "rank": 0, "n_tokens": n, "n_image_tokens": 0,
             "first_sample": 0, "last_sample": (n - 1) // 10, "norm_sum": 0.0}
    (path / "manifest.json").write_text(json.dumps({
        "format": "mmsae-activations", "version": 1, "model": "m", "layer": 0, "hook_point": "h", "d": d,
        "dtype": "float32", "source": "s", "tokens": "all", "world": 1, "complete": complete, "shards": [shard],
        "ranks": {"0": {"samples_done": n // 10, "done": complete}}, "stats": {"n_tokens": n, "mean_norm": 1.0},
        "config": {"data": "s"}}))


def test_train_refuses_an_unfinished_store_without_allow_partial(tmp_path):
    _hand_store(tmp_path / "store", complete=False)
    with pytest.raises(MmsaeError, match=r"store .*store is incomplete.*--allow-partial"):
        train(_train_cfg(tmp_path / "sae", activations=str(tmp_path / "store")))
    assert not (tmp_path / "sae" / "sae.safetensors").exists()
    train(_train_cfg(tmp_path / "sae", activations=str(tmp_path / "store"), allow_partial=True))
    assert (tmp_path / "sae" / "sae.safetensors").exists()
    _hand_store(tmp_path / "done", complete=True)  # a finished store needs no flag
    train(_train_cfg(tmp_path / "sae2", activations=str(tmp_path / "done")))


# --- dashboard ----------------------------------------------------------------------------------


def test_dashboard_never_deletes_a_user_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "explanations.jsonl").write_text(json.dumps({"feature": 1, "explanation": "stripes"}) + "\n")
    (run / "site").mkdir()
    (run / "site" / "index.html").write_text("my own site")
    with pytest.raises(MmsaeError, match="not a dashboard folder"):
        build_dashboard(DashboardConfig(run=str(run)))
    assert (run / "site" / "index.html").read_text() == "my own site"
    # folders beside the site at the names a build once used for its working copies are not its own
    (run / "site").rename(run / "my-site")
    for name in (".site.building", ".site.old"):
        (run / name).mkdir()
        (run / name / "keep.txt").write_text(name)
    build_dashboard(DashboardConfig(run=str(run)))
    assert (run / "site" / "index.html").exists()
    for name in (".site.building", ".site.old"):
        assert (run / name / "keep.txt").read_text() == name
    build_dashboard(DashboardConfig(run=str(run)))  # a rebuild replaces its own site
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".site")) == [".site.building", ".site.old"]


# --- explain -----------------------------------------------------------------------------------


def _layout():
    r, c = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return TokenLayout(positions=torch.arange(16) + 3, tile=torch.zeros(16, dtype=torch.long), row=r.reshape(-1),
                       col=c.reshape(-1), tiles=[Tile((0, 0, 32, 32), 4, 4)], image_size=(32, 32))


def _index(path, first_sample: int = 0):
    """Features 0..2 fire on 3 images each; ``first_sample`` shifts the sample ids (another data set)."""
    rng = np.random.default_rng(first_sample)
    w = IndexWriter(path, num_latents=4, top_n=3, model="m", sae_fingerprint="abc", data="imgs")
    ids = [first_sample + s for s in range(4)]
    for s in ids:
        w.add_sample(s, Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), _layout())
    for f in range(3):
        for j in range(3):
            values = np.zeros(16)
            values[f] = 1.0 + j
            w.add_example(f, ids[(f + j) % 4], values)
    return w.finish()


def _explain(index, server, out, **kw):
    return explain(ExplainConfig(index=str(index.path), out=str(out), backend="openai", model="fake-vlm",
                                 base_url=server.base_url, api_key="k", concurrency=1, timeout=2.0, max_retries=1,
                                 retry_backoff=0.01, concepts=False, **kw))


def test_explanations_of_another_index_with_the_same_sae_are_refused(tmp_path):
    a, b = _index(tmp_path / "a"), _index(tmp_path / "b", first_sample=100)
    assert a.sae_fingerprint == b.sae_fingerprint
    out = tmp_path / "e.jsonl"
    with FakeChatServer(api_key="k") as server:
        _explain(a, server, out)
        rows = read_jsonl(out)
        with pytest.raises(MmsaeError, match=r"e.jsonl holds 3 explanations of another index"):
            _explain(b, server, out)  # their evidence ids name samples index b does not hold
        assert read_jsonl(out) == rows
        _explain(_index(tmp_path / "a2"), server, out)  # the same index rebuilt: its rows still count
        assert server.requests == 3
    assert {r["index_fingerprint"] for r in rows} == {a.fingerprint} != {b.fingerprint}
    # a row without the index's fingerprint (an older mmsae, or by hand) cannot be told apart: refused
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(json.dumps({"feature": 0, "explanation": "x", "index_fingerprint": "abc"}) + "\n")
    with FakeChatServer(api_key="k") as server, pytest.raises(MmsaeError, match="another index"):
        _explain(a, server, legacy)


def test_explain_refuses_while_another_run_holds_the_lock(tmp_path):
    index = _index(tmp_path / "ix")
    out = tmp_path / "e.jsonl"
    lock = tmp_path / "e.jsonl.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a live writer: this process
    with FakeChatServer(api_key="k") as server:
        with pytest.raises(MmsaeError, match=rf"e.jsonl is being written by process {os.getpid()}"):
            _explain(index, server, out)
        assert server.requests == 0 and not out.exists() and lock.exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    index = _index(tmp_path / "ix")
    out = tmp_path / "e.jsonl"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # that process has exited
    (tmp_path / "e.jsonl.lock").write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname()}))
    with FakeChatServer(api_key="k") as server:
        _explain(index, server, out)
    assert sorted(r["feature"] for r in read_jsonl(out)) == [0, 1, 2]
    assert not (tmp_path / "e.jsonl.lock").exists()  # released when the run ended


def test_readers_take_a_features_last_row(tmp_path):
    from mmsae.report.rundata import load_run
    from mmsae.steer import concept_keywords

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"feature": 2, "explanation": "old stripes"}, {"feature": 5, "explanation": "dots"},
            {"feature": 2, "explanation": "new circles"}]
    (run / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_run(run).explanations[2]["explanation"] == "new circles"
    assert concept_keywords(str(run / "explanations.jsonl"), 2) == ["new", "circles"]


# --- single output files -------------------------------------------------------------------------


def test_single_file_stages_never_replace_a_user_file(tmp_path):
    from mmsae.attribute import AttributeConfig, attribute
    from mmsae.evaluate import EvaluateConfig, evaluate
    from mmsae.steer import SteerConfig, steer

    out = tmp_path / "out"
    out.mkdir()
    files = {"metrics.json": '{"mine": 1}\n', "steering.jsonl": "my notes\n", "attribution.json": "[1, 2]\n",
             "explanations.jsonl": '{"feature": 1, "note": "mine"}\n'}
    for name, text in files.items():
        (out / name).write_text(text)
    # each refuses before any work (the model and SAE paths here do not even exist)
    calls = {
        "metrics.json": lambda: evaluate(EvaluateConfig(sae="no-sae", activations="no-store", out=str(out))),
        "steering.jsonl": lambda: steer(SteerConfig(model="no-model", sae="no-sae", feature=[0], prompt=["hi"], out=str(out))),
        "attribution.json": lambda: attribute(AttributeConfig(model="no-model", sae="no-sae", prompt="q", answer="a", out=str(out))),
        "explanations.jsonl": lambda: explain(ExplainConfig(index=str(_index(tmp_path / "ix").path), out=str(out))),
    }
    for name, call in calls.items():
        with pytest.raises(MmsaeError, match=rf"{name} exists and was not written by mmsae"):
            call()
    for name, text in files.items():
        assert (out / name).read_text() == text, name


def test_score_never_replaces_user_score_files(tmp_path):
    from mmsae.data.shapes import ShapesWorld
    from mmsae.score import ScoreConfig, score

    run = tmp_path / "run"
    world = ShapesWorld(seed=1, size=32)
    w = IndexWriter(run / "index", num_latents=2, top_n=3)
    for i in range(3):  # feature 0 fires on three shapes-world scenes (the oracle segmenter reads their meta)
        sample = world.sample(i)
        w.add_sample(i, sample.image, _layout(), meta=sample.meta)
        w.add_example(0, i, np.linspace(0, 1, 16))
    w.finish()
    (run / "explanations.jsonl").write_text(json.dumps({"feature": 0, "explanation": "red"}) + "\n")
    for name, text in (("scores.md", "# my scores\n"), ("scores.csv", "a,b\n1,2\n")):
        (run / name).write_text(text)
        with pytest.raises(MmsaeError, match=rf"{name} exists and was not written by mmsae"):
            score(ScoreConfig(run=str(run), scorers=["iou"], segmenter="oracle", baselines=["full_mask"]))
        assert (run / name).read_text() == text
        (run / name).unlink()


def _scored_run(run, first_sample: int = 0):
    """An index whose feature 0 fires on three shapes-world scenes, explained as "red"."""
    from mmsae.data.shapes import ShapesWorld

    world = ShapesWorld(seed=1, size=32)
    w = IndexWriter(run / "index", num_latents=2, top_n=3, data=f"shapes:{first_sample}")
    for i in range(first_sample, first_sample + 3):
        sample = world.sample(i)
        w.add_sample(i, sample.image, _layout(), meta=sample.meta)
        w.add_example(0, i, np.linspace(0, 1, 16))
    return w.finish()


def test_score_refuses_explanations_of_another_index_and_a_held_lock(tmp_path):
    from mmsae.score import ScoreConfig, score

    run = tmp_path / "run"
    index = _scored_run(run)
    other = _scored_run(tmp_path / "other", first_sample=10)
    assert other.fingerprint != index.fingerprint
    cfg = ScoreConfig(run=str(run), scorers=["iou"], segmenter="oracle", baselines=["full_mask"])
    row = {"feature": 0, "explanation": "red", "index_fingerprint": other.fingerprint}
    (run / "explanations.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(MmsaeError, match=r"explanations.jsonl holds 1 explanations of another index"):
        score(cfg)
    assert not (run / "scores.jsonl").exists()
    # the index's own rows are scored; a live lock on the output stops a second run before any work
    (run / "explanations.jsonl").write_text(json.dumps({**row, "index_fingerprint": index.fingerprint}) + "\n")
    (run / "scores.jsonl.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(MmsaeError, match=rf"scores.jsonl is being written by process {os.getpid()}"):
        score(cfg)
    assert not (run / "scores.jsonl").exists()
    (run / "scores.jsonl.lock").unlink()
    score(cfg)
    assert {r["feature"] for r in read_jsonl(run / "scores.jsonl")} == {0} and not (run / "scores.jsonl.lock").exists()


def test_folder_stages_refuse_a_user_folder(tmp_path):
    from mmsae.demo import DemoConfig
    from mmsae.demo.pipeline import run_pipeline

    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"my photo")
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(MmsaeError, match=f"1 file {NOT_OURS}.*holiday.jpg"):
        harvest(HarvestConfig(model=tiny_model("llama"), layer=0, data=str(data), out=str(out)))
    with pytest.raises(MmsaeError, match=NOT_OURS):
        run_pipeline(DemoConfig(out=str(out)), model_path="no-model")
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


# --- harvest input ------------------------------------------------------------------------------


def test_harvest_of_data_without_a_usable_sample_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = ["harvest", "--model", tiny_model("llama"), "--layer", "0"]
    code = cli_main(args + ["--data", str(empty), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("mmsae harvest: error: data ") and "holds no samples" in err[-1]
    # every image missing: an error too, and no store that later stages would take for a finished one
    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(json.dumps({"image": f"gone{i}.png", "text": "hi"}) + "\n" for i in range(3)))
    code = cli_main(["harvest", "--model", tiny_model("llava"), "--layer", "0", "--data", str(missing),
                     "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "gave no tokens to store (3 samples skipped; first: sample 0: missing file" in err[-1]
    for out in (tmp_path / "a", tmp_path / "b"):
        assert not list(out.glob("manifest.json")) and not list(out.glob("progress-*.json"))


def test_vision_language_harvest_of_text_only_data_warns_once(tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a red circle", "two squares", "blue")))
    store = harvest(HarvestConfig(model=tiny_model("llava"), layer=0, data=str(data), out=str(tmp_path / "s")))
    err = capsys.readouterr().err
    assert err.count("has no image") == 1 and "vision-language model" in err
    assert store.n_tokens > 0 and store.count("image") == 0
