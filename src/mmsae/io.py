"""Atomic file writes and tolerant JSONL reading, shared by every stage.

Every stage writes through these helpers so that an interrupted run never leaves a half-written
file behind: data goes to a temporary file in the same folder, is flushed to disk, and is then
renamed over the target (rename is atomic on POSIX file systems).

Ownership (the block at the end): a stage writes into a folder it created or marked
(:func:`claim_dir`), replaces or appends to a single file only when mmsae wrote it
(:func:`check_own_file`), deletes only files it recorded writing, and holds :func:`output_lock`
while it appends to a shared output.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import MmsaeError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    ensure_dir(path.parent)
    with no_space_guard(path):
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


# ENOSPC and EDQUOT, as an OSError's errno or inside the message of an error that wraps one:
# safetensors raises SafetensorError("... I/O error: No space left on device (os error 28)").
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = re.compile(rf"No space left|Disk quota exceeded|StorageFull|QuotaExceeded|"
                            rf"os error ({errno.ENOSPC}|{errno.EDQUOT})\b")


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` is a full disk (or an exceeded quota), however the writing library wrapped it."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in _NO_SPACE_ERRNOS
    return isinstance(e, Exception) and not isinstance(e, MmsaeError) and bool(_NO_SPACE_TEXT.search(str(e)))


def no_space_error(path: str | os.PathLike) -> MmsaeError:
    """The one-line error every stage gives when the disk fills while it writes ``path``."""
    return MmsaeError(f"no space left on the device writing {path}; free space and rerun (finished work is kept)")


@contextmanager
def no_space_guard(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into :func:`no_space_error`; other errors pass through."""
    try:
        yield
    except Exception as e:
        if is_no_space(e):
            raise no_space_error(path) from e
        raise


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a folder (and parents); fail with a one-line error if it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_no_space(e):
            raise no_space_error(path) from e
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
    """Append rows to a JSONL file, synced so a crash loses at most the rows in flight.

    A failed write (a full disk) is cut off again, so the file keeps only whole rows.
    """
    path = Path(path)
    ensure_dir(path.parent)
    data = memoryview("".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))
    # unbuffered, so nothing is left in a buffer to be flushed (and fail again) after the truncate
    with no_space_guard(path), open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
            os.fsync(f.fileno())
        except BaseException:
            f.truncate(start)  # a row cut short would glue onto the next run's first row
            raise


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


# --------------------------------------------------------------------------------------------
# Ownership: mmsae deletes or replaces only what it can show it wrote
# --------------------------------------------------------------------------------------------

OWNER_FILE = ".mmsae-owner.json"  # marks a folder as one stage's output: {"stage", "run", "created"}


def json_format(path: str | os.PathLike) -> str | None:
    """The ``format`` field of a JSON object file, or None (no file, not JSON, no such field)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj.get("format") if isinstance(obj, dict) else None


def folder_owner(path: str | os.PathLike) -> str | None:
    """The stage whose marker ``path`` carries, or None (no marker, or an unreadable one)."""
    try:
        owner = json.loads((Path(path) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner.get("stage") if isinstance(owner, dict) else None


def claim_dir(path: str | os.PathLike, stage: str, overwrite: bool = False,
              legacy: Callable[[Path], bool] | None = None) -> Path:
    """Make ``path`` the output folder of ``stage`` and return it.

    A missing or empty folder is created and marked with ``.mmsae-owner.json``; a folder marked by
    the same stage is this stage's (a rerun or a resume). Any other folder is the user's and is
    refused with a one-line error, unless ``overwrite`` (it is marked and the stage writes beside
    what is there; its clean-up still deletes only files it recorded writing) or ``legacy(path)``
    recognises the output of an mmsae from before the markers.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MmsaeError(f"{path} is a file, not a folder; choose a new --out")
    owner = folder_owner(path) if path.is_dir() else None
    if owner == stage:
        return path
    if path.is_dir() and not overwrite:
        hint = f"choose a new --out or pass --overwrite to let mmsae {stage} write beside"
        if owner is not None:
            raise MmsaeError(f"{path} holds the output of mmsae {owner}, not {stage}; {hint} it")
        # another process of this stage may be writing its marker right now (its temporary file)
        theirs = sorted(p.name for p in path.iterdir() if not p.name.startswith(f".{OWNER_FILE}."))
        if theirs and not (legacy is not None and legacy(path)):
            raise MmsaeError(f"{path} already holds {len(theirs)} file{'s' if len(theirs) > 1 else ''} that mmsae did not "
                             f"write (e.g. {theirs[0]}); {hint} them")
    ensure_dir(path)
    write_json(path / OWNER_FILE, {"stage": stage, "run": uuid.uuid4().hex[:12],
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return path


def check_own_file(path: str | os.PathLike, keys: Sequence[str] = (), prefix: str | None = None) -> Path:
    """Refuse (one-line MmsaeError) to replace or append to ``path`` unless mmsae wrote it; returns it.

    A missing or empty file is free. A text file is mmsae's when it starts with ``prefix``; a JSON
    file when it is an object, or JSON lines whose first row is an object, carrying all ``keys``.
    """
    path = Path(path)
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return path
    ours = False
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as f:
                if prefix is not None:
                    ours = f.read(len(prefix)) == prefix
                else:
                    try:
                        obj = json.loads(f.readline())  # JSON lines: the first row
                    except ValueError:
                        f.seek(0)
                        obj = json.loads(f.read())  # an indented JSON object
                    ours = isinstance(obj, dict) and all(k in obj for k in keys)
        except (OSError, ValueError):
            ours = False
    if not ours:
        raise MmsaeError(f"{path} exists and was not written by mmsae; move it away or choose another --out")
    return path


def latest_rows(rows: Iterable[dict], key: str = "feature") -> dict[int, dict]:
    """The last row for each value of ``key``; rows without the key are skipped.

    Appended results can repeat a key (a row redone, or two writers before outputs were locked);
    every reader keeps the newest row.
    """
    return {int(r[key]): r for r in rows if isinstance(r, dict) and r.get(key) is not None}


def _lock_holder_alive(holder: dict) -> bool:
    """Whether the process a lock file names still runs (on another host: assumed so)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (KeyError, TypeError, ValueError, OverflowError):
        return False  # not a lock this function wrote
    return True


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``PATH.lock`` while writing ``path``, so two runs never write the same output.

    The lock file is created exclusively and names this process (pid and host). A lock whose
    process is gone (same host, pid not running) is stale and taken over; a live one is a one-line
    MmsaeError naming its pid. The lock is removed on exit.
    """
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    ensure_dir(lock.parent)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            holder = holder if isinstance(holder, dict) else {}
            if attempt == 0 and not _lock_holder_alive(holder):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise MmsaeError(f"{path} is being written by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                             f"(lock {lock}); wait for it to finish, or delete the lock if that process is gone") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    try:
        yield lock
    finally:
        try:
            if json.loads(lock.read_text(encoding="utf-8")) == me:
                lock.unlink()
        except (OSError, ValueError):
            pass
