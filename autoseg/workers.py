"""Worker processes that die with the process that started them.

A pool's workers are children of the autoseg command. When that command is killed outright (``kill -9``,
the out-of-memory killer, a cluster scheduler's hard stop) Python gets no chance to stop them, and they
would keep running, re-parented to PID 1, holding memory and files, for as long as their queue blocks: for
ever. On Linux a process can ask the kernel to send it a signal when its parent exits
(``prctl(PR_SET_PDEATHSIG)``); every pool autoseg starts passes :func:`die_with_parent` as its worker
initializer. Elsewhere (macOS, Windows) the initializer only checks that the parent is still there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker (SIGKILL) as soon as ``parent_pid``, its parent, exits.

    Pass ``initargs=(os.getpid(),)``: if the parent already died between starting the worker and this call,
    the worker has been re-parented and exits at once (the kernel only signals deaths after the request).
    """
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except OSError:  # no libc to ask (unusual builds): the parent check below still runs
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def pool_initializer() -> tuple:
    """``(initializer, initargs)`` keyword values for ``multiprocessing.Pool`` / ``ProcessPoolExecutor``."""
    return die_with_parent, (os.getpid(),)
