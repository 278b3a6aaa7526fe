"""The worker threads shared by the kernels: numpy and BLAS release the GIL in their
loops, so a few threads running numpy on disjoint parts of an array use the cores."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["PARALLEL_MIN", "cpu_cores", "parallel_map"]

# Below this many elements the ops run on the calling thread only.
PARALLEL_MIN = 1 << 16
_executor: tuple[int, int, ThreadPoolExecutor] | None = None  # (owning process id, workers, executor)


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def parallel_map(fn: Callable[[Any], None], items: list[Any]) -> None:
    """``fn`` over ``items`` on a pool of one thread per item (numpy releases the GIL in its loops)."""
    global _executor
    if len(items) < 2:
        for item in items:
            fn(item)
        return
    # A forked child inherits the executor object but not its threads: make a new one.
    if _executor is None or _executor[0] != os.getpid() or _executor[1] < len(items):
        _executor = (os.getpid(), len(items), ThreadPoolExecutor(len(items), thread_name_prefix="mcn-pool"))
    for _ in _executor[2].map(fn, items):
        pass
