"""Worker processes that do not inherit this process's threads.

A plain ``fork`` copies a process whose other threads (torch's OpenMP pool, ITK's after an FRD
computation) may hold a lock at that instant; the child, which has only the forking thread, can then
wait on that lock for ever. Seen here twice: a synthetic-data worker and an FRD feature worker, each
blocked on a futex, hanging a grid. :func:`worker_context` gives a forkserver on Linux (a clean
process, started once without this process's threads, forks the workers) and spawn elsewhere.
"""
from __future__ import annotations

import sys
from multiprocessing import get_context
from multiprocessing.context import BaseContext


def worker_context() -> BaseContext:
    """The multiprocessing context for the suite's worker pools (and libraries it hands one to)."""
    if sys.platform.startswith("linux"):
        context = get_context("forkserver")
        context.set_forkserver_preload([])  # import nothing up front: not the caller's __main__ either
        return context
    return get_context("spawn")
