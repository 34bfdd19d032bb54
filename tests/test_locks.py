"""autoseg.locks: a second process is refused with the holder's pid, and a lock dies with its process."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from autoseg.errors import BusyError
from autoseg.locks import fold_lock, hold_lock, stage_lock

pytest.importorskip("fcntl")

HOLDER = """
import sys
from autoseg.locks import fold_lock
with fold_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin (or kills us)
"""


def hold_in_other_process(folder: Path) -> subprocess.Popen:
    """A second process holding the fold lock; returns once it has it (it says so on stdout)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_second_process_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "fold_0"
    other = hold_in_other_process(folder)
    try:
        with pytest.raises(BusyError) as refused:
            with fold_lock(folder):
                pass
        message = str(refused.value)
        assert f"fold_0 is being trained by pid {other.pid} on host " in message
        assert "wait for it or stop it" in message and "\n" not in message
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    with fold_lock(folder) as holder:  # released when the holder ended
        assert holder.pid == os.getpid()


def test_lock_dies_with_a_killed_process(tmp_path):
    folder = tmp_path / "fold_1"
    other = hold_in_other_process(folder)
    other.send_signal(signal.SIGKILL)
    other.wait(timeout=60)
    other.stdin.close()
    with fold_lock(folder):  # no stale lock left behind by kill -9
        assert (folder / ".train.lock").is_file()


def test_stage_lock_and_one_holder_per_file(tmp_path):
    with stage_lock(tmp_path / "Dataset001_X", "preprocessed"):
        with pytest.raises(BusyError, match=r"Dataset001_X is being preprocessed by pid \d+"):
            # the same process opening the file again is a second holder too (flock is per open file)
            with hold_lock(tmp_path / "Dataset001_X" / ".preprocessed.lock", "Dataset001_X", "preprocessed"):
                pass
