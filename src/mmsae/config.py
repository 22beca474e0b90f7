"""Option checks shared by every stage's config dataclass, so the CLI and the Python API agree.

Each config calls :func:`check_config` from ``__post_init__``. Bounds are declared next to the
option, in the field's metadata (the CLI reads only ``help`` and ``cli`` from it)::

    batch_size: int = field(default=8, metadata={"help": "...", "min": 1})

``min`` and ``max`` are inclusive, ``gt`` is strict. Every number must be finite (unless the
field says ``"finite": False``), an ``int`` option must be a whole number, and an option that
may be ``None`` is not checked when it is. List options are checked element by element, and so
are options typed ``X | list[X]`` (one value or several: a grid of runs, see ``mmsae.train``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, get_args, get_origin

from .errors import MmsaeError


def flag(name: str) -> str:
    """The CLI spelling of a config field: ``checkpoint_every`` -> ``--checkpoint-every``."""
    return "--" + name.replace("_", "-")


@functools.cache
def _numeric_fields(cls: type) -> tuple[tuple[dataclasses.Field, type, bool], ...]:
    """``(field, int or float, may be None)`` for each field holding a number or a list of numbers."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        tp, optional = option_type(hints[f.name])
        if get_origin(tp) in (list, tuple) and get_args(tp):
            tp, _ = option_type(get_args(tp)[0])
        if tp in (int, float):
            found.append((f, tp, optional))
    return tuple(found)


def option_type(tp: Any) -> tuple[Any, bool]:
    """``(the type an option's values take, whether it may be None)``: ``int | None`` -> ``(int, True)``;
    ``int | list[int]`` (one value or several) -> ``(list[int], False)``, so it is checked and
    parsed like a list option."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if len(args) == 1:
            return args[0], optional
        if len(args) == 2 and get_origin(args[1]) is list and get_args(args[1]) == (args[0],):
            return args[1], optional
    return tp, False


def check_config(cfg: Any) -> None:
    """Raise a one-line MmsaeError naming the first option of ``cfg`` that is out of its bounds."""
    for f, kind, optional in _numeric_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            _check_number(f, kind, v)


def _check_number(f: dataclasses.Field, kind: type, v: Any) -> None:
    name, meta = flag(f.name), f.metadata
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise MmsaeError(f"{name} must be a number, got {v!r}")
    if kind is int and not isinstance(v, numbers.Integral):
        raise MmsaeError(f"{name} must be a whole number, got {v!r}")
    if meta.get("finite", True) and not math.isfinite(v):
        raise MmsaeError(f"{name} must be a finite number, got {v}")
    if "min" in meta and v < meta["min"]:
        raise MmsaeError(f"{name} must be at least {meta['min']}, got {v}")
    if "gt" in meta and v <= meta["gt"]:
        raise MmsaeError(f"{name} must be greater than {meta['gt']}, got {v}")
    if "max" in meta and v > meta["max"]:
        raise MmsaeError(f"{name} must be at most {meta['max']}, got {v}")
