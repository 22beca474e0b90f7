"""Sites on every family: names, modules, widths, capture, and the token geometry at each site."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.errors import MmsaeError
from mmsae.hooks import run_sites, run_until
from mmsae.models import image_heatmap
from mmsae.models.sites import Site, parse_site
from tiny_models import FAMILIES, family_params, tiny_adapter

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

VISION = [f for f in FAMILIES if f != "llama"]


def marked_image(size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Black with one white rectangle (default: a quarter of each side, right of centre, upper half)."""
    w, h = size
    x0, y0, x1, y1 = box or (w // 2, h // 4, w // 2 + w // 4, h // 2)
    array = np.zeros((h, w, 3), dtype=np.uint8)
    array[y0:y1, x0:x1] = 255
    return Image.fromarray(array)


def mixed_batch(adapter):
    """Three sequences: two images of different shapes and (where allowed) a text-only one."""
    middle = Image.new("RGB", (30, 30), (40, 90, 200)) if adapter.requires_image else None
    return adapter.build_inputs([Image.new("RGB", (40, 30), (200, 30, 30)), middle, Image.new("RGB", (24, 50), (20, 160, 60))],
                                ["hi", "text only, longer", "b"])


def image_features(adapter, batch):
    """The family's own get_image_features, with the tower's hidden states."""
    model = adapter.model.model
    params = inspect.signature(model.get_image_features).parameters
    pixels = {k: v for k, v in batch.inputs.items() if k in params}
    with torch.no_grad():
        return model.get_image_features(**pixels, output_hidden_states=True, return_dict=True)


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("lm:24", Site.lm(24)), ("vision:3", Site.vision(3)), ("projector", Site.projector()), ("24", Site.lm(24)), (24, Site.lm(24)),
    # sparsify and the paper's release, old and new transformers layouts, mmsae's own hook_point
    ("model.layers.24", Site.lm(24)), ("layers.24", Site.lm(24)), ("language_model.model.layers.24", Site.lm(24)),
    ("model.language_model.layers.24", Site.lm(24)), ("language_model.layers.24", Site.lm(24)),
    # SAELens: resid_pre of block L is resid_post of block L-1
    ("blocks.24.hook_resid_post", Site.lm(24)), ("blocks.24.hook_resid_pre", Site.lm(23)),
    ("model.vision_tower.encoder.layers.3", Site.module("model.vision_tower.encoder.layers.3")),
])
def test_parse_site(name, expected):
    site = parse_site(name)
    assert site == expected and hash(site) == hash(expected)
    assert parse_site(str(site)) == site  # the canonical name round-trips


def test_canonical_names():
    assert [str(s) for s in (Site.lm(2), Site.vision(0), Site.projector(), Site.module("a.b.3"))] == ["lm:2", "vision:0", "projector", "a.b.3"]


@pytest.mark.parametrize("name", ["lm:x", "vision:-1", "lm:", "", "text:3", "blocks.3.hook_mlp_out", "blocks.0.hook_resid_pre", "a b", 2.5])
def test_parse_site_refuses_with_one_line(name):
    with pytest.raises(MmsaeError) as err:
        parse_site(name)
    assert "\n" not in str(err.value)


# --- sites of a model ----------------------------------------------------------------------


@pytest.mark.parametrize("family", family_params())
def test_sites_resolve_to_modules_and_widths(family):
    adapter = tiny_adapter(family)
    named = adapter.named_site_modules()
    n_vision = 2 if adapter.has_vision else 0
    assert sorted(map(str, named.values())) == sorted([f"lm:{i}" for i in range(3)] + [f"vision:{i}" for i in range(n_vision)] + ["projector"] * adapter.has_vision)
    for name, site in named.items():
        module = adapter.model.get_submodule(name)
        assert adapter.resolve_site(name) == site and adapter.site_of_module(name) == site
        assert adapter.site_module(site) is module and adapter.site_module(str(site)) is module
        if site.kind == "vision":  # recorded against the tower's old root (transformers 4 paths)
            assert adapter.resolve_site(name.split(".", 1)[1]) == site
    # today's layer and hook point are the lm sites
    for layer in range(adapter.num_layers):
        assert adapter.layer_module(layer) is adapter.site_module(Site.lm(layer))
        assert adapter.resolve_site(adapter.hook_point(layer)) == Site.lm(layer)
        assert adapter.resolve_site(f"model.layers.{layer}") == adapter.resolve_site(f"blocks.{layer}.hook_resid_post") == Site.lm(layer)
    # any other module is a module site of unknown width
    lm0 = next(name for name, site in named.items() if site == Site.lm(0))
    mlp = adapter.resolve_site(lm0 + ".mlp")
    assert mlp == Site.module(lm0 + ".mlp") and adapter.site_module(mlp) is adapter.model.get_submodule(lm0 + ".mlp")
    assert adapter.site_width(mlp) is None
    # site_width is the width of what the site's module puts out
    batch = mixed_batch(adapter) if adapter.has_vision else adapter.build_inputs(None, ["hello", "a longer text"])
    acts = run_sites(adapter, list(named.values()), batch)
    for site, act in acts.items():
        assert act.shape[-1] == adapter.site_width(site), site


def test_site_errors_name_the_site_and_what_the_model_has():
    llama, llava = tiny_adapter("llama"), tiny_adapter("llava")
    cases = [
        (llama, "vision:0", r"^vision:0: .* text-only model with no vision tower or projector; its sites are lm:0 to lm:2$"),
        (llama, "projector", r"^projector: .* text-only .* its sites are lm:0 to lm:2$"),
        (llava, "vision:40", r"^vision:40 is out of range: the vision tower of .* has 2 blocks \(vision:0 to vision:1\)$"),
        (llava, "lm:3", r"^lm:3 is out of range: the language model of .* has 3 decoder layers \(lm:0 to lm:2\)$"),
        (llava, "model.layers.7", r"^lm:7 is out of range"),
        (llava, "model.vision_tower.nothing.here", r"^'model.vision_tower.nothing.here' is not a module of .*; use lm:0 to lm:2, vision:0 to vision:1, projector"),
        (llava, Site.module("nothing"), r"^'nothing' is not a module of"),
    ]
    for adapter, site, pattern in cases:
        for call in (adapter.resolve_site, adapter.site_module, adapter.site_width):
            with pytest.raises(MmsaeError, match=pattern) as err:
                call(site)
            assert "\n" not in str(err.value)
    with pytest.raises(MmsaeError, match="out of range"):
        llava.vision_layer_module(2)
    # a vision site on a batch without images never runs
    with pytest.raises(MmsaeError, match=r"^vision:0 of .* never ran"):
        run_sites(llava, ["vision:0"], llava.build_inputs([None], ["no image"]))
    batch = mixed_batch(llava)
    with pytest.raises(MmsaeError, match="knows no token geometry"):
        llava.site_rows("model.language_model.layers.0.mlp", batch)
    with pytest.raises(MmsaeError, match="pass the activation captured at vision:0"):
        llava.site_rows("vision:0", batch).take(torch.zeros(5, 32))


# --- capture -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", family_params(VISION))
def test_run_sites_stops_after_the_last_site(family):
    adapter = tiny_adapter(family)
    batch = mixed_batch(adapter)
    with torch.no_grad():  # (transformers keeps hooks of its own once hidden states were asked for)
        hidden = adapter.model(**batch.inputs, output_hidden_states=True).hidden_states
    hooks_before = sum(len(m._forward_hooks) for m in adapter.model.modules())
    calls = []
    watched = {"vision:1": adapter.site_module("vision:1"), "projector": adapter.site_module("projector"), "lm:0": adapter.site_module("lm:0")}
    handles = [m.register_forward_hook(lambda *a, name=name: calls.append(name)) for name, m in watched.items()]
    try:
        vision_only = run_sites(adapter, ["vision:0"], batch)
        assert calls == [] and list(vision_only) == [Site.vision(0)]  # the LM (and the rest of the tower) never ran
        both = run_sites(adapter, [Site.lm(1), "vision:1"], batch)
        assert calls == ["vision:1", "projector", "lm:0"]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(both[Site.lm(1)], hidden[2], rtol=0, atol=0)
    torch.testing.assert_close(both[Site.lm(1)], run_until(adapter, 1, batch), rtol=0, atol=0)
    assert sum(len(m._forward_hooks) for m in adapter.model.modules()) == hooks_before


@pytest.mark.parametrize("family", family_params(VISION))
def test_vision_site_is_the_towers_hidden_state(family):
    adapter = tiny_adapter(family)
    batch = mixed_batch(adapter)
    acts = run_sites(adapter, ["vision:0", "vision:1"], batch)
    hidden = image_features(adapter, batch).hidden_states
    for layer in (0, 1):
        torch.testing.assert_close(acts[Site.vision(layer)], hidden[layer + 1], rtol=0, atol=0)
        rows = adapter.site_rows(Site.vision(layer), batch, include_special=True)
        assert rows.num_rows == acts[Site.vision(layer)].reshape(-1, 32).shape[0] == rows.index.numel()
    # CLIP towers put a CLS token first in every tile; SigLIP, Idefics3 and Qwen2-VL towers none
    rows = adapter.site_rows("vision:0", batch, include_special=True)
    cls = adapter.model.config.vision_config.model_type == "clip_vision_model"
    per_frame = acts[Site.vision(0)].shape[1] if acts[Site.vision(0)].dim() == 3 else None
    assert int(rows.special.sum()) == (acts[Site.vision(0)].shape[0] if cls else 0)
    if cls:
        assert (rows.index[rows.special] % per_frame == 0).all()
    plain = adapter.site_rows("vision:0", batch)
    assert not plain.special.any() and plain.index.numel() == rows.index.numel() - int(rows.special.sum())
    # each sample's grids are filled exactly once
    for i, layout in enumerate(plain.layouts):
        assert (layout.image_size is None) == (batch.layouts[i].image_size is None)
        assert sum(t.rows * t.cols for t in layout.tiles) == layout.num_image_tokens
        cells = layout.tile * 10_000 + layout.row * 100 + layout.col
        assert cells.unique().numel() == cells.numel()
        assert torch.equal(plain.sample[torch.isin(plain.index, layout.positions)], torch.full((layout.num_image_tokens,), i))


def block0_input(adapter, batch) -> torch.Tensor:
    """What vision block 0 receives (patch + position embeddings, per token), flattened to rows."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = adapter.site_module("vision:0").register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_sites(adapter, ["vision:0"], batch)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


@pytest.mark.parametrize("family", family_params(VISION))
@pytest.mark.parametrize("size", [(64, 48), (36, 72)])
def test_vision_site_sends_marked_patch_to_its_cell(family, size):
    """The rows whose embedding a white block changes, painted through the vision layout, land on it.

    Block 0's input is per token, in the order of the tower's rows (Qwen2.5-VL's window order
    included), so it names the patches the block shows independently of the layout code."""
    adapter = tiny_adapter(family)
    image = marked_image(size)
    white = np.asarray(image)[..., 0] > 0
    batch = adapter.build_inputs([image], ["where?"])
    black = adapter.build_inputs([Image.new("RGB", size)], ["where?"])
    change = (block0_input(adapter, batch) - block0_input(adapter, black)).norm(dim=-1)
    rows = adapter.site_rows("vision:0", batch, include_special=True)
    assert (change[rows.index[rows.special]] == 0).all()  # CLS does not see the image
    layout = rows.layouts[0]
    values = change[layout.positions].numpy()
    checked = 0
    for t in range(len(layout.tiles)):
        in_tile = np.flatnonzero(layout.tile.numpy() == t)
        best = in_tile[np.argmax(values[in_tile])]
        if values[best] < 0.6 * values.max():  # no patch of this tile is (nearly) all block
            continue
        marked = np.zeros(layout.num_image_tokens, dtype=np.float32)
        marked[best] = 1.0
        region = image_heatmap(layout, marked) > 0
        assert region.any() and white[region].mean() > 0.5, (t, white[region].mean())
        checked += 1
    # the block shows in the base / global image and in at least one crop or sub-image
    assert checked >= (2 if len(layout.tiles) > 1 else 1)


# --- projector -----------------------------------------------------------------------------


def lm_image_embeddings(adapter, batch) -> torch.Tensor:
    """The inputs_embeds the language model receives [B, T, d] (image features scattered in)."""
    seen = []
    handle = adapter.language_model().register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        run_sites(adapter, ["lm:0"], batch)
    finally:
        handle.remove()
    return seen[0]


def cell_key(rows) -> torch.Tensor:
    """One number per (sample, tile, row, col) of a SiteRows (or a TokenLayout: sample 0)."""
    sample = getattr(rows, "sample", 0)
    return sample * 10**9 + rows.tile * 10**6 + rows.row * 1000 + rows.col


@pytest.mark.parametrize("family", family_params(["llava", "paligemma", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"]))
def test_projector_rows_are_the_lm_image_tokens(family):
    """Families with nothing between projector and sequence: the projector's rows, by cell, are
    the image features get_image_features returns and the LM receives at the layout's tokens."""
    adapter = tiny_adapter(family)
    batch = mixed_batch(adapter)
    projected = run_sites(adapter, ["projector"], batch)[Site.projector()]
    rows = adapter.site_rows("projector", batch)
    embeds = lm_image_embeddings(adapter, batch)
    pooled = image_features(adapter, batch).pooler_output
    features = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])  # in placeholder order
    placeholder = batch.input_ids == adapter.image_token_id
    rank = placeholder.flatten().cumsum(0).reshape(placeholder.shape) - 1
    for i, (site_layout, lm_layout) in enumerate(zip(rows.layouts, batch.layouts)):
        assert site_layout.tiles == lm_layout.tiles and site_layout.image_size == lm_layout.image_size
        mine, theirs = cell_key(site_layout).argsort(), cell_key(lm_layout).argsort()
        got = projected.reshape(-1, projected.shape[-1])[site_layout.positions[mine]]
        torch.testing.assert_close(got, embeds[i, lm_layout.positions[theirs]], rtol=0, atol=0)
        torch.testing.assert_close(got, features[rank[i, lm_layout.positions[theirs]]], rtol=0, atol=0)


def feature_block(adapter) -> int:
    """The vision block whose output the projector reads (config.vision_feature_layer indexes hidden_states)."""
    return adapter.model.config.vision_feature_layer % (len(adapter.vision_layers()) + 1) - 1


@pytest.mark.parametrize("family", family_params(["llava_next", "llava_onevision"]))
def test_anyres_projector_is_per_crop_before_packing(family):
    """LLaVA-NeXT / OneVision: the projector site is every crop's features before unpadding,
    newlines (and OneVision's shrinking); the model's own packing of it is get_image_features."""
    adapter = tiny_adapter(family)
    config = adapter.model.config
    batch = mixed_batch(adapter)
    projected = run_sites(adapter, ["projector"], batch)[Site.projector()]
    crops = [len(layout.tiles) for layout in adapter.site_rows("projector", batch).layouts if layout.image_size is not None]
    pack = dict(vision_feature_select_strategy=config.vision_feature_select_strategy) if family == "llava_next" else dict(vision_aspect_ratio=config.vision_aspect_ratio)
    packed, _ = adapter.model.model.pack_image_features(list(projected.split(crops)), batch.inputs["image_sizes"], image_newline=adapter.model.model.image_newline, **pack)
    expected = torch.cat(list(image_features(adapter, batch).pooler_output))
    packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
    torch.testing.assert_close(packed, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", family_params(["llava", "llava_next", "llava_onevision"]))
def test_projector_rows_match_vision_rows(family):
    """LLaVA's projector maps each patch of the feature layer on its own, so the projector row of
    a cell is the projector applied to the vision row of the same (sample, tile, row, col)."""
    adapter = tiny_adapter(family)
    batch = mixed_batch(adapter)
    layer = feature_block(adapter)
    acts = run_sites(adapter, [Site.vision(layer), "projector"], batch)
    vision, projected = acts[Site.vision(layer)], acts[Site.projector()]
    vision_rows = adapter.site_rows(Site.vision(layer), batch)
    projector_rows = adapter.site_rows("projector", batch)
    assert torch.equal(cell_key(vision_rows).sort().values, cell_key(projector_rows).sort().values)
    v, p = cell_key(vision_rows).argsort(), cell_key(projector_rows).argsort()
    with torch.no_grad():
        expected = adapter.projector()(vision_rows.take(vision)[v])
    torch.testing.assert_close(projector_rows.take(projected)[p], expected, rtol=1e-5, atol=1e-5)
