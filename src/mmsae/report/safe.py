"""Escaping for everything the dashboard writes.

Explanations come from a model and scores, steering outputs and token contexts from data, so any
of them may hold markup or script. Two rules keep the site safe:

* HTML written by Python goes through :func:`esc` (``&``, ``<``, ``>``, both quotes);
* data handed to the browser's JavaScript is JSON from :func:`js_json`, where ``<``, ``>``,
  ``&``, U+2028 and U+2029 are ``\\u`` escapes, so no string can close a ``<script>`` element,
  open a comment or end a JavaScript line; the page scripts only ever put that data into the DOM
  as text (``textContent``), never as markup.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

_JS_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` for element content and quoted attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def clean(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays become Python ones, NaN and infinities ``None``."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "tolist"):  # torch tensors
        return clean(obj.tolist())
    return str(obj)


def js_json(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element or a ``.js`` file."""
    text = json.dumps(clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, rep in _JS_UNSAFE.items():
        text = text.replace(ch, rep)
    return text


def js_put(key: str, obj: Any) -> str:
    """A data file: one call that hands ``obj`` to the page under ``key`` (see assets/app.js)."""
    return f"MMSAE.put({js_json(key)},{js_json(obj)});\n"


def write_file(path: Path, data: str | bytes) -> None:
    """Write one site file. No per-file fsync: the whole site is built in a scratch folder and
    renamed into place when complete (see ``build_dashboard``), which is what makes it atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
