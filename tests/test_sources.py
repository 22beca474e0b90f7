"""Data sources: ids, order, rank slicing, corrupt images, dataset column detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmsae.data.sources import open_source
from mmsae.errors import MmsaeError


def _image(color: tuple[int, int, int], size=(16, 12)) -> Image.Image:
    return Image.new("RGB", size, color)


def _colors(n: int) -> list[tuple[int, int, int]]:
    return [(10 * i, 255 - 10 * i, 7 * i % 256) for i in range(n)]


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, c in enumerate(_colors(5)):
        target = folder / ("sub" if i % 2 else "") / f"img{i}.png"
        _image(c).save(target)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def test_image_folder_order_ids_and_skips(image_folder):
    source = open_source(str(image_folder), prompt="What is this?")
    samples = list(source)
    # sorted by relative path, broken.jpg (first in order) skipped and reported
    assert source.num_samples == 6
    assert [s.id for s in samples] == [1, 2, 3, 4, 5]
    assert [s.meta["path"] for s in samples] == ["img0.png", "img2.png", "img4.png", "sub/img1.png", "sub/img3.png"]
    assert all(s.text == "What is this?" for s in samples)
    assert samples[0].image.getpixel((0, 0)) == _colors(5)[0]
    assert samples[3].image.getpixel((3, 3)) == _colors(5)[1]
    assert [i for i, _ in source.skipped] == [0]
    assert "unreadable" in source.skipped[0][1]


def test_rank_slicing_and_start_partition_the_ids(image_folder):
    source = open_source(str(image_folder))
    everything = [s.id for s in source.samples()]
    by_rank = [[s.id for s in source.samples(rank=r, world=3)] for r in range(3)]
    assert sorted(sum(by_rank, [])) == everything
    assert all(i % 3 == r for r, ids in enumerate(by_rank) for i in ids)
    assert [s.id for s in source.samples(start=3)] == [i for i in everything if i >= 3]
    assert [s.id for s in source.samples(start=2, rank=1, world=2)] == [3, 5]
    assert [s.id for s in source.samples(stop=3)] == [1, 2]


def test_jsonl_relative_paths_corrupt_and_missing_images(tmp_path):
    (tmp_path / "pics").mkdir()
    colors = _colors(3)
    for i, c in enumerate(colors):
        _image(c).save(tmp_path / "pics" / f"{i}.png")
    (tmp_path / "pics" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    # a PNG cut in half: the header reads, the pixels do not
    full = (tmp_path / "pics" / "0.png").read_bytes()
    (tmp_path / "pics" / "cut.png").write_bytes(full[: len(full) // 2])
    rows = [
        {"image": "pics/0.png", "text": "zero", "label": 0},
        {"image": "pics/bad.png", "text": "bad"},
        {"image": "pics/nowhere.png", "text": "missing"},
        {"image": "pics/1.png", "text": "one"},
        {"text": "text only"},
        {"image": "pics/cut.png", "text": "cut"},
        {"image": str(tmp_path / "pics" / "2.png")},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n{not json\n")
    source = open_source(str(data), prompt="P")
    samples = list(source)
    assert [s.id for s in samples] == [0, 3, 4, 6]
    assert [s.text for s in samples] == ["zero", "one", "text only", "P"]
    assert samples[0].meta == {"label": 0, "path": "pics/0.png"}
    assert samples[1].image.getpixel((0, 0)) == colors[1]
    assert samples[2].image is None
    assert samples[3].image.getpixel((0, 0)) == colors[2]
    skipped = dict(source.skipped)
    assert sorted(skipped) == [1, 2, 5, 7]
    assert "missing file" in skipped[2] and "JSON" in skipped[7]


def _hf_rows(n: int):
    return {"img": [_image(c) for c in _colors(n)], "caption": [f"caption {i}" for i in range(n)],
            "label": list(range(n))}


def test_saved_dataset_autodetects_columns_and_skips_corrupt(tmp_path):
    import datasets
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(_hf_rows(4), features=features)
    # corrupt row 2 at the byte level, which the Image feature accepts without decoding
    raw = ds.cast_column("img", datasets.Image(decode=False)).to_dict()
    raw["img"][2] = {"bytes": b"garbage", "path": None}
    ds = datasets.Dataset.from_dict(raw, features=datasets.Features({**features, "img": datasets.Image(decode=False)}))
    ds = ds.cast_column("img", datasets.Image())
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))

    source = open_source(str(tmp_path / "saved"))
    assert source.image_column == "img" and source.text_column == "caption"
    samples = list(source)
    assert [s.id for s in samples] == [0, 1, 3]
    assert [s.text for s in samples] == ["caption 0", "caption 1", "caption 3"]
    assert samples[2].image.getpixel((0, 0)) == _colors(4)[3]
    assert samples[1].meta == {"row": 1, "label": 1}
    assert [i for i, _ in source.skipped] == [2]
    assert [s.id for s in open_source(str(tmp_path / "saved"), split="test")] == [0]
    with pytest.raises(MmsaeError, match="no split 'validation'.*train"):
        open_source(str(tmp_path / "saved"), split="validation")


def test_parquet_dataset_is_streamed_and_sliced(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict(_hf_rows(7), features=datasets.Features(
        {"img": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("int64")}))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    source = open_source(str(tmp_path / "pq"), prompt="unused")
    assert source.num_samples is None  # streamed
    ids = [[s.id for s in source.samples(start=1, rank=r, world=2)] for r in range(2)]
    assert ids == [[2, 4, 6], [1, 3, 5]]
    sample = next(source.samples(start=5))
    assert (sample.id, sample.text, sample.meta["label"]) == (5, "caption 5", 5)
    assert np.array_equal(np.asarray(sample.image), np.asarray(_image(_colors(7)[5])))
    single = open_source(str(tmp_path / "pq" / "train.parquet"))
    assert [s.id for s in single.samples(stop=3)] == [0, 1, 2]


def test_dataset_without_images_is_an_error_naming_columns(tmp_path):
    import datasets
    datasets.Dataset.from_dict({"sentence": ["a", "b"], "score": [1, 2]}).save_to_disk(str(tmp_path / "t"))
    with pytest.raises(MmsaeError, match="no image column.*sentence, score"):
        open_source(str(tmp_path / "t"))
    text_only = open_source(str(tmp_path / "t"), allow_text_only=True)
    assert [(s.image, s.text) for s in text_only] == [(None, "a"), (None, "b")]
    with pytest.raises(MmsaeError, match="no column 'pixels'"):
        open_source(str(tmp_path / "t"), image_column="pixels")


def test_bad_specs(tmp_path):
    with pytest.raises(MmsaeError, match="does not exist"):
        open_source(str(tmp_path / "nothing" / "here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmsaeError, match="no image files"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(MmsaeError, match="shapes:N"):
        open_source("shapes:x")


def test_shapes_source():
    source = open_source("shapes:6:3")
    samples = list(source.samples(rank=1, world=2))
    assert [s.id for s in samples] == [1, 3, 5]
    again = list(open_source("shapes:6:3").samples(start=3, stop=4))
    assert again[0].id == 3
    assert np.array_equal(np.asarray(again[0].image), np.asarray(samples[1].image))
    assert all(s.image is not None and s.text for s in samples)


def test_llava_style_rows_list_of_images_and_conversations(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({
        "images": [[_image((1, 2, 3))], [], [_image((9, 9, 9)), _image((0, 0, 0))]],
        "conversations": [[{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}],
                          [{"from": "human", "value": "no picture"}],
                          [{"from": "human", "value": "Two?"}]],
    })
    ds.save_to_disk(str(tmp_path / "llava"))
    source = open_source(str(tmp_path / "llava"))
    samples = list(source)
    assert [(s.id, s.text) for s in samples] == [(0, "What is it?"), (2, "Two?")]
    assert samples[1].image.getpixel((0, 0)) == (9, 9, 9)  # the first image of a list
    assert source.skipped == [(1, "missing image")]
