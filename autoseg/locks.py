"""One process at a time per fold (training) or per dataset stage (planning, preprocessing).

A lock is ``fcntl.flock`` on an open file: the kernel drops it when the process ends, however it ends (kill -9,
a crashed node's process table gone with it), so there are no stale locks to clean up by hand. The file itself
stays (deleting it would let a third process lock a new file while a second still holds the old one) and
holds JSON about the current holder (pid, host, start time) only so that a refusal can name who holds it.

flock works on local filesystems and on NFS (Linux emulates it with POSIX locks there); on a filesystem without
locking, or on Windows (no fcntl), locking is skipped with a debug message rather than refusing to run.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Iterator

from autoseg.errors import BusyError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FOLD_LOCK = ".train.lock"  # in the fold folder


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: written into the lock file when it is taken."""

    pid: int
    host: str
    started: str  # ISO 8601, local time with offset
    activity: str  # "trained", "preprocessed", ...

    @classmethod
    def me(cls, activity: str) -> "LockHolder":
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(pid=os.getpid(), host=socket.gethostname(), started=now, activity=activity)

    def describe(self) -> str:
        started = self.started
        with contextlib.suppress(ValueError):
            when = datetime.datetime.fromisoformat(self.started)
            today = datetime.datetime.now(when.tzinfo).date() == when.date()
            started = when.strftime("%H:%M" if today else "%Y-%m-%d %H:%M")
        return f"pid {self.pid} on host {self.host} since {started}"


def _read_holder(handle: IO[str]) -> LockHolder | None:
    handle.seek(0)
    try:
        return LockHolder(**json.loads(handle.read()))
    except (ValueError, TypeError):  # empty, or caught between truncate and write
        return None


def _write_holder(handle: IO[str], holder: LockHolder) -> None:
    # in place, not atomically by rename: the lock belongs to this file's inode, which must stay the same
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(asdict(holder)))
    handle.flush()


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, subject: str, activity: str) -> Iterator[LockHolder]:
    """Hold the lock file ``path`` for the ``with`` block, or raise BusyError naming its holder at once
    (never waits: a second `autoseg train` of the same fold is a mistake to report, not a queue).

    ``subject`` and ``activity`` make the message: "fold_0 is being trained by pid 1234 on host x since 15:02".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = LockHolder.me(activity)
    with open(path, "a+", encoding="utf-8") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(handle)
                who = holder.describe() if holder else "another process"
                raise BusyError(
                    f"{path.parent}: {subject} is being {activity} by {who}; wait for it or stop it "
                    f"(the lock {path.name} is released when that process ends)"
                ) from None
            except OSError as exc:  # a filesystem without locks: run unprotected rather than not at all
                log.debug("%s: locking not supported (%s); running without a lock", path, exc)
        _write_holder(handle, me)
        try:
            yield me
        finally:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()  # the holder is gone; the kernel releases the lock when the file closes


def fold_lock(fold_folder: str | os.PathLike) -> contextlib.AbstractContextManager[LockHolder]:
    """The lock of one fold folder, held for the whole of `autoseg train`."""
    fold_folder = Path(fold_folder)
    return hold_lock(fold_folder / FOLD_LOCK, fold_folder.name, "trained")


def stage_lock(dataset_folder: str | os.PathLike, stage: str) -> contextlib.AbstractContextManager[LockHolder]:
    """The lock of one stage of a dataset (``stage`` e.g. "planned", "preprocessed"), a file
    ``.<stage>.lock`` in ``dataset_folder`` (e.g. ``preprocessed/<D>``)."""
    dataset_folder = Path(dataset_folder)
    return hold_lock(dataset_folder / f".{stage}.lock", dataset_folder.name, stage)
