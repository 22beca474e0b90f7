"""Adapters on every family: loading, input building, image-token geometry, heat-maps."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.errors import MmsaeError
from mmsae.models import ADAPTERS, image_heatmap, load_adapter
from mmsae.models.base import Tile, TokenLayout
from tiny_models import FAMILIES, family_params, tiny_adapter, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

VISION = [f for f in FAMILIES if f != "llama"]


def square_image(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """A black image with one white rectangle at ``box`` (x0, y0, x1, y1)."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = 255
    return Image.fromarray(array)


# --- loading -------------------------------------------------------------------------------


def test_unknown_family_names_model_type_and_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MmsaeError) as err:
        load_adapter(str(tmp_path))
    message = str(err.value)
    assert "'bert'" in message and "llava" in message and "\n" not in message


def test_model_type_unknown_to_transformers_is_a_family_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-real-model"}))
    with pytest.raises(MmsaeError, match="'not-a-real-model' is not supported; supported model_type values: .*paligemma"):
        load_adapter(str(tmp_path))


def test_model_without_weights_is_one_line_error(tmp_path):
    config = json.loads((Path(tiny_model("llama")) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MmsaeError, match="cannot load the llama model") as err:
        load_adapter(str(tmp_path))
    assert "\n" not in str(err.value)


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(MmsaeError, match="cannot read a model config"):
        load_adapter(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("family", family_params())
def test_load_picks_family_and_checks_layers(family):
    adapter = tiny_adapter(family)
    config = json.loads((Path(tiny_model(family)) / "config.json").read_text())
    assert isinstance(adapter, ADAPTERS[config["model_type"]])
    assert not adapter.model.training
    assert all(not p.requires_grad for p in adapter.model.parameters())
    assert adapter.num_layers == 3 and adapter.hidden_size == 32
    assert adapter.layer_module(2) is adapter.decoder_layers()[2]
    for bad in (-1, 3, 100):
        with pytest.raises(MmsaeError, match="out of range"):
            adapter.check_layer(bad)


def test_load_dtype():
    adapter = load_adapter(tiny_model("llama"), dtype="bfloat16")
    assert adapter.dtype == torch.bfloat16
    with pytest.raises(MmsaeError, match="dtype"):
        load_adapter(tiny_model("llama"), dtype="int3")


# --- inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", family_params())
def test_build_inputs_left_pads_and_marks_answers(family):
    adapter = tiny_adapter(family)
    images = [square_image((40, 30), (5, 5, 15, 15)), square_image((24, 50), (0, 0, 8, 8))] if adapter.has_vision else None
    answers = ["A white square.", "no"]
    batch = adapter.build_inputs(images, ["Describe it.", "Is there a tree in this image?"], answers=answers)
    ids, mask = batch.input_ids, batch.attention_mask
    # left padding: every row ends with a real token, padding only at the start
    assert mask[:, -1].all()
    for row in mask:
        first = int(torch.nonzero(row)[0])
        assert row[first:].all() and not row[:first].any()
    tokenizer = adapter.tokenizer
    for i, answer in enumerate(answers):
        assert tokenizer.decode(ids[i][batch.answer_mask[i]]) == answer
    # no answers: no mask, and the answer tokens are gone
    plain = adapter.build_inputs(images, ["Describe it.", "Is there a tree in this image?"])
    assert plain.answer_mask is None
    assert plain.input_ids.shape[1] < ids.shape[1]


def test_text_only_model_refuses_images():
    adapter = tiny_adapter("llama")
    with pytest.raises(MmsaeError, match="text-only"):
        adapter.build_inputs([Image.new("RGB", (8, 8))], ["hi"])


def test_paligemma_needs_an_image_per_prompt():
    adapter = tiny_adapter("paligemma")
    with pytest.raises(MmsaeError, match="needs an image"):
        adapter.build_inputs([Image.new("RGB", (8, 8)), None], ["hi", "there"])


# --- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", family_params(VISION))
def test_layout_agrees_with_processor(family):
    adapter = tiny_adapter(family)
    text_only = square_image((30, 30), (0, 0, 30, 30)) if adapter.requires_image else None
    images = [square_image((40, 30), (5, 5, 15, 15)), text_only, square_image((24, 50), (0, 0, 8, 8))]
    batch = adapter.build_inputs(images, ["a", "text only, longer", "b"])
    ids, mask = batch.input_ids, batch.attention_mask
    placeholder_ids = torch.tensor(adapter.image_token_ids())
    for i, layout in enumerate(batch.layouts):
        is_placeholder = torch.isin(ids[i], placeholder_ids)
        if images[i] is None:
            assert layout.positions.numel() == 0 and layout.image_size is None
            assert not is_placeholder.any()
        else:
            assert layout.image_size == images[i].size
            # every patch token is an image token of the processor's own expansion
            assert is_placeholder[layout.positions].all()
            assert torch.equal(layout.positions, layout.positions.unique())
            # each tile's grid is filled exactly once
            assert sum(t.rows * t.cols for t in layout.tiles) == layout.positions.numel()
            cells = layout.tile * 10_000 + layout.row * 100 + layout.col
            assert cells.unique().numel() == cells.numel()
            for t, tile in enumerate(layout.tiles):
                sel = layout.tile == t
                assert sel.sum() == tile.rows * tile.cols
                assert layout.row[sel].max() == tile.rows - 1 and layout.col[sel].max() == tile.cols - 1
        # text positions: real tokens that are not image placeholders
        expected_text = torch.nonzero(mask[i].bool() & ~is_placeholder).flatten()
        assert torch.equal(layout.text_positions, expected_text)


def test_llava_positions_are_exactly_the_image_tokens():
    adapter = tiny_adapter("llava")
    batch = adapter.build_inputs([square_image((40, 30), (0, 0, 4, 4))], ["hello"])
    ids = batch.input_ids[0]
    expected = torch.nonzero(ids == adapter.model.config.image_token_id).flatten()
    assert torch.equal(batch.layouts[0].positions, expected)
    assert batch.layouts[0].tiles[0].rows == batch.inputs["pixel_values"].shape[-2] // adapter.model.config.vision_config.patch_size


def test_llava_grid_from_token_count():
    adapter = tiny_adapter("llava")
    assert adapter.patch_grid(16) == (4, 4, 0)
    assert adapter.patch_grid(577) == (24, 24, 1)  # CLS first ("full" strategy)
    assert adapter.patch_grid(64) == (8, 8, 0)  # a projector that pools to another square grid
    with pytest.raises(MmsaeError, match="not a square"):
        adapter.patch_grid(15)


def patch_means(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] processed pixels -> [H / patch, W / patch] mean brightness per patch."""
    grey = pixels.float().mean(0)
    rows, cols = grey.shape[0] // patch, grey.shape[1] // patch
    return grey[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch).mean((1, 3))


def brightness_llava(adapter, batch, i):
    grid = patch_means(batch.inputs["pixel_values"][i], adapter.model.config.vision_config.patch_size)
    layout = batch.layouts[i]
    return grid[layout.row, layout.col]


def brightness_anyres(adapter, batch, i):
    """Each crop's patch brightness, put in token order by the model's own pack_image_features
    (a NaN newline marks the newline tokens, which the layout leaves out)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = adapter.model.config
    patch = config.vision_config.patch_size
    n_used = image_size_to_num_patches(batch.inputs["image_sizes"][i], config.image_grid_pinpoints, config.vision_config.image_size)
    grids = torch.stack([patch_means(p, patch) for p in batch.inputs["pixel_values"][i][:n_used]])
    features = grids.reshape(n_used, -1, 1)
    packed, _ = adapter.model.model.pack_image_features(
        [features], batch.inputs["image_sizes"][i : i + 1], **PACK_KWARGS[adapter.family], image_newline=torch.tensor([float("nan")])
    )
    packed = packed[0].flatten()
    return packed[~packed.isnan()]


def brightness_qwen(adapter, batch, i):
    """pixel_values holds each image's patches with every merge x merge block consecutive,
    blocks in token order; a token's brightness is its block's mean."""
    grids = batch.inputs["image_grid_thw"]
    has_image = [layout.image_size is not None for layout in batch.layouts]
    image_index = sum(has_image[:i])
    start = int(grids[:image_index].prod(-1).sum())
    rows = batch.inputs["pixel_values"][start : start + int(grids[image_index].prod())]
    merge = adapter.model.config.vision_config.spatial_merge_size
    return rows.float().reshape(-1, merge * merge * rows.shape[1]).mean(1)


def brightness_idefics3(adapter, batch, i):
    """Frames are the sub-images then the global image, each pixel-shuffled into
    (patch * scale)-pixel cells read row by row."""
    config = adapter.model.config
    cell = config.vision_config.patch_size * config.scale_factor
    frames = batch.inputs["pixel_values"][i][: len(batch.layouts[i].tiles)]
    return torch.cat([patch_means(frame, cell).flatten() for frame in frames])


PACK_KWARGS = {"llava_next": {"vision_feature_select_strategy": "default"}, "llava_onevision": {"vision_aspect_ratio": "anyres_max_4"}}

# per family: the brightness of each layout token's patch, read from the processor's pixel_values
PATCH_BRIGHTNESS = {
    "llava": brightness_llava,
    "llava_next": brightness_anyres,
    "llava_onevision": brightness_anyres,
    "qwen2_vl": brightness_qwen,
    "qwen2_5_vl": brightness_qwen,
    "idefics3": brightness_idefics3,
    "smolvlm": brightness_idefics3,
    "paligemma": brightness_llava,
}


def white_fraction(adapter, brightness: torch.Tensor) -> np.ndarray:
    """Processed patch brightness (mean over channels of normalised pixels) -> fraction of white."""
    ip = adapter.processor.image_processor
    mean, std = np.asarray(ip.image_mean, dtype=np.float64), np.asarray(ip.image_std, dtype=np.float64)
    black, white = np.mean((0 - mean) / std), np.mean((1 - mean) / std)
    return (brightness.double().numpy() - black) / (white - black)


def check_marked_patches(adapter, brightness_of, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> None:
    """Per tile, mark the token whose processed patch is whitest: its heat must land on pixels
    of the original image that are as white as that patch."""
    w, h = size
    box = box or (w // 2, h // 4, w // 2 + w // 4, h // 2)  # a white block, a quarter of each side
    image = square_image(size, box)
    white = np.asarray(image)[..., 0] > 0
    batch = adapter.build_inputs([image], ["where?"])
    layout = batch.layouts[0]
    fraction = white_fraction(adapter, brightness_of(adapter, batch, 0))  # one per layout token
    assert fraction.shape == (layout.num_image_tokens,)
    checked = 0
    for t in range(len(layout.tiles)):
        in_tile = np.flatnonzero(layout.tile.numpy() == t)
        if in_tile.size == 0:
            continue
        best = in_tile[np.argmax(fraction[in_tile])]
        if fraction[best] < 0.5:  # this tile does not show the block
            continue
        marked = np.zeros(layout.num_image_tokens, dtype=np.float32)
        marked[best] = 1.0
        heat = image_heatmap(layout, marked)
        assert heat.shape == (h, w) and heat.dtype == np.float32
        region = heat > 0
        assert region.any()
        assert set(np.unique(heat)) <= {0.0, 1.0}
        # the marked pixels of the original are as white as the processed patch
        assert abs(white[region].mean() - fraction[best]) < 0.3, (t, white[region].mean(), fraction[best])
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("family", family_params(VISION))
@pytest.mark.parametrize("size", [(64, 48), (36, 72), (120, 40)])
def test_heatmap_sends_marked_patch_to_the_white_block(family, size):
    check_marked_patches(tiny_adapter(family), PATCH_BRIGHTNESS[family], size)


# blocks that fill one cell of the padded 4 x 4 grid (a cell is max(size) / 4 pixels)
@pytest.mark.parametrize(("size", "box"), [((64, 48), (32, 24, 48, 40)), ((36, 72), (0, 36, 18, 54))])
def test_llava_pad_to_square_processor(size, box):
    """LLaVA 1.5's original recipe pads to a square instead of cropping the centre."""
    from transformers import LlavaImageProcessorPil

    tiny = tiny_adapter("llava")
    adapter = copy.copy(tiny)
    adapter.processor = copy.copy(tiny.processor)
    adapter.processor.image_processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    layout = adapter.build_inputs([square_image(size, (0, 0, 1, 1))], ["x"]).layouts[0]
    x0, y0, x1, y1 = layout.tiles[0].box
    assert x1 - x0 == y1 - y0 == max(size)  # the grid covers the padded square
    check_marked_patches(adapter, brightness_llava, size, box)


def test_heatmap_paints_cells_and_combines_tiles():
    # two tiles over a 10 x 6 image: the whole image 2x2, and the right half 1x1
    layout = TokenLayout(
        positions=torch.arange(5),
        tile=torch.tensor([0, 0, 0, 0, 1]),
        row=torch.tensor([0, 0, 1, 1, 0]),
        col=torch.tensor([0, 1, 0, 1, 0]),
        tiles=[Tile((0, 0, 10, 6), 2, 2), Tile((5, 0, 10, 6), 1, 1)],
        image_size=(10, 6),
    )
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 3.0])
    heat = image_heatmap(layout, values, combine="max")
    expected = np.zeros((6, 10), dtype=np.float32)
    expected[:3, :5], expected[:3, 5:], expected[3:, :5], expected[3:, 5:] = 1, 3, 3, 4
    np.testing.assert_array_equal(heat, expected)
    mean = image_heatmap(layout, values, combine="mean")
    expected[:3, 5:], expected[3:, 5:] = 2.5, 3.5
    np.testing.assert_array_equal(mean, expected)
    # a box reaching outside the image (padding) paints only the pixels inside it
    padded = TokenLayout(torch.arange(2), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long), [Tile((0, -3, 10, 9), 2, 1)], (10, 6))
    heat = image_heatmap(padded, np.array([1.0, 2.0]))
    np.testing.assert_array_equal(heat[:3], 1.0)
    np.testing.assert_array_equal(heat[3:], 2.0)
    with pytest.raises(MmsaeError):
        image_heatmap(layout, np.zeros(3))
