import json

import numpy as np
import pytest

from mmsae.data import Sample
from mmsae.data.shapes import (COLOURS, SHAPES, ShapesWorld, concept_mask, question_type, render,
                               scene_from_meta, second_shade)


def test_deterministic_and_seeded():
    a, b = ShapesWorld(seed=3).scene(7), ShapesWorld(seed=3).scene(7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption and a.qa == b.qa
    assert a.masks.keys() == b.masks.keys()
    other = ShapesWorld(seed=4).scene(7)
    assert not np.array_equal(np.asarray(a.image), np.asarray(other.image))


def test_sample_meta_is_json_and_regenerates_exact_masks():
    world = ShapesWorld(seed=1, size=160)
    sample = world.sample(5)
    assert isinstance(sample, Sample) and sample.id == 5 and sample.image.size == (160, 160)
    meta = json.loads(json.dumps(sample.meta))
    again = scene_from_meta(meta)
    direct = world.scene(5)
    assert np.array_equal(np.asarray(again.image), np.asarray(direct.image))
    for name, mask in direct.masks.items():
        assert np.array_equal(ShapesWorld.masks_from_meta(meta)[name], mask)
    with pytest.raises(ValueError):
        scene_from_meta({"foo": 1})


def test_masks_agree_with_pixels():
    world = ShapesWorld(seed=0)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    checked = 0
    for i in range(40):
        scene = world.scene(i)
        pixels = np.asarray(scene.image).astype(np.float32)
        for obj, visible in zip(scene.meta["objects"], scene.object_masks):
            fill = visible & scene.masks[obj["colour"]]
            if fill.sum() < 30:
                continue
            values = pixels[fill]
            expected = np.array(COLOURS[obj["colour"]], dtype=np.float32)
            shade = np.array(second_shade(COLOURS[obj["colour"]]), dtype=np.float32)
            # every fill pixel is the object's colour or its pattern shade, and most are the colour
            is_colour = np.all(values == expected, axis=1)
            is_shade = np.all(values == shade, axis=1)
            assert np.all(is_colour | is_shade)
            assert is_colour.mean() > 0.45
            nearest = np.argmin(((values[is_colour][:, None] - palette[None]) ** 2).sum(-1), axis=1)
            assert list(COLOURS)[int(np.bincount(nearest).argmax())] == obj["colour"]
            checked += 1
        # the scene mask and the object masks partition the image (holes show what lies below)
        union = scene.masks[scene.meta["scene"]].astype(int) + sum(m.astype(int) for m in scene.object_masks)
        assert np.all(union == 1)
    assert checked > 50


def test_qa_matches_scene():
    world = ShapesWorld(seed=2)
    kinds = set()
    for i in range(30):
        scene = world.scene(i)
        objects = scene.meta["objects"]
        for question, answer in scene.qa:
            kind = question_type(question)
            kinds.add(kind)
            if kind == "colour":
                shape = question.split()[-1].rstrip("?")
                assert [o["colour"] for o in objects if o["shape"] == shape] == [answer]
                # the answer's colour mask overlaps the shape's mask
                assert (scene.masks[answer] & scene.masks[shape]).any() or not scene.masks[shape].any()
            elif kind == "shape":
                colour = question.split()[-2]
                assert [o["shape"] for o in objects if o["colour"] == colour] == [answer]
            elif kind == "count":
                assert answer == ["zero", "one", "two", "three", "four"][len(objects)]
            elif kind == "scene":
                assert answer == scene.meta["scene"]
            elif kind == "presence":
                shape = question.split()[-1].rstrip("?")
                assert (answer == "yes") == any(o["shape"] == shape for o in objects)
            elif kind == "caption":
                assert answer == scene.caption
    assert {"colour", "shape", "pattern", "count", "scene", "presence", "caption"} <= kinds


def test_concept_mask_phrases():
    desc = {"world": "shapes", "seed": 0, "index": 0, "size": 128, "scene": "grass", "noise_seed": 1, "objects": [
        {"shape": "star", "colour": "red", "texture": "striped", "part": None, "x": 0.25, "y": 0.25, "radius": 0.15, "rotation": 0.0},
        {"shape": "circle", "colour": "blue", "texture": "solid", "part": "hole", "x": 0.7, "y": 0.7, "radius": 0.15, "rotation": 0.0},
        {"shape": "square", "colour": "red", "texture": "dotted", "part": "handle", "x": 0.72, "y": 0.22, "radius": 0.12, "rotation": 0.0},
    ]}
    scene = render(desc)
    star, circle, square = scene.object_masks
    assert np.array_equal(concept_mask(scene, "a striped star"), star)
    assert np.array_equal(concept_mask(scene, "Stars"), star)
    assert np.array_equal(concept_mask(scene, "red objects"), star | square)
    assert np.array_equal(concept_mask(scene, "red"), scene.masks["red"])
    assert not (concept_mask(scene, "red") & scene.part_masks[2]).any()  # the handle is not red
    assert np.array_equal(concept_mask(scene, "crimson shapes"), star | square)
    assert np.array_equal(concept_mask(scene, "round blue ball"), circle)
    assert np.array_equal(concept_mask(scene, "holes"), scene.part_masks[1])
    assert np.array_equal(concept_mask(scene, "the lawn"), scene.masks["grass"])
    assert np.array_equal(concept_mask(scene, "background"), scene.masks["grass"])
    assert np.array_equal(concept_mask(scene, "polka dots"), scene.masks["dotted"])
    assert concept_mask(scene, "water").sum() == 0       # known concept, absent here
    assert concept_mask(scene, "green triangle").sum() == 0
    assert concept_mask(scene, "a happy dog") is None    # nothing the world knows
    # the hole shows the grass, and belongs to the scene, not to the circle
    assert (scene.part_masks[1] & scene.masks["grass"]).sum() == scene.part_masks[1].sum() > 0
    assert not (scene.part_masks[1] & circle).any()
    assert set(scene.concepts.values()) <= {"scene", "object", "part", "texture", "colour"}


def test_any_size_and_all_shapes_render():
    for size in (56, 300):
        scene = ShapesWorld(seed=5, size=size).scene(0)
        assert scene.image.size == (size, size)
        assert all(m.shape == (size, size) and m.dtype == bool for m in scene.masks.values())
    seen = {o["shape"] for i in range(60) for o in ShapesWorld(seed=0).describe(i)["objects"]}
    assert seen == set(SHAPES)
