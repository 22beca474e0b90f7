"""bench/scale_rehearsal.py --tiny: every stage measured, the published image geometry, and a
projection that follows from the run's own numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("harvest", "train", "index", "steer", "attribute")


def rehearsal_module():
    if "scale_rehearsal" not in sys.modules:  # registered first: its dataclass looks its module up
        spec = importlib.util.spec_from_file_location("scale_rehearsal", ROOT / "bench" / "scale_rehearsal.py")
        sys.modules["scale_rehearsal"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["scale_rehearsal"])
    return sys.modules["scale_rehearsal"]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rehearsal")
    returned = rehearsal_module().main(["--tiny", "--out", str(out)])
    written = json.loads((out / "scale_rehearsal.json").read_text())
    assert written["projection"] == returned["projection"]
    return written


def test_every_stage_is_measured(result):
    stages = result["families"]["llava_next"]["stages"]
    for name in STAGES:
        row = stages[name]
        assert "error" not in row and "skipped" not in row, (name, row)
        assert row["tokens_per_s"] > 0 and row["images_per_s"] > 0, name
        # the rates are the stage's counts over its work seconds (rounded to ms in the JSON)
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["work_seconds"], rel=0.02), name
        assert 0 < row["work_seconds"] <= row["seconds"] + 1e-3 and row["load_seconds"] >= 0, name
        assert row["peak_rss_gb"] > 0
    assert stages["index"]["load_seconds"] > 0  # the model and SAE are loaded through load_adapter / load_sae
    assert stages["train"]["steps"] * stages["train"]["batch"] == stages["train"]["tokens"]
    assert result["families"]["qwen2_vl"]["stages"]["harvest"]["tokens_per_s"] > 0


def test_tiny_models_keep_the_published_image_geometry(result):
    # LLaVA-NeXT, 336 px crops of 14 px patches: a square 224 px image takes the 336 x 672 grid, so
    # 24 x 24 base patches and, after unpadding, 24 x 24 high-resolution ones (newlines are no patch)
    llava = result["families"]["llava_next"]["stages"]["harvest"]
    assert llava["n_image_tokens"] == llava["images"] * (24 * 24 + 24 * 24)
    # Qwen2-VL: 224 px is 16 x 16 patches of 14 px, merged 2 x 2
    qwen = result["families"]["qwen2_vl"]["stages"]["harvest"]
    assert qwen["n_image_tokens"] == qwen["images"] * 8 * 8


def test_projection_follows_from_the_measured_rates(result):
    stages, p = result["families"]["llava_next"]["stages"], result["projection"]
    harvest, train, index = stages["harvest"], stages["train"], stages["index"]
    assert p["samples"] == 780_000
    assert p["tokens_per_sample"] == pytest.approx(harvest["tokens"] / harvest["images"])
    expected = {"harvest": p["samples"] / harvest["images_per_s"],
                "train": p["samples"] * p["tokens_per_sample"] / train["tokens_per_s"],
                "index": p["samples"] / index["images_per_s"]}
    assert p["seconds_one_gpu"] == pytest.approx(expected)
    assert p["one_gpu_s"] == pytest.approx(sum(expected.values()))
    assert p["gpus"] == 8 and p["multi_gpu_s"] == pytest.approx(p["one_gpu_s"] / 8)
    assert p["store_tb"] == pytest.approx(p["tokens"] * harvest["d"] * 4 / 2**40)  # float32 store on the CPU
    assert any("linear scaling" in a for a in p["assumptions"])


def test_spent_budget_skips_every_stage(tmp_path):
    written = rehearsal_module().main(["--tiny", "--out", str(tmp_path), "--budget-s", "0", "--families", "llava_next"])
    stages = written["families"]["llava_next"]["stages"]
    assert set(stages) == {"build", *STAGES}
    assert all(row == {"skipped": "time budget spent"} for row in stages.values())
    assert written["projection"] is None
