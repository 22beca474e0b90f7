"""Atomic file writes and tolerant JSONL reading, shared by every stage.

Every stage writes through these helpers so that an interrupted run never leaves a half-written
file behind: data goes to a temporary file in the same folder, is flushed to disk, and is then
renamed over the target (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import MmsaeError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a folder (and parents); fail with a one-line error if it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MmsaeError(f"cannot create folder {path}: {e.strerror}; choose a writable --out") from e
    if not os.access(path, os.W_OK):
        raise MmsaeError(f"folder {path} is not writable; choose a writable --out")
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MmsaeError(f"{path} does not exist") from e
    except json.JSONDecodeError as e:
        raise MmsaeError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from e


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors are made contiguous first)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows to a JSONL file, flushed and synced so a crash loses at most the rows in flight."""
    path = Path(path)
    ensure_dir(path.parent)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, skipping a truncated last line (what a crash mid-write leaves)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # a write cut short by a crash; the rerun redoes that row
            raise MmsaeError(f"{path} line {i + 1} is not valid JSON: {e.msg}") from e
    return rows
