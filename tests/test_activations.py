"""Harvesting and the activation store: values, metadata, resume, ranks, budget, batch stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mmsae.activations as activations
import mmsae.hooks as hooks
from mmsae.activations import ActivationStore, HarvestConfig, harvest
from mmsae.cli import main as cli_main
from mmsae.errors import MmsaeError
from mmsae.io import no_space_error, save_tensors
from tiny_models import tiny_adapter, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """11 images of varied sizes and colours, plus one corrupt file (sorted in the middle)."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(11):
        Image.new("RGB", (24 + 5 * i, 40 - 2 * i), (23 * i % 256, 90, 255 - 20 * i)).save(folder / f"img{i:02d}.png")
    (folder / "img05b.png").write_bytes(b"not a png")
    return folder


def run(tmp_path: Path, family: str, data: Path | str, name: str = "store", **kwargs) -> ActivationStore:
    cfg = HarvestConfig(model=tiny_model(family), layer=kwargs.pop("layer", 1), data=str(data),
                        out=str(tmp_path / name), **kwargs)
    return harvest(cfg)


def shard_tensors(store: ActivationStore) -> dict[str, torch.Tensor]:
    parts = list(store.iter_shards())
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert [s["file"] for s in a.shards] == [s["file"] for s in b.shards]
    assert [s["n_tokens"] for s in a.shards] == [s["n_tokens"] for s in b.shards]
    ta, tb = shard_tensors(a), shard_tensors(b)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a.manifest["stats"] == b.manifest["stats"]


# --- harvest values and metadata ---------------------------------------------------------------


def test_llava_harvest_matches_hidden_states_and_layout(tmp_path, image_dir):
    store = run(tmp_path, "llava", image_dir, batch_size=4, shard_size=100, layer=1)
    adapter = tiny_adapter("llava")
    image_id = adapter.model.config.image_token_id
    rows, cols = 4, 4  # tiny llava: 32 px images, 8 px patches
    t = shard_tensors(store)
    paths = sorted(p.name for p in image_dir.iterdir())
    good = [i for i, name in enumerate(paths) if name != "img05b.png"]
    assert sorted(set(t["sample"].tolist())) == good
    assert store.manifest["stats"]["skipped"][0]["sample"] == paths.index("img05b.png")
    assert store.manifest["complete"] and store.d == 32 and store.cfg["hook_point"] == "language_model.layers.1"

    # recompute with the batches harvest used (4 readable images each, in id order)
    for start in range(0, len(good), 4):
        ids = good[start:start + 4]
        images = [Image.open(image_dir / paths[i]).convert("RGB") for i in ids]
        inputs = adapter.build_inputs(images, ["Describe this image."] * len(ids)).inputs
        with torch.no_grad():
            reference = adapter.model(**inputs, output_hidden_states=True).hidden_states[2]  # after layer 1
        for b, sample_id in enumerate(ids):
            mine = t["sample"] == sample_id
            pos = t["pos"][mine].long()
            valid = torch.nonzero(inputs["attention_mask"][b]).flatten()
            image_pos = torch.nonzero(inputs["input_ids"][b] == image_id).flatten()
            assert torch.equal(pos, valid)  # all = every non-padding position, in order
            torch.testing.assert_close(t["acts"][mine], reference[b, pos], rtol=0, atol=1e-6)
            is_image = t["is_image"][mine]
            assert torch.equal(pos[is_image], image_pos)
            k = torch.arange(rows * cols)
            assert torch.equal(t["row"][mine][is_image].long(), k // cols)
            assert torch.equal(t["col"][mine][is_image].long(), k % cols)
            assert (t["tile"][mine][is_image] == 0).all()
            for key in ("tile", "row", "col"):
                assert (t[key][mine][~is_image] == -1).all()

    # token kinds: image only / text only are exactly the two halves of "all"
    image_store = run(tmp_path, "llava", image_dir, name="image", tokens="image", batch_size=4, shard_size=100)
    text_store = run(tmp_path, "llava", image_dir, name="text", tokens="text", batch_size=4, shard_size=100)
    ti, tt = shard_tensors(image_store), shard_tensors(text_store)
    assert ti["is_image"].all() and not tt["is_image"].any()
    assert image_store.n_tokens == store.count("image") == len(good) * rows * cols
    assert text_store.n_tokens == store.count("text")
    torch.testing.assert_close(ti["acts"], t["acts"][t["is_image"]], rtol=0, atol=0)


def test_anyres_tiles_are_stored_as_the_adapter_lays_them_out(tmp_path):
    """LLaVA-NeXT: base image plus AnyRes crops; every image token keeps its tile, row and column."""
    sizes = [(64, 20), (20, 60), (40, 40)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (60 * i, 200, 100)).save(tmp_path / f"{i}.png")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": f"{i}.png", "text": f"picture {i}"}) + "\n" for i in range(3)))
    store = run(tmp_path, "llava_next", data, tokens="image", batch_size=1)
    t = shard_tensors(store)
    adapter = tiny_adapter("llava_next")
    for i, size in enumerate(sizes):
        layout = adapter.build_inputs([Image.open(tmp_path / f"{i}.png").convert("RGB")], [f"picture {i}"]).layouts[0]
        mine = t["sample"] == i
        order = torch.argsort(layout.positions)
        assert torch.equal(t["pos"][mine].long(), layout.positions[order])
        for key in ("tile", "row", "col"):
            assert torch.equal(t[key][mine].long(), getattr(layout, key)[order]), key
        assert len(layout.tiles) > 1 and int(t["tile"][mine].max()) == len(layout.tiles) - 1
        for k, tile in enumerate(layout.tiles):  # each tile's grid cells appear exactly once
            cells = {(int(r), int(c)) for r, c in zip(t["row"][mine][t["tile"][mine] == k], t["col"][mine][t["tile"][mine] == k])}
            assert len(cells) == int((t["tile"][mine] == k).sum()) and all(r < tile.rows and c < tile.cols for r, c in cells)


def test_causal_lm_harvest_budget_and_storage_dtype(tmp_path, text_jsonl):
    store = run(tmp_path, "llama", text_jsonl, layer=1, batch_size=2, shard_size=10**6)
    adapter = tiny_adapter("llama")
    texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()]
    t = shard_tensors(store)
    assert not t["is_image"].any() and store.count("image") == 0
    for start in range(0, len(texts), 2):
        inputs = adapter.build_inputs(None, texts[start:start + 2]).inputs
        with torch.no_grad():
            reference = adapter.model(**inputs, output_hidden_states=True).hidden_states[2]  # after layer 1
        for b in range(len(texts[start:start + 2])):
            mine = t["sample"] == start + b
            valid = torch.nonzero(inputs["attention_mask"][b]).flatten()
            assert torch.equal(t["pos"][mine].long(), valid)
            torch.testing.assert_close(t["acts"][mine], reference[b, valid], rtol=0, atol=1e-6)

    # a budget keeps exactly that many tokens: a prefix of the unlimited store
    budget = store.n_tokens // 2 + 3
    small = run(tmp_path, "llama", text_jsonl, name="budget", layer=1, batch_size=2, shard_size=7, max_tokens=budget)
    ts = shard_tensors(small)
    assert small.n_tokens == budget and small.manifest["complete"]
    assert torch.equal(ts["acts"], t["acts"][:budget]) and torch.equal(ts["pos"], t["pos"][:budget])
    assert all(s["n_tokens"] >= 7 for s in small.shards[:-1])

    # bfloat16 storage: the float32 values rounded once
    half = run(tmp_path, "llama", text_jsonl, name="bf16", layer=1, batch_size=2, store_dtype="bfloat16")
    th = shard_tensors(half)
    assert th["acts"].dtype == torch.bfloat16
    assert torch.equal(th["acts"], t["acts"].to(torch.bfloat16))
    assert next(half.batches(4, shuffle=False)).dtype == torch.float32


# --- resume ----------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def test_resume_after_interruption_equals_uninterrupted(tmp_path, image_dir, monkeypatch):
    kwargs = dict(batch_size=2, shard_size=30)
    reference = run(tmp_path, "llava", image_dir, name="ref", **kwargs)
    assert len(reference.shards) >= 4

    real_save = activations.save_tensors
    calls = {"n": 0}

    def save_then_die(path, *args, **kw):
        # the second shard reaches the disk, then the process dies before recording it
        real_save(path, *args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed

    monkeypatch.setattr(activations, "save_tensors", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path, "llava", image_dir, name="resumed", **kwargs)
    out = tmp_path / "resumed"
    progress = json.loads((out / "progress-0.json").read_text())
    assert len(progress["shards"]) == 1 and not progress["done"]
    assert (out / "shard-0-00001.safetensors").exists()  # written but not recorded
    partial = ActivationStore(out)  # readable mid-run, from the progress file
    assert not partial.complete and partial.n_tokens == progress["n_tokens"]
    (out / ".shard-0-00002.safetensors.x1.tmp").write_bytes(b"half a shard")  # a kill mid-write

    monkeypatch.setattr(activations, "save_tensors", real_save)
    resumed = run(tmp_path, "llava", image_dir, name="resumed", **kwargs)
    assert_same_store(resumed, reference)
    assert not list(out.glob(".*.tmp"))
    assert resumed.manifest["stats"]["n_skipped"] == 1


def test_disk_full_keeps_completed_shards_and_resumes(tmp_path, text_jsonl, monkeypatch):
    kwargs = dict(layer=0, batch_size=1, shard_size=1)
    reference = run(tmp_path, "llama", text_jsonl, name="ref", **kwargs)
    real_save = activations.save_tensors
    calls = {"n": 0}

    def full_disk(path, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real_save(path, *args, **kw)

    monkeypatch.setattr(activations, "save_tensors", full_disk)
    with pytest.raises(MmsaeError, match=r"no space left .*shard-0-00002.*free space and rerun"):
        run(tmp_path, "llama", text_jsonl, name="full", **kwargs)
    assert sorted(p.name for p in (tmp_path / "full").glob("shard-*")) == ["shard-0-00000.safetensors", "shard-0-00001.safetensors"]
    monkeypatch.setattr(activations, "save_tensors", real_save)
    assert_same_store(run(tmp_path, "llama", text_jsonl, name="full", **kwargs), reference)


def test_shards_are_the_bytes_a_synchronous_write_gives(tmp_path, text_jsonl):
    """The writer thread writes each shard exactly as save_tensors writes the rows computed here."""
    adapter = tiny_adapter("llama")
    texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()]
    rows = {}
    for start in range(0, len(texts), 2):  # the harvest's batches
        inputs = adapter.build_inputs(None, texts[start:start + 2]).inputs
        with torch.no_grad():
            hidden = adapter.model(**inputs, output_hidden_states=True).hidden_states[2]  # after layer 1
        for b in range(len(texts[start:start + 2])):
            pos = torch.nonzero(inputs["attention_mask"][b]).flatten()
            n, text_only = len(pos), torch.full((len(pos),), -1, dtype=torch.int16)
            rows[start + b] = {"acts": hidden[b, pos], "sample": torch.full((n,), start + b, dtype=torch.int64),
                               "pos": pos.to(torch.int32), "is_image": torch.zeros(n, dtype=torch.bool), "tile": text_only,
                               "row": text_only, "col": text_only, "token": inputs["input_ids"][b, pos].to(torch.int32)}
    for dtype in ("float32", "bfloat16"):
        store = run(tmp_path, "llama", text_jsonl, name=dtype, layer=1, batch_size=2, shard_size=7, store_dtype=dtype)
        assert len(store.shards) == 3 and store.manifest["dtype"] == dtype
        for shard in store.shards:
            parts = [rows[i] for i in range(shard["first_sample"], shard["last_sample"] + 1)]
            expected = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            expected["acts"] = expected["acts"].to(getattr(torch, dtype))
            save_tensors(tmp_path / "expected.safetensors", expected, metadata={"format": activations.FORMAT})
            assert (store.path / shard["file"]).read_bytes() == (tmp_path / "expected.safetensors").read_bytes()


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mmsae-shard-writer")]


def test_interrupt_while_shards_wait_for_the_writer_resumes_exactly(tmp_path, text_jsonl, monkeypatch):
    kwargs = dict(layer=0, batch_size=1, shard_size=1)
    reference = run(tmp_path, "llama", text_jsonl, name="ref", **kwargs)
    real_save, real_run_sites = activations.save_tensors, hooks.run_sites
    calls = {"n": 0}

    def slow_save(*args, **kw):
        time.sleep(0.3)  # a slow disk: shards queue up behind the one being written
        real_save(*args, **kw)

    def interrupt_fourth_batch(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_run_sites(*args, **kw)

    monkeypatch.setattr(activations, "save_tensors", slow_save)
    monkeypatch.setattr(hooks, "run_sites", interrupt_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "llama", text_jsonl, name="cut", **kwargs)
    assert not writer_threads()  # joined, not left behind
    out = tmp_path / "cut"
    recorded = [s["file"] for s in json.loads((out / "progress-0.json").read_text())["shards"]]
    assert 1 <= len(recorded) < 3  # the shard still queued was dropped, the one being written finished
    assert sorted(p.name for p in out.glob("shard-*")) == recorded  # every shard on disk is recorded, and whole
    monkeypatch.undo()
    assert_same_store(run(tmp_path, "llama", text_jsonl, name="cut", **kwargs), reference)


def test_full_disk_in_the_writer_thread_stops_the_run_with_one_line(tmp_path, text_jsonl, monkeypatch, capsys):
    real_save = activations.save_tensors
    calls = {"n": 0}

    def full_disk(path, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise no_space_error(path)  # what mmsae.io's writers raise on ENOSPC
        real_save(path, *args, **kw)

    monkeypatch.setattr(activations, "save_tensors", full_disk)
    out = tmp_path / "full"
    code = cli_main(["harvest", "--model", tiny_model("llama"), "--layer", "0", "--data", str(text_jsonl),
                     "--batch-size", "1", "--shard-size", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"mmsae harvest: error: {no_space_error(out / 'shard-0-00002.safetensors')}"
    assert calls["n"] == 3 and not writer_threads()  # the run stopped there
    recorded = [s["file"] for s in json.loads((out / "progress-0.json").read_text())["shards"]]
    assert recorded == sorted(p.name for p in out.glob("shard-*")) == ["shard-0-00000.safetensors", "shard-0-00001.safetensors"]


def test_store_dtype_auto_is_recorded_and_a_resume_keeps_the_stored_one(tmp_path, text_jsonl, monkeypatch):
    kwargs = dict(layer=0, batch_size=1, shard_size=1)
    reference = run(tmp_path, "llama", text_jsonl, name="ref", **kwargs)
    assert reference.manifest["dtype"] == "float32" and reference.manifest["config"]["store_dtype"] == "auto"  # CPU
    real_save = activations.save_tensors
    calls = {"n": 0}

    def die_on_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        real_save(*args, **kw)

    monkeypatch.setattr(activations, "save_tensors", die_on_third)
    for name, dtype in (("bf16", "bfloat16"), ("old", "float32")):
        calls["n"] = 0
        with pytest.raises(Killed):
            run(tmp_path, "llama", text_jsonl, name=name, store_dtype=dtype, **kwargs)
    monkeypatch.undo()
    with pytest.raises(MmsaeError, match=r"stored in bfloat16, not float32 \(--store-dtype auto\); resume with --store-dtype bfloat16"):
        run(tmp_path, "llama", text_jsonl, name="bf16", **kwargs)
    assert run(tmp_path, "llama", text_jsonl, name="bf16", store_dtype="bfloat16", **kwargs).manifest["dtype"] == "bfloat16"
    # a store begun before --store-dtype (its config says dtype) resumes under auto
    path = tmp_path / "old" / "progress-0.json"
    progress = json.loads(path.read_text())
    del progress["dtype"], progress["config"]["store_dtype"], progress["config"]["device_map"]
    path.write_text(json.dumps({**progress, "config": {**progress["config"], "dtype": "float32"}}))
    assert_same_store(run(tmp_path, "llama", text_jsonl, name="old", **kwargs), reference)


def test_device_map_auto_gives_the_same_store(tmp_path, image_dir):
    """On a machine without a GPU accelerate places the whole model on the CPU."""
    kwargs = dict(batch_size=4, shard_size=100)
    plain = run(tmp_path, "llava", image_dir, name="plain", **kwargs)
    assert_same_store(run(tmp_path, "llava", image_dir, name="mapped", device_map="auto", **kwargs), plain)
    with pytest.raises(MmsaeError, match="--device-map auto places the model itself; leave out --device cpu"):
        run(tmp_path, "llava", image_dir, name="both", device="cpu", device_map="auto")


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun(tmp_path, image_dir):
    """A real SIGKILL of the CLI while it writes shards; the rerun completes the same store."""
    many = tmp_path / "many"
    many.mkdir()
    for i in range(120):
        Image.new("RGB", (30 + i % 17, 30), (i % 256, (3 * i) % 256, 90)).save(many / f"{i:03d}.png")
    args = ["harvest", "--model", tiny_model("llava"), "--layer", "1", "--data", str(many),
            "--batch-size", "2", "--shard-size", "40"]
    assert cli_main(args + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mmsae.cli", *args, "--out", str(out)],
                            env={**os.environ, "PYTHONPATH": SRC}, stderr=subprocess.DEVNULL)
    progress_file = out / "progress-0.json"
    while proc.poll() is None:
        if progress_file.exists() and len(json.loads(progress_file.read_text())["shards"]) >= 3:
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -9, "the harvest finished before it could be killed"
    assert not ActivationStore(out).complete
    assert cli_main(args + ["--out", str(out)]) == 0
    assert_same_store(ActivationStore(out), ActivationStore(tmp_path / "ref"))


def test_rerun_of_a_complete_store_does_nothing_and_other_settings_are_refused(tmp_path, text_jsonl):
    store = run(tmp_path, "llama", text_jsonl, layer=0)
    before = {p.name: p.stat().st_mtime_ns for p in store.path.glob("shard-*")}
    again = run(tmp_path, "llama", text_jsonl, layer=0)
    assert {p.name: p.stat().st_mtime_ns for p in again.path.glob("shard-*")} == before
    with pytest.raises(MmsaeError, match="layer=0, not 1.*new --out"):
        run(tmp_path, "llama", text_jsonl, layer=1)


# --- distributed -----------------------------------------------------------------------------


def test_torchrun_two_processes_give_the_same_tokens_as_one(tmp_path, image_dir):
    common = ["harvest", "--model", tiny_model("llava"), "--layer", "1", "--data", str(image_dir),
              "--batch-size", "3", "--shard-size", "50"]
    assert cli_main(common + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "mmsae.cli", *common, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = ActivationStore(tmp_path / "one"), ActivationStore(tmp_path / "two")
    assert two.complete and two.manifest["world"] == 2
    assert {s["rank"] for s in two.shards} == {0, 1}
    assert all(s["first_sample"] % 2 == s["rank"] for s in two.shards)
    assert two.manifest["stats"]["n_skipped"] == one.manifest["stats"]["n_skipped"] == 1
    t1, t2 = shard_tensors(one), shard_tensors(two)
    key1 = t1["sample"] * 10_000 + t1["pos"]
    key2 = t2["sample"] * 10_000 + t2["pos"]
    o1, o2 = torch.argsort(key1), torch.argsort(key2)
    assert torch.equal(key1[o1], key2[o2])  # the same tokens, each once
    for k in ("is_image", "tile", "row", "col"):
        assert torch.equal(t1[k][o1], t2[k][o2])
    # batches differ (other samples, other padding), so values agree to float32 rounding
    torch.testing.assert_close(t1["acts"][o1], t2["acts"][o2], rtol=1e-4, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_is_one_line_errors(tmp_path, image_dir, text_jsonl, capsys):
    with pytest.raises(MmsaeError, match=r"lm:3 is out of range: .* has 3 decoder layers \(lm:0 to lm:2\)"):
        run(tmp_path, "llava", image_dir, layer=3)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MmsaeError, match="cannot create folder"):
        harvest(HarvestConfig(model=tiny_model("llama"), layer=0, data=str(text_jsonl), out=str(blocker / "store")))
    import datasets as ds
    ds.Dataset.from_dict({"sentence": ["a"], "n": [1]}).save_to_disk(str(tmp_path / "textds"))
    with pytest.raises(MmsaeError, match="no image column.*sentence, n"):
        run(tmp_path, "llava", tmp_path / "textds", name="x")
    assert run(tmp_path, "llama", tmp_path / "textds", name="y", layer=0).n_tokens > 0  # fine for a text model
    # through the CLI: exit 2 and one line
    code = cli_main(["harvest", "--model", tiny_model("llava"), "--layer", "9", "--data", str(image_dir),
                     "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("mmsae harvest: error: lm:9 is out of range")


# --- the store and its batch stream ----------------------------------------------------------


def write_store(path: Path, shard_sizes: list[int], d: int = 3, image_every: int = 3) -> None:
    """A store written by hand in the documented format; acts[:, 0] is each token's global index."""
    path.mkdir(parents=True)
    shards, start = [], 0
    for r, n in enumerate(shard_sizes):
        index = torch.arange(start, start + n)
        acts = torch.stack([index.float(), torch.full((n,), float(r)), -index.float()], dim=1)[:, :d]
        is_image = index % image_every == 0
        grid = torch.where(is_image, index % 7, -1).to(torch.int16)
        save_file({"acts": acts, "sample": index // 5, "pos": (index % 5).to(torch.int32), "is_image": is_image,
                   "tile": torch.where(is_image, 0, -1).to(torch.int16), "row": grid, "col": grid.clone()},
                  str(path / f"shard-0-{r:05d}.safetensors"))
        shards.append({"file": f"shard-0-{r:05d}.safetensors", "rank": 0, "n_tokens": n,
                       "n_image_tokens": int(is_image.sum()), "first_sample": int(index[0] // 5),
                       "last_sample": int(index[-1] // 5), "norm_sum": 0.0})
        start += n
    manifest = {"format": "mmsae-activations", "version": 1, "model": "m", "layer": 0, "hook_point": "h", "d": d,
                "dtype": "float32", "source": "s", "tokens": "all", "world": 1, "complete": True, "shards": shards,
                "ranks": {"0": {"samples_done": start // 5}},
                "stats": {"n_tokens": start, "mean_norm": 1.0}, "config": {"data": "s"}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def indices(batches) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0]]


def test_store_reads_back_what_was_written(tmp_path):
    write_store(tmp_path / "s", [10, 7, 12])
    store = ActivationStore(tmp_path / "s")
    assert (store.n_tokens, store.d, len(store)) == (29, 3, 29)
    assert store.count("image") == 10 and store.count("text") == 19
    meta = store.metadata()
    assert torch.equal(meta["sample"], torch.arange(29) // 5)
    assert torch.equal(store.metadata("image")["row"].long(), torch.arange(0, 29, 3) % 7)
    assert torch.equal(store.load_all()[:, 0], torch.arange(29).float())
    assert store.cfg["hook_point"] == "h"


@pytest.mark.parametrize("window", [1, 2, 4])
def test_shuffled_batches_cover_every_token_once_per_epoch(tmp_path, window):
    write_store(tmp_path / "s", [10, 7, 12, 1, 9, 20])
    store = ActivationStore(tmp_path / "s")
    n = store.n_tokens
    batches = list(store.batches(4, seed=3, epochs=2, shuffle_shards=window))
    assert all(b.dtype == torch.float32 and b.shape[1] == 3 for b in batches)
    per_epoch = store.num_batches(4)
    assert len(batches) == 2 * per_epoch == 2 * 15
    first, second = indices(batches[:per_epoch]), indices(batches[per_epoch:])
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second and first != list(range(n))  # epochs are shuffled, differently
    # deterministic in the seed; resumable at any batch
    assert indices(store.batches(4, seed=3, epochs=2, shuffle_shards=window)) == first + second
    for k in (1, 9, per_epoch, per_epoch + 4):
        assert indices(store.batches(4, seed=3, epochs=2, start_batch=k, shuffle_shards=window)) == indices(batches[k:])
    assert indices(store.batches(4, seed=4, shuffle_shards=window)) != first
    # a batch mixes tokens of at most the shards of two windows (bounded memory); acts[:, 1] = shard
    assert max(len(set(b[:, 1].tolist())) for b in batches) <= 2 * window


def test_batches_for_ranks_partition_each_global_batch(tmp_path):
    write_store(tmp_path / "s", [10, 7, 12, 1, 9, 20])
    store = ActivationStore(tmp_path / "s")
    ranks = [list(store.batches(3, seed=1, rank=r, world=2)) for r in range(2)]
    assert sorted(indices(ranks[0]) + indices(ranks[1])) == list(range(59))
    assert len(ranks[0]) == len(ranks[1]) == store.num_batches(3, world=2)
    dropped = [list(store.batches(3, seed=1, rank=r, world=2, drop_last=True)) for r in range(2)]
    assert all(len(b) == 3 for rank in dropped for b in rank)
    assert len(dropped[0]) == len(dropped[1]) == 59 // 6
    ordered = list(store.batches(5, shuffle=False))
    assert indices(ordered) == list(range(59)) and len(ordered[-1]) == 4
    image = indices(store.batches(4, seed=0, tokens="image"))
    assert sorted(image) == list(range(0, 59, 3))
    forever = store.batches(8, epochs=None)
    assert len([next(forever) for _ in range(40)]) == 40


def test_non_finite_or_missing_shard_is_named(tmp_path):
    write_store(tmp_path / "s", [4, 4])
    path = tmp_path / "s" / "shard-0-00001.safetensors"
    tensors = load_file(str(path))
    tensors["acts"][2, 1] = float("nan")
    save_file(tensors, str(path))
    store = ActivationStore(tmp_path / "s")
    with pytest.raises(MmsaeError, match="shard-0-00001.safetensors holds NaN or inf"):
        list(store.batches(2))
    path.unlink()
    with pytest.raises(MmsaeError, match="shard-0-00001.safetensors is missing"):
        list(store.batches(2, shuffle=False))
    with pytest.raises(MmsaeError, match="no activation store"):
        ActivationStore(tmp_path / "nothing")


def test_shapes_harvest(tmp_path):
    store = run(tmp_path, "llava", "shapes:5:1", tokens="image", batch_size=2)
    assert sorted(set(store.metadata()["sample"].tolist())) == [0, 1, 2, 3, 4]
    assert store.n_tokens == 5 * 16
