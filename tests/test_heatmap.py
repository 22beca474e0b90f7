"""Binarisation methods and overlays on hand-made heat-maps and a hand-made index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.errors import MmsaeError
from mmsae.heatmap import binarize, binarize_example, overlay, threshold_for
from mmsae.index import IndexWriter
from mmsae.models.base import Tile, TokenLayout

HEAT = np.array([[0.0, 0.1, 0.0], [0.5, 1.0, 2.0]], dtype=np.float32)


def test_binarize_methods_by_hand():
    assert binarize(HEAT, "paper").tolist() == [[False, True, False], [True, True, True]]
    assert binarize(HEAT, "quantile", threshold=0.5).tolist() == [[False, False, False], [False, True, True]]
    # a fraction of this map's maximum (2.0) or of a given feature maximum (4.0)
    assert binarize(HEAT, "fraction", fraction=0.5).tolist() == [[False, False, False], [False, False, True]]
    assert binarize(HEAT, "fraction", threshold=4.0, fraction=0.1).tolist() == [[False, False, False], [True, True, True]]
    with pytest.raises(MmsaeError):
        binarize(HEAT, "quantile")
    with pytest.raises(MmsaeError):
        binarize(HEAT, "otsu")


@pytest.fixture
def index(tmp_path):
    r, c = torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")
    layout = TokenLayout(positions=torch.arange(4), tile=torch.zeros(4, dtype=torch.long), row=r.reshape(-1),
                         col=c.reshape(-1), tiles=[Tile((0, 0, 4, 4), 2, 2)], image_size=(4, 4))
    w = IndexWriter(tmp_path / "ix", num_latents=2, top_n=1)
    w.add_sample(0, Image.new("RGB", (4, 4), (200, 100, 50)), layout)
    w.add_example(0, 0, [4.0, 1.0, 0.0, 0.5])
    # dataset: 1000 patches, 3 at 4.0 and 7 at 1.0: the top 0.5% (5 patches) lie in the bins of 1.0 and 4.0
    w.add_activations(0, [4.0] * 3 + [1.0] * 7 + [0.0] * 990)
    return w.finish()


def test_binarize_example_records_the_method(index):
    ex = index.top_examples(0)[0]
    mask, rec = binarize_example(ex, index, "paper")
    assert rec == {"method": "paper", "threshold": 0.0} and mask.sum() == 12  # 3 of 4 patches of 2x2 px
    mask, rec = binarize_example(ex, index, "quantile")
    assert rec["method"] == "quantile" and rec["quantile"] == 0.995 and 1.0 <= rec["threshold"] < 4.0
    assert mask.sum() == 4 and mask[0, 0] and not mask[0, 2]
    mask, rec = binarize_example(ex, index, "fraction", fraction=0.2)
    assert rec["feature_max"] == 4.0 and rec["threshold"] == pytest.approx(0.8) and mask.sum() == 8
    assert threshold_for(index, 0, "fraction", fraction=0.5)["threshold"] == 2.0


def test_overlay_modes():
    image = Image.new("RGB", (3, 2), (100, 100, 100))
    out = np.asarray(overlay(image, HEAT, "mask"))
    assert out[0, 0].tolist() == [25, 25, 25] and out[1, 2].tolist() == [100, 100, 100]
    graded = np.asarray(overlay(image, HEAT, "overlay", alpha=0.5))
    assert graded[0, 0].tolist() == [100, 100, 100]  # untouched where the map is zero
    assert graded[1, 2].tolist() != graded[0, 1].tolist()  # graded: the peak and a weak pixel differ
    crop = overlay(image, HEAT, "crop", mask=HEAT >= 1.0, margin=0)
    assert crop.size == (2, 1)
    with pytest.raises(MmsaeError):
        overlay(image, HEAT[:1], "mask")
