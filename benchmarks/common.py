"""Shared helpers for the scripts in benchmarks/: run a command and measure it, format tables, describe the machine.

Import from a benchmark script run as ``python benchmarks/<script>.py`` (its folder is then on ``sys.path``)::

    from common import run_measured, markdown_table

Public API:

- :func:`run_measured` runs one command as a subprocess and returns a :class:`Measurement`: wall time and the
  peak memory of the WHOLE process tree (the command plus every worker it starts). Memory is sampled from
  ``/proc`` by a background thread (psutil is not a dependency of our venv): every ``poll_interval_s`` the
  tree is found by scanning ``/proc/<pid>/stat`` for parent ids and the RSS of its members
  (``/proc/<pid>/statm``) is summed. ``peak_rss_mb`` over-counts pages shared between forked workers (each
  process counts them fully). ``peak_pss_mb`` splits shared pages between their users, the fairer "how much
  memory does this tool need" number, but reading ``/proc/<pid>/smaps_rollup`` walks the page tables (about
  0.1 s for a 1 GB process on a loaded 2-core machine), so PSS is read only when the RSS sum reaches a new
  high or ``pss_interval_s`` has passed. Both are samples: a spike shorter than the interval can be missed.
  The poller costs about 1-2 % of one core at the default 0.5 s interval.
- :func:`parse_budget` / :func:`format_seconds`: ``"20m"`` -> 1200.0 (autoseg's own ``--time-budget``
  parser, so both tools get the same seconds) and back.
- :func:`markdown_table`: a GitHub-flavoured table from rows of cells.
- :func:`machine_description`: CPU model, cores, memory, for table captions.
- :class:`BenchmarkError`: a failed benchmark step, with the command and the tail of its log.
"""
from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
LOG_TAIL_CHARS = 3000  # enough of a failing command's log to see its traceback


class BenchmarkError(RuntimeError):
    """A benchmark step failed; the message names the command, its exit code, its log and the log's tail."""


@dataclass
class Measurement:
    """One measured command. Times in seconds, memory in MiB (2^20 bytes)."""

    command: list[str]
    wall_s: float
    peak_rss_mb: float  # max over samples of the summed RSS of the process tree (upper bound: shared pages counted per process)
    peak_pss_mb: float  # max over samples of the summed PSS of the process tree (shared pages split between users)
    peak_processes: int  # most processes alive in the tree at one sample
    returncode: int
    log_path: str | None = None
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ /proc poller
def _parent_map() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc (processes may vanish while we read: skipped)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name (field 2) may contain spaces and parentheses: parse after the LAST ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 2:
            parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants alive now (breadth first)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_map().items():
        children.setdefault(parent, []).append(pid)
    tree, queue = [], [root_pid]
    while queue:
        pid = queue.pop(0)
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE_SIZE  # field 2 = resident pages
    except (OSError, IndexError, ValueError):
        return 0


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, IndexError, ValueError):
        pass
    return 0


def tree_memory_bytes(root_pid: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, number of processes) of ``root_pid``'s process tree right now."""
    pids = process_tree(root_pid)
    return sum(_rss_bytes(p) for p in pids), sum(_pss_bytes(p) for p in pids), len(pids)


class _TreePoller(threading.Thread):
    """Samples the memory of a process tree until stopped; keeps the peaks."""

    def __init__(self, root_pid: int, interval_s: float, pss_interval_s: float) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval_s, self.pss_interval_s = root_pid, interval_s, pss_interval_s
        self.peak_rss = self.peak_pss = self.peak_processes = self.samples = 0
        self._last_pss = -float("inf")
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pids = process_tree(self.root_pid)
        rss = sum(_rss_bytes(p) for p in pids)
        now = time.monotonic()
        # PSS is expensive to read: on a new RSS high (+2 %: where the PSS peak almost surely is) or now and then
        if rss > 1.02 * self.peak_rss or now - self._last_pss >= self.pss_interval_s:
            self.peak_pss = max(self.peak_pss, sum(_pss_bytes(p) for p in pids))
            self._last_pss = now
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_processes = max(self.peak_processes, len(pids))
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _log_tail(path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - LOG_TAIL_CHARS))
        return handle.read().decode("utf-8", errors="replace")


def run_measured(
    command: Sequence[str | os.PathLike],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    poll_interval_s: float = 0.5,
    pss_interval_s: float = 5.0,
    check: bool = True,
    timeout_s: float | None = None,
) -> Measurement:
    """Run ``command`` and measure its wall time and the peak memory of its whole process tree.

    ``env``: the complete environment of the child (default: ours). Output (stdout and stderr together) goes
    to ``log_path`` (appended; default: discarded) so long training logs never sit in our memory.
    ``check``: raise :class:`BenchmarkError` with the log's tail when the exit code is not 0.
    ``timeout_s``: kill the tree's root after this many seconds (the step then counts as failed).
    ``poll_interval_s`` / ``pss_interval_s``: memory sampling periods (see the module docstring).
    """
    cmd = [str(part) for part in command]
    log_file = Path(log_path) if log_path is not None else None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log_file, "ab") if log_file is not None else subprocess.DEVNULL
    try:
        if log_file is not None:
            sink.write(f"\n$ {' '.join(cmd)}\n".encode())
            sink.flush()
        start = time.perf_counter()
        try:
            process = subprocess.Popen(cmd, env=dict(env) if env is not None else None, cwd=cwd,
                                       stdout=sink, stderr=subprocess.STDOUT)
        except FileNotFoundError as exc:
            raise BenchmarkError(f"{cmd[0]}: command not found ({exc}); check the venv / PATH") from exc
        poller = _TreePoller(process.pid, poll_interval_s, pss_interval_s)
        poller.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        wall_s = time.perf_counter() - start
        poller.stop()
    finally:
        if log_file is not None:
            sink.close()
    result = Measurement(
        command=cmd, wall_s=wall_s, peak_rss_mb=poller.peak_rss / 2**20, peak_pss_mb=poller.peak_pss / 2**20,
        peak_processes=poller.peak_processes, returncode=returncode,
        log_path=str(log_file) if log_file is not None else None, samples=poller.samples,
    )
    if check and returncode != 0:
        raise BenchmarkError(
            f"command failed with exit code {returncode} after {wall_s:.1f} s: {' '.join(cmd)}\n"
            f"log: {log_file}\n--- log tail ---\n{_log_tail(log_file)}"
        )
    return result


# ----------------------------------------------------------------------------------------- durations
def parse_budget(text: str | float | int) -> float:
    """``"20m"`` -> 1200.0, ``"1h30m"`` -> 5400.0, ``"90s"``; text needs a unit, a Python number is seconds.

    Delegates to autoseg's ``--time-budget`` parser so our CLI and the nnU-Net driver get the same seconds.
    Raises ``autoseg.errors.ConfigurationError`` on anything else.
    """
    from autoseg.training.schedule import parse_duration

    seconds = parse_duration(text)
    assert seconds is not None  # parse_duration returns None only for None
    return seconds


def format_seconds(seconds: float | None) -> str:
    """Compact wall time for tables: ``42.3 s``, ``12m05s``, ``1h02m``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 100:
        return f"{seconds:.1f} s"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# -------------------------------------------------------------------------------------------- tables
def format_number(value: float | None, digits: int = 3) -> str:
    """``0.91234`` -> ``0.912``; None/NaN -> ``-`` (e.g. HD95 of a class missing from a case)."""
    if value is None:
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:  # NaN
        return "-"
    if number in (float("inf"), float("-inf")):
        return "inf" if number > 0 else "-inf"
    return f"{number:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table. ``align``: one character per column, ``l`` or ``r`` (default: the
    first column left, the others right). Cells are converted with ``str``; ``|`` inside a cell is escaped."""
    columns = len(headers)
    align = align or ("l" + "r" * (columns - 1))
    if len(align) != columns:
        raise ValueError(f"align has {len(align)} characters for {columns} columns")
    for row in rows:
        if len(row) != columns:
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, expected {columns}")

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- machine
def machine_description() -> dict[str, Any]:
    """CPU model, logical cores, total memory (GiB), OS: what a timing table needs in its caption."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": affinity, "memory_gib": memory_gib, "os": platform.platform(),
            "python": platform.python_version()}
