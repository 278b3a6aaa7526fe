"""Loops compiled by numba, for the ops whose numpy form spends its time moving data.

A numpy expression of an op such as batch normalisation makes one pass over memory per
operation and, where MatConvNet's order of additions runs across the array's layout,
another copy to put the numbers in that order. A compiled loop reads each element once
and does the same float operations in the same order: the results are the same bits
(tests/mcn/test_jit_loops.py checks every loop against its numpy definition).

``Compiled(fn)`` compiles ``fn`` with numba on its first call (numba is imported only
then, so that programs which never call such a loop do not pay for it), caching the
machine code beside the module when that directory is writable and compiling afresh in
each process otherwise. Without numba (or with ``ENABLED`` set to False, or
``MCN_HARNESS_NO_JIT=1`` in the environment) ``available()`` is False and the callers
keep their numpy form. numba is told neither ``fastmath`` nor ``parallel``: the
compiler may not reassociate a sum or fuse a product into an addition, so each float
operation rounds as its numpy counterpart does. Unlike numpy, the loops raise no floating
point warnings (an invalid operation or an overflow gives its NaN or infinity silently,
whatever ``np.errstate`` says); nothing in the harness relies on those warnings.

One exception, by name: the tap products (taps_loops, ``Compiled(fn, contract=True)``)
may fuse a product into the addition that follows it (``fastmath={"contract"}``, one
rounding instead of two; still no reassociation), and are compiled with numba's SLP
vectorizer on (off by default), which turns their named accumulators into vector
registers. Their results are compared with the BLAS's within tolerances, not bit for bit.
Their callers ask ``Compiled.compiles`` first and keep the BLAS when numba fails.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ENABLED", "Compiled", "available"]

# Whether the compiled loops may be used at all (tests turn it off to run the numpy forms).
ENABLED = os.environ.get("MCN_HARNESS_NO_JIT", "") not in ("1", "true", "yes")
_state: dict[str, Any] = {"numba": None}
_lock = threading.Lock()


def _numba() -> Any:
    """The numba module, or False when it cannot be imported (looked up once)."""
    if _state["numba"] is None:
        try:
            import numba
        except Exception:  # noqa: BLE001 - a broken install is as good as none
            _state["numba"] = False
        else:
            _state["numba"] = numba
    return _state["numba"]


def available() -> bool:
    """Whether the compiled loops are used (numba imports and ``ENABLED``)."""
    return ENABLED and bool(_numba())


class Compiled:
    """``fn`` compiled by numba (nopython mode, the GIL released) on its first call; with
    ``contract``, fused multiply-adds allowed and the SLP vectorizer on (see above)."""

    def __init__(self, fn: Callable[..., Any], *, contract: bool = False) -> None:
        self.fn, self.contract = fn, contract
        self._impl: Callable[..., Any] | None = None
        self._failed = False
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def _compile(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        """Compile for the types of ``args`` (or load that from numba's cache) under the lock,
        and return the compiled function; the call itself runs outside the lock. The SLP
        setting is numba's, process-wide, read while a function compiles: it is on only
        for the duration of this compilation."""
        with _lock:
            if self._impl is None:
                numba = _numba()
                options: dict[str, Any] = {"nogil": True}
                if self.contract:
                    options["fastmath"] = {"contract"}
                try:
                    impl = numba.njit(cache=True, **options)(self.fn)
                except RuntimeError:  # no writable cache directory: compile in each process
                    impl = numba.njit(**options)(self.fn)
                config = numba.core.config
                saved = config.SLP_VECTORIZE
                config.SLP_VECTORIZE = 1 if self.contract else saved
                try:
                    impl.compile(tuple(numba.typeof(a) for a in args))
                finally:
                    config.SLP_VECTORIZE = saved
                self._impl = impl
            return self._impl

    def compiles(self, *args: Any) -> bool:
        """Whether the loop compiles for the types of ``args`` (compiling it now, if not yet):
        for callers with another path to take when it does not. A failure is remembered."""
        if self._impl is None and not self._failed:
            try:
                self._compile(args)
            except Exception:  # noqa: BLE001 - numba's or LLVM's errors, memory: any failure
                self._failed = True
        return self._impl is not None

    def __call__(self, *args: Any) -> Any:
        return (self._impl or self._compile(args))(*args)
