"""The README's notebook example runs as written, on a tiny model standing in for the hub one."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.sae import SaeConfig, SparseAutoencoder
from tiny_models import tiny_adapter, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def notebook_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## In a notebook"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    code = notebook_block()
    adapter = tiny_adapter("llava")
    torch.manual_seed(0)  # a site and width of the tiny model; 2048 latents so that feature 1234 exists
    sae = SparseAutoencoder(SaeConfig(d_in=adapter.hidden_size, num_latents=2048, k=16, site="lm:1"))
    (tmp_path / "run").mkdir()
    sae.save(tmp_path / "run" / "sae")
    image = Image.fromarray((np.random.RandomState(0).rand(40, 52, 3) * 255).astype("uint8"))
    image.save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    # the only edits: the hub model becomes the tiny one, on the CPU in float32
    for old, new in (('"llava-hf/llava-1.5-7b-hf"', repr(tiny_model("llava"))), ('"bfloat16"', '"float32"'), ('"cuda"', '"cpu"')):
        assert old in code
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    top = scope["run"].latents[scope["sae"]].top_features(n=5)
    assert out[0] == str(top) and len(top) == 5 and all(v > 0 for _, v in top)
    assert scope["heat"].shape == (40, 52)  # over the image, in pixels
    assert len(out) == 2 and isinstance(out[1], str)  # the steered reply (a list of one text)
    # the example's clamp is real: without it the reply is the clean model's
    import mmsae

    clean = mmsae.generate(scope["model"], scope["image"], "How does this image make you feel?")
    steered = mmsae.generate(scope["model"], scope["image"], "How does this image make you feel?",
                             {scope["sae"]: [mmsae.Intervention(1234, 30.0, "clamp")]})
    assert out[1] == str(steered) and steered != clean


def test_importing_mmsae_changes_no_global_state():
    import subprocess
    import sys

    # the backend as set, read without resolving it (get_backend() would itself import pyplot)
    backend = "dict.__getitem__(matplotlib.rcParams, 'backend')"
    probe = (f"import sys, matplotlib; before = {backend}; import mmsae, mmsae.report, mmsae.steer, mmsae.attribute; "
             f"print(before == {backend}, 'matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]
