"""Atomic writes: a reader never sees a half-written file, an interrupted write leaves the old file intact.

Every file autoseg produces goes through here: write to a temporary file in the same folder, flush and
fsync, optionally verify it (read it back), then ``os.replace`` (atomic on POSIX and Windows for
same-filesystem renames). A full disk, a read-only folder or a file that does not read back as written
raises :class:`autoseg.errors.WriteError` naming the file, and the temporary file is removed: some writers
(SimpleITK's among them) do not report a full disk themselves, which is why verification exists.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from autoseg.errors import WriteError

# errno values that mean "this filesystem cannot take the file", as opposed to a bug in the caller
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding ``folder`` (None when it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _human(size: int | None) -> str:
    if size is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def write_error(target: Path, exc: BaseException) -> WriteError:
    """The user-facing error for a failed write of ``target`` (disk full, read-only, ...)."""
    code = getattr(exc, "errno", None)
    if code in _NO_SPACE:
        return WriteError(
            f"{target}: disk full ({_human(free_bytes(target.parent))} free on that filesystem); nothing was "
            "replaced. Free some space (or write elsewhere) and run the command again"
        )
    if code in _NOT_WRITABLE:
        return WriteError(
            f"{target.parent}: not writable ({os.strerror(code)}); nothing was written. Choose a folder you can "
            "write to, or fix its permissions"
        )
    return WriteError(f"{target}: could not be written ({exc}); nothing was replaced")


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str | None = None, verify: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it.

    ``suffix`` keeps the file ending for writers that choose the format by extension (SimpleITK).
    ``verify(tmp)`` runs after the data reached the disk and before the rename; it raises (any exception)
    when the file is not what was meant to be written. Failures of the filesystem (full, read-only) and of
    verification become :class:`WriteError`; other exceptions pass through unchanged.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if suffix is None:
            suffix = "".join(target.suffixes) or ".tmp"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{suffix}", dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file owner-only (0600); results on shared cluster storage must get the same
    # permissions as any other file the user writes, i.e. 0666 minus the umask.
    os.chmod(tmp, 0o666 & ~_current_umask())
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        except OSError as exc:
            if getattr(exc, "errno", None) in _NO_SPACE | _NOT_WRITABLE:
                raise write_error(target, exc) from exc
            raise
        if verify is not None:
            try:
                verify(tmp)
            except Exception as exc:
                free = free_bytes(target.parent)
                hint = f"; {_human(free)} free on that filesystem (disk full?)" if free is not None else ""
                raise WriteError(
                    f"{target}: the written file does not read back as written ({exc}){hint}; nothing was "
                    "replaced. Free some space or write elsewhere, then run the command again"
                ) from exc
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_partial_files(folder: str | os.PathLike, targets: "list[str] | None" = None) -> int:
    """Delete the temporary files a killed run left in ``folder`` (:func:`atomic_path` names them
    ``.<target name>.<random>.partial<suffix>``): all of them, or only those of the ``targets`` (file names)
    given. Returns how many were removed. Call it only while no other process writes those files: under the
    stage's or fold's lock, or for targets this process is about to write itself."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    patterns = [".*.partial*"] if targets is None else [f".{glob_escape(name)}.*.partial*" for name in targets]
    removed = 0
    for pattern in patterns:
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped, so a case id like ``a[1]`` matches itself only."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


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
