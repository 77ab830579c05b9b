"""Grid worker processes that end with the grid that started them.

A grid runs its cells in a pool of worker processes. Killed by a timeout, Ctrl-C or SIGTERM, the grid
must take its workers with it; left alone they run on with parent 1, some for minutes (pretraining).
So each worker, as it starts (``start_worker``):

* leads its own process group, so the grid can end it and anything it started with one signal, and a
  Ctrl-C at the terminal reaches the grid alone (instead of a traceback from every worker);
* asks Linux to SIGKILL it when its parent dies (``PR_SET_PDEATHSIG``), which covers SIGKILL of the
  grid, the one signal the grid cannot handle;
* watches its parent from a thread and ends its group when the parent is gone (the same guarantee where
  ``prctl`` does not exist, and for a parent that died before the worker asked).

And the grid, while its pool runs (``ending_with_parent``), turns SIGTERM into an exception and, on any
way out that is not a normal end, kills every worker's group before it returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

WATCH_SECONDS = 0.5


def start_worker(parent: int) -> None:
    """Pool initializer: run in each worker before any cell (see the module docstring)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before we could ask to be told
        _end_own_group()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="factorlab-parent").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    _end_own_group()


def _end_own_group() -> None:
    with contextlib.suppress(OSError):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os._exit(1)


def kill_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL every worker of ``pool`` and whatever each one started (its process group)."""
    processes = dict(getattr(pool, "_processes", None) or {})
    for pid in processes:
        try:
            os.killpg(pid, signal.SIGKILL)  # the worker leads its group once start_worker ran
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for process in processes.values():
        with contextlib.suppress(Exception):
            process.join(timeout=5)


class Terminated(SystemExit):
    """SIGTERM reached a running grid: unwinds it like Ctrl-C, so its workers are ended."""


@contextlib.contextmanager
def ending_with_parent(pool: ProcessPoolExecutor) -> Iterator[None]:
    """Around the use of ``pool``: on SIGTERM, Ctrl-C or any error, its workers are killed before the
    exception goes on (``shutdown`` would otherwise wait for every running cell to finish)."""

    def on_term(signum, frame):
        raise Terminated(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException:
        kill_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
