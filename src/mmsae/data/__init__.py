"""Data sources. A source yields :class:`Sample` with stable ids, whatever it reads from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    """One item of a data source. ``id`` is its index in the source's fixed order."""

    id: int
    image: Image.Image | None
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
