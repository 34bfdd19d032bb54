"""Pool workers die with the autoseg process that started them, even when it is killed with SIGKILL (issue:
killing `autoseg plan` during fingerprinting left its two workers alive for ever, re-parented to PID 1)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# a parent that starts two pool workers blocked in a long task, prints their PIDs, then waits to be killed
PARENT = """
import multiprocessing, sys, time
from autoseg.workers import pool_initializer
if __name__ == "__main__":
    initializer, initargs = pool_initializer() if sys.argv[1] == "guarded" else (None, ())
    pool = multiprocessing.get_context("spawn").Pool(2, initializer=initializer, initargs=initargs)
    pool.map_async(time.sleep, [600, 600], chunksize=1)
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.05)
    time.sleep(1.0)  # both workers have run their initializer and picked up a task
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _orphans_after_killing_parent(tmp_path, mode: str) -> list[int]:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 60  # generous: a loaded machine may take a moment to reap them
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    survivors = [p for p in pids if _alive(p)]
    for pid in survivors:  # never leave the control's orphans behind
        os.kill(pid, signal.SIGKILL)
    return survivors


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are a Linux feature")
def test_pool_workers_die_when_their_parent_is_killed(tmp_path):
    assert _orphans_after_killing_parent(tmp_path, "guarded") == []
