"""Data sources: image folders, JSONL files, Hugging Face datasets and the synthetic shapes world.

Every source yields :class:`~mmsae.data.Sample` objects whose ``id`` is the sample's index in the
source's fixed order, so a run can restart at a given id and ranks of a distributed run can take
disjoint slices (rank ``r`` of ``w`` takes the ids ``i`` with ``i % w == r``). A sample whose image
is missing or unreadable is skipped, counted in ``source.skipped`` and reported, never raised.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import MmsaeError
from . import Sample

DEFAULT_PROMPT = "Describe this image."
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Column names tried, in order, when the caller does not name the image or text column.
IMAGE_COLUMN_NAMES = ("image", "images", "img", "picture", "photo", "pixel_values")
TEXT_COLUMN_NAMES = ("text", "caption", "captions", "question", "prompt", "query", "instruction",
                     "conversations", "messages", "sentence", "description", "label_text")
_DATA_FILE_EXTENSIONS = {".parquet", ".arrow", ".csv", ".json", ".jsonl", ".tsv"}
# Longest side an image is kept at once decoded: far above any model's input size, and it bounds
# the memory of a very large but legal image (a 10000 x 10000 PNG of a few KB).
MAX_SIDE = 4096


class UnreadableImage(Exception):
    """Raised inside a source when one sample's image cannot be used; the sample is skipped."""


def load_image(value: Any, base_dir: Path | None = None) -> Image.Image:
    """Decode an image given as a PIL image, a path, raw bytes or a ``{"bytes", "path"}`` dict.

    The pixels are fully decoded (``.load()``) and converted to RGB here, so a truncated file
    fails now rather than later inside the model's processor. Every stage opens images through
    this function (user-named files through :func:`open_image`), so all share its guards: an
    image over Pillow's decompression-bomb limit (2 x ``Image.MAX_IMAGE_PIXELS``) is refused
    before decoding, and one whose longer side exceeds ``MAX_SIDE`` is reduced to it on load.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(_resolve(value["path"], base_dir))
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(_resolve(value, base_dir))
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            raise UnreadableImage(f"no image (got {type(value).__name__})")
        return _decode(image)
    except UnreadableImage:
        raise
    except FileNotFoundError as e:
        raise UnreadableImage(f"missing file {e.filename}") from e
    except Image.DecompressionBombError as e:  # raised by Image.open from the header, before decoding
        raise UnreadableImage(f"too large to decode safely: {str(e).rstrip('.')}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise UnreadableImage(f"unreadable image: {e}") from e


def _decode(image: Image.Image) -> Image.Image:
    """Decode an opened image to RGB with its longer side at most ``MAX_SIDE``."""
    w, h = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > 2 * limit:  # what Image.open refuses, for images handed over already open
        raise UnreadableImage(f"too large to decode safely: {w}x{h} = {w * h} pixels, over the limit of {2 * limit}")
    if max(w, h) > MAX_SIDE:
        scale = MAX_SIDE / max(w, h)
        # JPEG decodes straight at 1/2, 1/4 or 1/8 size; formats without a reduced decode ignore this
        image.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
    image.load()
    if max(image.size) > MAX_SIDE:
        # reduce in the file's own mode (1 byte a pixel for grey and palette images), before the
        # 4-bytes-a-pixel RGB copy; a box filter (an area average) is 3x faster than Lanczos here
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    return image.convert("RGB")


def open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """An image file the user named (``what`` says which option), decoded as :func:`load_image` does.

    Unlike a data sample, which is skipped, an unusable file here is a one-line MmsaeError.
    """
    try:
        return load_image(path)
    except UnreadableImage as e:
        raise MmsaeError(f"cannot use {what} {path}: {e}; give a readable image file") from e


def _resolve(path: str | os.PathLike, base_dir: Path | None) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


class Source:
    """A fixed-order sequence of samples. Subclasses implement ``_ids`` and ``_load``.

    ``num_samples`` is the number of ids (``None`` when a streamed dataset does not know it).
    ``skipped`` lists ``(id, reason)`` for every sample skipped so far.
    """

    spec: str = ""
    num_samples: int | None = None

    def __init__(self) -> None:
        self.skipped: list[tuple[int, str]] = []

    def samples(
        self,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        stop: int | None = None,
        on_skip: Callable[[int, str], None] | None = None,
    ) -> Iterator[Sample]:
        """Yield the samples with ``start <= id < stop`` and ``id % world == rank``, in id order."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        if self.num_samples is not None:
            stop = self.num_samples if stop is None else min(stop, self.num_samples)
        first = start + (rank - start) % world
        for sample_id, record in self._records(first, world, stop):
            try:
                yield self._load(sample_id, record)
            except UnreadableImage as e:
                self.skipped.append((sample_id, str(e)))
                if on_skip is not None:
                    on_skip(sample_id, str(e))

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"{self.spec} is streamed and does not know its length")
        return self.num_samples

    def _records(self, first: int, step: int, stop: int | None) -> Iterator[tuple[int, Any]]:
        """Yield ``(id, raw record)`` for ids ``first, first + step, ...`` below ``stop``."""
        raise NotImplementedError

    def _load(self, sample_id: int, record: Any) -> Sample:
        """Turn a raw record into a Sample; raise UnreadableImage to skip it."""
        raise NotImplementedError


class ImageFolderSource(Source):
    """Every image file under a folder (recursively, sorted by relative path); text is the prompt."""

    def __init__(self, folder: Path, prompt: str):
        super().__init__()
        self.spec, self.folder, self.prompt = str(folder), folder, prompt
        self.files = sorted(
            (p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        )
        if not self.files:
            raise MmsaeError(f"folder {folder} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                             "point --data at a folder of images, a .jsonl, a dataset or shapes:N")
        self.num_samples = len(self.files)

    def _records(self, first, step, stop):
        for i in range(first, stop, step):
            yield i, self.files[i]

    def _load(self, sample_id, record):
        return Sample(sample_id, load_image(self.folder / record), self.prompt, {"path": record})


class JsonlSource(Source):
    """A JSONL file of ``{"image": path, "text": str, ...}``; image paths are relative to the file.

    A row without an image (absent or null) is a text-only sample; other keys go into ``meta``.
    """

    def __init__(self, path: Path, prompt: str, image_column: str | None, text_column: str | None):
        super().__init__()
        self.spec, self.path, self.prompt = str(path), path, prompt
        self.image_key, self.text_key = image_column or "image", text_column or "text"
        with open(path, encoding="utf-8") as f:
            self.lines = [line for line in f if line.strip()]
        self.num_samples = len(self.lines)

    def _records(self, first, step, stop):
        for i in range(first, stop, step):
            yield i, self.lines[i]

    def _load(self, sample_id, record):
        try:
            row = json.loads(record)
        except json.JSONDecodeError as e:
            raise UnreadableImage(f"line is not valid JSON: {e.msg}") from e
        if not isinstance(row, dict):
            raise UnreadableImage("line is not a JSON object")
        image_ref = row.get(self.image_key)
        image = None if image_ref is None else load_image(image_ref, self.path.parent)
        text = _text_value(row.get(self.text_key)) or self.prompt
        meta = {k: v for k, v in row.items() if k not in (self.image_key, self.text_key)}
        if isinstance(image_ref, str):
            meta["path"] = image_ref
        return Sample(sample_id, image, text, meta)


class HFDatasetSource(Source):
    """A Hugging Face dataset (map-style from disk, or streamed), with auto-detected columns."""

    def __init__(self, dataset, spec: str, prompt: str, image_column: str | None, text_column: str | None,
                 allow_text_only: bool):
        super().__init__()
        import datasets

        self.spec, self.prompt = spec, prompt
        features = dataset.features
        if features is None:  # a streamed dataset without metadata: learn the columns from row 0
            first = next(iter(dataset), None)
            if first is None:
                raise MmsaeError(f"dataset {spec} is empty; choose another --data or --split")
            features = datasets.Features({k: _guess_feature(v) for k, v in first.items()})
        columns = list(features)
        self.image_column = _pick_column("image", image_column, columns, features, spec)
        self.text_column = _pick_column("text", text_column, columns, features, spec)
        if self.image_column is None and not allow_text_only:
            raise MmsaeError(f"dataset {spec} has no image column (columns: {', '.join(columns)}); "
                             "name one with --image-column, or use a text-only model")
        # Decode images ourselves, so a corrupt one is skipped instead of raising mid-iteration.
        if self.image_column is not None:
            feature = features[self.image_column]
            if isinstance(feature, datasets.Image):
                dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
            elif isinstance(getattr(feature, "feature", None), datasets.Image):
                dataset = dataset.cast_column(self.image_column, type(feature)(datasets.Image(decode=False)))
        self.meta_columns = [c for c in columns if c not in (self.image_column, self.text_column)
                             and isinstance(features[c], datasets.Value)]
        self.dataset = dataset
        self.streamed = isinstance(dataset, datasets.IterableDataset)
        self.num_samples = None if self.streamed else len(dataset)

    def _records(self, first, step, stop):
        if not self.streamed:
            for i in range(first, stop, step):
                yield i, self.dataset[i]
            return
        rows = self.dataset.skip(first) if first else self.dataset
        for offset, row in enumerate(rows):
            i = first + offset
            if stop is not None and i >= stop:
                return
            if offset % step == 0:
                yield i, row

    def _load(self, sample_id, record):
        image = None
        if self.image_column is not None:
            value = record.get(self.image_column)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is None:
                raise UnreadableImage("missing image")
            image = load_image(value)
        text = _text_value(record.get(self.text_column)) if self.text_column else ""
        meta = {"row": sample_id, **{c: record[c] for c in self.meta_columns if c in record}}
        return Sample(sample_id, image, text or self.prompt, meta)


class ShapesSource(Source):
    """``shapes:N[:SEED]``: the first N scenes of the synthetic shapes world."""

    def __init__(self, n: int, seed: int, prompt: str):
        super().__init__()
        from .shapes import ShapesWorld  # imported lazily: only this source needs it

        self.spec, self.prompt = f"shapes:{n}:{seed}", prompt
        self.world = ShapesWorld(seed=seed)
        self.num_samples = n

    def _records(self, first, step, stop):
        for i in range(first, stop, step):
            yield i, None

    def _load(self, sample_id, record):
        sample = self.world.sample(sample_id)
        if not sample.text:
            sample.text = self.prompt
        return sample


def open_source(
    spec: str,
    split: str = "train",
    image_column: str | None = None,
    text_column: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    allow_text_only: bool = False,
) -> Source:
    """Open a data source from a spec.

    ``spec`` is one of: a folder of images; a ``.jsonl`` file of ``{"image", "text"}``; a Hugging
    Face dataset as a local path (``save_to_disk`` folder, or a folder/file of parquet, arrow,
    csv or json data) or a hub name, ``NAME`` or ``NAME:CONFIG`` (streamed); or
    ``shapes:N[:SEED]``. ``prompt`` is the text used for samples that have none.
    ``allow_text_only`` accepts datasets without an image column (for text-only models).
    """
    if spec.startswith("shapes:"):
        parts = spec.split(":")[1:]
        try:
            n, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
            if len(parts) > 2 or n <= 0:
                raise ValueError
        except ValueError:
            raise MmsaeError(f"bad shapes spec {spec!r}; write shapes:N or shapes:N:SEED with N > 0") from None
        return ShapesSource(n, seed, prompt)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        return JsonlSource(path, prompt, image_column, text_column)
    if path.is_dir() and _is_saved_dataset(path):
        dataset = _load_from_disk(path, split)
    elif path.is_file() and path.suffix in _DATA_FILE_EXTENSIONS:
        dataset = _load_dataset(_builder_for(path), spec, split, data_files=str(path))
    elif path.is_dir() and _has_data_files(path):
        dataset = _load_dataset(str(path), spec, split)
    elif path.is_dir():
        return ImageFolderSource(path, prompt)
    elif path.exists():
        raise MmsaeError(f"cannot read {spec} as data: expected a folder of images, a .jsonl file, "
                         "a dataset folder or a parquet/arrow/csv/json file")
    elif spec.count("/") <= 1 and not spec.startswith((".", "/", "~")):
        # a hub name such as "lmms-lab/LLaVA-NeXT-Data", or NAME:CONFIG for a dataset with subsets
        name, _, config = spec.partition(":")
        dataset = _load_dataset(name, spec, split, **({"name": config} if config else {}))
    else:
        raise MmsaeError(f"data {spec} does not exist; give a folder of images, a .jsonl file, a dataset path or name, or shapes:N")
    return HFDatasetSource(dataset, spec, prompt, image_column, text_column, allow_text_only)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _has_data_files(path: Path) -> bool:
    return any(p.suffix in _DATA_FILE_EXTENSIONS and p.name != "metadata.jsonl"
               for p in path.rglob("*") if p.is_file()) and not any(
        p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))


def _builder_for(path: Path) -> str:
    return {".jsonl": "json", ".tsv": "csv"}.get(path.suffix, path.suffix.lstrip("."))


def _load_from_disk(path: Path, split: str):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise MmsaeError(f"cannot load dataset {path}: {e}") from e
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise MmsaeError(f"dataset {path} has no split {split!r} (splits: {', '.join(dataset)}); pass --split")
        dataset = dataset[split]
    return dataset


def _load_dataset(path: str, spec: str, split: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(path, split=split, streaming=True, **kwargs)
    except ValueError as e:
        if "split" in str(e).lower():
            raise MmsaeError(f"dataset {spec} has no split {split!r}: {e}; pass --split") from e
        raise MmsaeError(f"cannot load dataset {spec}: {e}") from e
    except Exception as e:  # hub errors come in many types (offline, not found, gated)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MmsaeError(f"cannot load dataset {spec}: {reason}; check the name, the path or the network") from e


def _guess_feature(value: Any):
    import datasets

    if isinstance(value, Image.Image) or (isinstance(value, dict) and "bytes" in value):
        return datasets.Image()
    if isinstance(value, str):
        return datasets.Value("string")
    if isinstance(value, bool):
        return datasets.Value("bool")
    if isinstance(value, int):
        return datasets.Value("int64")
    if isinstance(value, float):
        return datasets.Value("float64")
    return datasets.Value("null") if value is None else datasets.Json()


def _pick_column(kind: str, given: str | None, columns: list[str], features, spec: str) -> str | None:
    import datasets

    if given is not None:
        if given not in columns:
            raise MmsaeError(f"dataset {spec} has no column {given!r} (columns: {', '.join(columns)}); "
                             f"fix --{kind}-column")
        return given
    if kind == "image":
        for c in columns:
            f = features[c]
            if isinstance(f, datasets.Image) or isinstance(getattr(f, "feature", None), datasets.Image):
                return c
        names = IMAGE_COLUMN_NAMES
    else:
        names = TEXT_COLUMN_NAMES
    lowered = {c.lower(): c for c in columns}
    return next((lowered[n] for n in names if n in lowered), None)


def _text_value(value: Any) -> str:
    """Text from a plain string, a list of captions, or a conversation (first user turn)."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, dict):
            text = str(first.get("value", first.get("content", "")))
        else:
            text = str(first)
    else:
        text = str(value)
    return text.replace("<image>", "").strip()
