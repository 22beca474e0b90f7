"""Bad input is a one-line error: a full disk, out-of-range options, hostile or huge images.

A full disk is simulated by patching the writer a stage uses to raise what it raises when the
OS refuses a write: ``OSError(ENOSPC)`` from Python, and from safetensors (measured on a full
1 MiB tmpfs with safetensors 0.8) ``SafetensorError("Error while serializing: I/O error: No
space left on device (os error 28)")``. Each stage must exit 2 with one line, leave no
temporary file, and finish the same work when rerun once the patch is gone.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import json
import math
import pathlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import mmsae.io
from mmsae.cli import STAGES, _load_stage
from mmsae.cli import main as cli_main
from mmsae.config import _numeric_fields, flag
from mmsae.data.sources import MAX_SIDE, UnreadableImage, load_image, open_image
from mmsae.errors import MmsaeError
from mmsae.io import read_jsonl
from tiny_models import tiny_adapter, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]  # a legal big image

SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def full_disk_after(monkeypatch, n_ok: int) -> dict:
    """safetensors' save_file writes ``n_ok`` files, then fails as it does on a full disk."""
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > n_ok:
            Path(filename).write_bytes(b"\0" * 10)  # what a write cut short leaves behind
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return calls


def assert_disk_full_exit(code: int, capsys, names: str) -> None:
    """Exit 2, no traceback, and a last line that says what to do (progress bars come before it)."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert "no space left" in last and "free space and rerun" in last and names in last, last


def no_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --- 5. a full disk ----------------------------------------------------------------------------


def test_harvest_full_disk_exits_2_and_resumes(tmp_path, text_jsonl, monkeypatch, capsys):
    args = ["harvest", "--model", tiny_model("llama"), "--layer", "0", "--data", str(text_jsonl),
            "--batch-size", "1", "--shard-size", "1"]
    assert cli_main(args + ["--out", str(tmp_path / "ref")]) == 0
    full_disk_after(monkeypatch, 2)
    out = tmp_path / "full"
    assert_disk_full_exit(cli_main(args + ["--out", str(out)]), capsys, "shard-0-00002.safetensors")
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-0-00000.safetensors", "shard-0-00001.safetensors"]
    assert not no_temporaries(out)
    monkeypatch.undo()
    assert cli_main(args + ["--out", str(out)]) == 0
    ref, got = json.loads((tmp_path / "ref" / "manifest.json").read_text()), json.loads((out / "manifest.json").read_text())
    assert got["complete"] and got["stats"] == ref["stats"] and len(got["shards"]) == 5
    for shard in ref["shards"]:
        a, b = load_file(str(tmp_path / "ref" / shard["file"])), load_file(str(out / shard["file"]))
        assert all(torch.equal(a[k], b[k]) for k in a), shard["file"]


def test_train_full_disk_exits_2_and_resumes(tmp_path, monkeypatch, capsys):
    args = ["train", "--activations", "synthetic:d=16,m=32,k=2,tokens=8000", "--expansion", "2", "--k", "2",
            "--batch-size", "256", "--steps", "12", "--warmup", "3", "--lr", "4e-3", "--dead-tokens", "2000",
            "--init-tokens", "1024", "--log-every", "2", "--checkpoint-every", "4", "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "ref")]) == 0
    full_disk_after(monkeypatch, 1)  # the checkpoint at step 4 is written, the one at step 8 is not
    out = tmp_path / "full"
    assert_disk_full_exit(cli_main(args + ["--out", str(out)]), capsys, "state.safetensors")
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000000004"]
    assert not no_temporaries(out)
    monkeypatch.undo()
    assert cli_main(args + ["--out", str(out)]) == 0
    a, b = load_file(str(tmp_path / "ref" / "sae.safetensors")), load_file(str(out / "sae.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [2, 4, 6, 8, 10, 12]


@pytest.fixture(scope="module")
def index_setup(tmp_path_factory) -> Path:
    """14 random images and a random SAE on the tiny LLaVA (as in test_index)."""
    from mmsae.sae import SaeConfig, SparseAutoencoder

    root = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(14):
        Image.fromarray(rng.integers(0, 255, (30 + 3 * i, 50 - i, 3), dtype=np.uint8)).save(root / "imgs" / f"{i:03d}.png")
    torch.manual_seed(0)
    adapter = tiny_adapter("llava")
    SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=24, k=4, model=tiny_model("llava"), layer=1)).save(root / "sae")
    return root


def test_index_full_disk_exits_2_and_resumes(index_setup, tmp_path, monkeypatch, capsys):
    from mmsae.index import FeatureIndex

    root = index_setup
    args = ["index", "--sae", str(root / "sae"), "--data", str(root / "imgs"), "--top-n", "3", "--random-n", "4",
            "--batch-size", "3", "--checkpoint-every", "6", "--device", "cpu"]
    assert cli_main(args + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "full"

    # the disk fills while an image copy is written (PIL's own writer, not mmsae.io)
    real_save, saved = Image.Image.save, {"n": 0}

    def save(self, fp, *a, **kw):
        saved["n"] += 1
        if saved["n"] == 8:
            Path(fp).write_bytes(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", save)
    assert_disk_full_exit(cli_main(args + ["--out", str(out)]), capsys, "00000007.png")
    assert not no_temporaries(out)
    monkeypatch.undo()

    # then while the next checkpoint (after 12 images) is written, by safetensors
    full_disk_after(monkeypatch, 0)
    assert_disk_full_exit(cli_main(args + ["--out", str(out)]), capsys, "checkpoint.safetensors")
    assert (out / "checkpoint.safetensors").exists() and not no_temporaries(out)
    monkeypatch.undo()

    assert cli_main(args + ["--out", str(out)]) == 0
    ref, got = FeatureIndex(tmp_path / "ref"), FeatureIndex(out)
    assert got.features() == ref.features()
    for f in ref.features():
        assert [(e.sample_id, e.score) for e in got.top_examples(f)] == [(e.sample_id, e.score) for e in ref.top_examples(f)]
        assert got.stats(f) == ref.stats(f)


def test_explain_full_disk_keeps_whole_rows_and_resumes(tmp_path, monkeypatch, capsys):
    from fake_server import FakeChatServer
    from test_explain import N_FEATURES, make_index

    index = make_index(tmp_path / "index")
    server = FakeChatServer(api_key="k").__enter__()
    args = ["explain", "--index", str(index.path), "--out", str(tmp_path / "e.jsonl"), "--backend", "openai",
            "--model", "fake-vlm", "--base-url", server.base_url, "--api-key", "k", "--concurrency", "1"]
    real_open, appends = builtins.open, {"n": 0}

    class HalfWrite:
        """A file whose write stores half the bytes, then fails as a full disk does."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if "a" in mode:
            appends["n"] += 1
            if appends["n"] == 3:
                return HalfWrite(f)
        return f

    monkeypatch.setattr(mmsae.io, "open", fake_open, raising=False)  # shadows the builtin inside mmsae.io
    assert_disk_full_exit(cli_main(args), capsys, "e.jsonl")
    text = (tmp_path / "e.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["feature"] for line in text.splitlines()] == [0, 1]
    monkeypatch.undo()
    try:
        assert cli_main(args) == 0
    finally:
        server.__exit__(None, None, None)
    assert sorted(r["feature"] for r in read_jsonl(tmp_path / "e.jsonl")) == list(range(N_FEATURES))


def test_dashboard_full_disk_keeps_the_old_site_and_resumes(tmp_path, monkeypatch, capsys):
    from test_report import make_run

    run = make_run(tmp_path)
    assert cli_main(["dashboard", "--run", str(run)]) == 0
    site = run / "site"
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    real_write, writes = pathlib.Path.write_text, {"n": 0}

    def write_text(self, data, *a, **kw):
        if ".site.building" in str(self):
            writes["n"] += 1
            if writes["n"] == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    assert_disk_full_exit(cli_main(["dashboard", "--run", str(run)]), capsys, str(site))
    assert {p: p.read_bytes() for p in site.rglob("*") if p.is_file()} == before  # the old site is untouched
    assert writes["n"] == 5 and not list(run.glob(".site.*"))  # and the half-built one is gone
    monkeypatch.undo()
    assert cli_main(["dashboard", "--run", str(run)]) == 0
    assert (site / "index.html").exists() and (site / "report.html").exists()


def test_a_full_disk_anywhere_else_is_the_same_one_line(tmp_path, monkeypatch, capsys):
    """The CLI's backstop: an OSError(ENOSPC) from a write outside mmsae.io is not a traceback."""
    import mmsae.report as report

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))

    monkeypatch.setattr(report, "load_run", no_space)
    assert_disk_full_exit(cli_main(["dashboard", "--run", str(tmp_path)]), capsys, "x.bin")


# --- 7. options checked before work starts ---------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "T", "--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["train", "--out", "T", "--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["train", "--out", "T", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["train", "--out", "T", "--lr", "0"], "--lr must be greater than 0, got 0.0"),
    (["steer", "--model", "M", "--sae", "S", "--feature", "1", "--prompt", "p", "--value", "nan"],
     "--value must be a finite number, got nan"),
    (["steer", "--model", "M", "--sae", "S", "--feature", "1", "--prompt", "p", "--value", "2", "inf"],
     "--value must be a finite number, got inf"),
    (["steer", "--model", "M", "--sae", "S", "--feature", "1", "--prompt", "p", "--sweep=-inf"],
     "--sweep must be a finite number, got -inf"),
    (["dashboard", "--run", "R", "--port", "70000"], "--port must be at most 65535, got 70000"),
    (["explain", "--index", "I", "--out", "O", "--max-retries", "-1"], "--max-retries must be at least 0, got -1"),
    (["explain", "--index", "I", "--out", "O", "--timeout", "0"], "--timeout must be greater than 0, got 0.0"),
    (["score", "--run", "R", "--quantile", "1.5"], "--quantile must be at most 1, got 1.5"),
    (["harvest", "--model", "M", "--layer", "-1", "--data", "D", "--out", "O"], "--layer must be at least 0, got -1"),
    (["index", "--sae", "S", "--data", "D", "--out", "O", "--top-n", "0"], "--top-n must be at least 1, got 0"),
])
def test_bad_option_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"mmsae {argv[0]}: error: {message}"]
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_the_python_api_gets_the_same_checks():
    from mmsae.train import TrainConfig
    from mmsae.steer import SteerConfig

    with pytest.raises(MmsaeError, match="^--checkpoint-every must be at least 1, got 0$"):
        TrainConfig(out="T", checkpoint_every=0)
    with pytest.raises(MmsaeError, match="^--batch-size must be a whole number, got 2.5$"):
        TrainConfig(out="T", batch_size=2.5)
    with pytest.raises(MmsaeError, match=r"^--value must be a finite number, got nan$"):
        SteerConfig(model="M", sae="S", feature=[1], prompt=["p"], value=[math.nan])
    with pytest.raises(MmsaeError, match="^--k must be at least 1, got 0$"):  # dataclasses.replace checks too
        dataclasses.replace(TrainConfig(out="T"), k=0)
    assert TrainConfig(out="T", lr=None, steps=None).lr is None  # optional options may stay unset


def test_every_numeric_option_of_every_stage_is_bounded():
    """A new numeric option without a declared range fails here, not in a user's run."""
    unbounded, counted = [], 0
    for stage in STAGES:
        cls, _ = _load_stage(stage)
        for f, _, _ in _numeric_fields(cls):
            counted += 1
            if not {"min", "max", "gt"} & set(f.metadata):
                unbounded.append(f"{stage} {flag(f.name)}")
    # steering values may be any finite number: negative clamps, adds and scales are meaningful
    assert unbounded == ["steer --value", "steer --sweep"] and counted > 60


# --- 7. images: the decompression-bomb guard and large images, in every stage ---------------------


def _bomb(tmp_path: Path, monkeypatch) -> Path:
    """A 100 x 100 PNG under a pixel limit lowered to 1000 (so the test stays small): 10x over it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    return path


@pytest.mark.parametrize("stage", ["steer", "attribute"])
def test_image_option_refuses_a_decompression_bomb(tmp_path, monkeypatch, capsys, stage):
    bomb = _bomb(tmp_path, monkeypatch)
    if stage == "steer":
        argv = ["steer", "--model", "M", "--sae", "S", "--feature", "1", "--prompt", "p", "--image", str(bomb)]
    else:
        argv = ["attribute", "--model", "M", "--sae", "S", "--prompt", "p", "--answer", "a", "--image", str(bomb)]
    assert cli_main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmsae {stage}: error: cannot use --image {bomb}: too large to decode safely")


def test_bomb_given_as_an_open_image_or_bytes_is_refused_too(tmp_path, monkeypatch):
    bomb = _bomb(tmp_path, monkeypatch)
    with pytest.raises(UnreadableImage, match="too large"):
        load_image(bomb.read_bytes())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    opened = Image.open(bomb)  # opened while the limit was off
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UnreadableImage, match="100x100 = 10000 pixels"):
        load_image(opened)
    with pytest.raises(MmsaeError, match=r"cannot use --image .*nothing.png: missing file"):
        open_image(tmp_path / "nothing.png", "--image")


def _png_1bit(path: Path, width: int, height: int) -> None:
    """A bilevel PNG written by hand: the top half white, the bottom half black (a few KB)."""
    row_bytes = (width + 7) // 8
    white, black = b"\0" + b"\xff" * row_bytes, b"\0" + b"\0" * row_bytes
    raw = white * (height // 2) + black * (height - height // 2)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def test_very_large_legal_png_is_downscaled_on_load(tmp_path):
    path = tmp_path / "big.png"
    _png_1bit(path, 10_000, 10_000)
    assert path.stat().st_size < 20_000  # 100 M pixels in a few KB
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (MAX_SIDE, MAX_SIDE)
    arr = np.asarray(image)
    assert (arr[: MAX_SIDE // 2 - 1] == 255).all() and (arr[MAX_SIDE // 2 + 1:] == 0).all()


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (9000, 3000), (200, 40, 40)).save(path, quality=90)
    decoded = []
    real = Image.Image.thumbnail

    def thumbnail(self, size, *a, **kw):
        decoded.append(self.size)
        return real(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "thumbnail", thumbnail)
    image = load_image(path)
    assert image.size == (MAX_SIDE, 1365)
    assert decoded == [(4500, 1500)]  # the DCT-scaled decode (1/2), never the 9000 x 3000 pixels
    assert np.abs(np.asarray(image).astype(int).mean(axis=(0, 1)) - (200, 40, 40)).max() < 4
