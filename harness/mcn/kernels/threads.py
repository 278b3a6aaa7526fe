"""The worker threads shared by the kernels: numpy and BLAS release the GIL in their
loops, so a few threads running numpy on disjoint parts of an array use the cores.

Two ways to share work: ``parallel_map`` runs one item per thread (pooling's parts), and
``run_tasks`` lets ``cpu_cores()`` threads (the caller among them) take numbered tasks one
after the other, so that a core slowed by another process simply takes fewer of them.
``blas_single_threaded`` makes the BLAS run each product on the calling thread, for
kernels whose threads each call the BLAS on their own part: OpenBLAS's own threads wait
for one another at every call, which costs little on a quiet machine and a lot on a
busy one. ``keep_freed_memory`` is an opt-in, process-wide malloc setting for programs
that run the reference repeatedly (benchmarks, training loops).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = [
    "PARALLEL_MIN",
    "background",
    "blas_libraries",
    "blas_single_threaded",
    "cpu_cores",
    "keep_freed_memory",
    "parallel_map",
    "run_tasks",
    "split_rows",
]

# Below this many elements the ops run on the calling thread only.
PARALLEL_MIN = 1 << 16
# Elementwise passes over memory (split_rows) are shared out from this many elements: a
# sleeping thread takes ~0.2 ms to wake on the machines measured, which a pass over 1M
# float32 numbers (~0.5 ms) repays.
PARALLEL_MIN_ELEMENTWISE = 1 << 20
T = TypeVar("T")
_executor: tuple[int, int, ThreadPoolExecutor] | None = None  # (owning process id, workers, executor)
_executor_lock = threading.Lock()


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _pool(workers: int) -> ThreadPoolExecutor:
    """The shared executor, with at least ``workers`` threads."""
    global _executor
    with _executor_lock:
        # A forked child inherits the executor object but not its threads: make a new one.
        if _executor is None or _executor[0] != os.getpid() or _executor[1] < workers:
            _executor = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="mcn-pool"))
        return _executor[2]


def parallel_map(fn: Callable[[Any], None], items: list[Any]) -> None:
    """``fn`` over ``items`` on a pool of one thread per item (numpy releases the GIL in its loops)."""
    if len(items) < 2:
        for item in items:
            fn(item)
        return
    for _ in _pool(len(items)).map(fn, items):
        pass


def run_tasks(fn: Callable[[int, int], None], tasks: int, workers: int | None = None) -> None:
    """``fn(task, worker)`` for every task in ``range(tasks)``, on ``workers`` threads (all the
    cores by default; the calling thread is worker 0): each thread takes the next task as
    soon as it is done with one. ``worker`` (below ``workers``) indexes per-thread scratch.

    Which thread runs a task varies from run to run: a task must write only its own part
    of the results, so that they do not depend on it. The first exception is raised once
    every running task has finished; the remaining tasks are skipped.
    """
    workers = max(1, min(workers or cpu_cores(), tasks))
    if workers == 1:
        for task in range(tasks):
            fn(task, 0)
        return
    counter = itertools.count()
    failed = threading.Event()

    def loop(worker: int) -> None:
        for task in iter(counter.__next__, None):  # next() on a count is atomic under the GIL
            if task >= tasks or failed.is_set():
                return
            try:
                fn(task, worker)
            except BaseException:
                failed.set()
                raise

    futures = [_pool(workers - 1).submit(loop, w) for w in range(1, workers)]
    error: BaseException | None = None
    try:
        loop(0)
    except BaseException as exc:
        error = exc
    for future in futures:
        # A helper that never started (its threads busy elsewhere, e.g. when called from a
        # pool thread) is cancelled: the caller has run its share of the tasks already.
        if future.cancel():
            continue
        exc = future.exception()
        if error is None and exc is not None:
            error = exc
    if error is not None:
        raise error


def background(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """Start ``fn(*args)`` on a pool thread, for work that can run beside the caller's next
    step; returns the function that gives its result. A call that no pool thread has taken
    by then (its threads busy, e.g. the caller is one of them) runs on the calling thread
    instead, so waiting for it never deadlocks. On one core: run when the result is asked."""
    if cpu_cores() < 2:
        return lambda: fn(*args)
    future = _pool(1).submit(fn, *args)

    def result() -> T:
        if future.cancel():
            return fn(*args)
        return future.result()

    return result


def split_rows(fn: Callable[[slice], None], rows: int, size: int) -> None:
    """``fn(part)`` over parts of ``range(rows)``, one per core, for an elementwise operation on
    arrays of ``size`` elements that writes its own rows of its output (on the calling
    thread alone below ``PARALLEL_MIN_ELEMENTWISE`` elements, where waking a thread costs
    more than it saves)."""
    parts = cpu_cores() if size >= PARALLEL_MIN_ELEMENTWISE else 1
    parts = max(1, min(parts, rows))
    cuts = [slice(rows * p // parts, rows * (p + 1) // parts) for p in range(parts)]
    run_tasks(lambda t, _worker: fn(cuts[t]), len(cuts), parts)


_blas_lock = threading.Lock()
_blas_state: dict[str, Any] = {"controllers": None, "depth": 0, "saved": []}


def _blas_controllers() -> list[Any]:
    """threadpoolctl's handles on the BLAS libraries loaded in this process (an empty list
    without threadpoolctl); looked up once, after scipy's BLAS is loaded."""
    if _blas_state["controllers"] is None:
        try:
            import scipy.linalg.blas  # noqa: F401  (load scipy's BLAS before looking)
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            _blas_state["controllers"] = []
        else:
            found = ThreadpoolController().lib_controllers
            _blas_state["controllers"] = [c for c in found if c.user_api == "blas"]
    return _blas_state["controllers"]


def blas_libraries() -> list[Any]:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process (with their
    file, ``dynlib`` handle and symbol names); empty without threadpoolctl."""
    return list(_blas_controllers())


@contextlib.contextmanager
def blas_single_threaded() -> Iterator[bool]:
    """Within the block, BLAS products run on the thread that calls them (nested blocks and
    concurrent callers share one setting; the outermost restores the thread counts).
    Yields whether the BLAS could be told so: without it, callers should not call the BLAS
    from several threads at once."""
    controllers = _blas_controllers()
    if not controllers:
        yield False
        return
    with _blas_lock:
        if _blas_state["depth"] == 0:
            _blas_state["saved"] = [c.num_threads for c in controllers]
            for c in controllers:
                c.set_num_threads(1)
        _blas_state["depth"] += 1
    try:
        yield True
    finally:
        with _blas_lock:
            _blas_state["depth"] -= 1
            if _blas_state["depth"] == 0:
                for c, n in zip(controllers, _blas_state["saved"], strict=True):
                    c.set_num_threads(n)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory this process frees for its next allocations: no
    separate mappings for large blocks, no trimming of the heap. Returns whether it took
    effect (glibc only). Opt-in and process-wide: resident memory then stays at its
    high-water mark.

    Every layer of the reference returns new arrays. By default glibc gives large freed
    blocks back to the system, and each pass of a net then writes into fresh pages: a
    page fault per page, and on a virtual machine with transparent huge pages sometimes a
    wait for the kernel to compact memory. On a DnCNN-shaped pass (~0.5 GB of new arrays)
    that cost 0.3-1.5 s on top of ~1 s of arithmetic; kept memory is reused without
    faults. TensorFlow's own allocator keeps its memory the same way.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
