"""Atomic writes: a reader never sees a half-written file, an interrupted write leaves the old file intact.

Every file autoseg produces goes through here: write to a temporary file in the same folder, flush and
fsync, then ``os.replace`` (atomic on POSIX and Windows for same-filesystem renames).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it.

    ``suffix`` keeps the file ending for writers that choose the format by extension (SimpleITK).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file owner-only (0600); results on shared cluster storage must get the same
    # permissions as any other file the user writes, i.e. 0666 minus the umask.
    os.chmod(tmp, 0o666 & ~_current_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[IO[bytes]], Any]) -> None:
    """Call ``writer(handle)`` on a binary temp file, then move it onto ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            writer(handle)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, sorted keys and a trailing newline so the same object gives the same bytes."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
