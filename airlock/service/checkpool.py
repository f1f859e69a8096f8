"""Processes that run the disclosure checks of new snapshots at lower CPU priority.

Kept apart from ``runner`` on purpose: a ``spawn``ed process imports the module of its
initializer, and this one imports nothing heavy, so the check processes start quickly.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor

CHECK_NICE = 10  # disclosure checks yield the CPU to page views and votes


def _init_check_process(parent: int) -> None:
    os.nice(CHECK_NICE)
    # a worker that exits without waiting for us (or is killed outright) leaves us behind:
    # leave with it (``parent`` from the worker: it may be gone before we get here)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _warm() -> None:
    import airlock.service.checking  # noqa: F401  (imports the check engine once, up front)


def check_pool(processes: int) -> Executor | None:
    """Processes at nice 10 for the disclosure checks; None (checks in the request's thread)
    for 0. ``spawn``: the worker has threads, and forking a threaded process is unsafe."""
    if processes <= 0:
        return None
    pool = ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_check_process,
        initargs=(os.getpid(),),
    )
    pool.submit(_warm)
    return pool
