"""The BLAS's xGEMM for the convolution kernels: ``gemm`` on any 2-D operands and
``RowProducts`` on blocks of rows of C-contiguous matrices (the inner loops' products).

The BLAS is called through ctypes (``cblas()``: the ``cblas_?gemm`` of an OpenBLAS loaded
in this process), which lets go of the GIL so that other threads run meanwhile; through
scipy's wrappers, which hold the GIL, when that binding is not found.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.linalg import blas

from harness.mcn.kernels import threads

__all__ = ["RowProducts", "cblas", "gemm"]


class _Cblas:
    """``cblas_?gemm`` of an OpenBLAS loaded in this process (numpy's preferred), called
    through ctypes, which lets go of the GIL during the call: scipy's BLAS wrappers keep
    it, so threads calling them run their products one at a time. Found through
    threadpoolctl (the library, its symbol names and, from their suffix, its integer
    width) and checked on a small product before use; ``available`` is False when no such
    function passed."""

    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

    def __init__(self) -> None:
        self.fns: dict[np.dtype, Callable[..., None]] = {}
        self.library = ""  # the file of the library bound
        libs = [c for c in threads.blas_libraries() if getattr(c, "internal_api", "") == "openblas"]
        for lib in sorted(libs, key=lambda c: "numpy" not in c.filepath):
            try:
                self._bind(lib)
            except (AttributeError, OSError, TypeError, ValueError):
                self.fns = {}
                continue
            if self._works():
                self.library = lib.filepath
                return
            self.fns = {}

    @property
    def available(self) -> bool:
        return bool(self.fns)

    def _bind(self, lib: Any) -> None:
        prefix = getattr(lib, "_symbol_prefix", "") or ""
        suffix = getattr(lib, "_symbol_suffix", "") or ""
        integer = ctypes.c_int64 if "64" in suffix else ctypes.c_int
        for dt, letter, real in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
            fn = getattr(lib.dynlib, f"{prefix}cblas_{letter}gemm{suffix}")
            fn.restype = None
            ptr = ctypes.c_void_p
            fn.argtypes = (
                [ctypes.c_int] * 3 + [integer] * 3 + [real, ptr, integer, ptr, integer, real, ptr, integer]
            )
            self.fns[np.dtype(dt)] = fn

    def _works(self) -> bool:
        rng = np.random.default_rng(0)
        for dt in self.fns:
            a, b, c = (rng.standard_normal(shape).astype(dt) for shape in ((5, 3), (4, 5), (3, 4)))
            want = c + a.T @ b.T
            self(a.T, b.T, c, 1.0)
            if not np.allclose(c, want, rtol=1e-4, atol=1e-4):
                return False
        return True

    @staticmethod
    def _layout(z: np.ndarray) -> tuple[int, int] | None:
        """(transpose flag, leading dimension) of ``z`` as a row-major BLAS operand, if it is one."""
        (r, c), (sr, sc), size = z.shape, z.strides, z.itemsize
        if c == 1 or sc == size:  # rows of adjacent numbers
            ld = sr // size if r > 1 else c
            if r == 1 or (sr % size == 0 and ld >= c):
                return _Cblas.NO_TRANS, max(1, ld)
        if r == 1 or sr == size:  # columns of adjacent numbers
            ld = sc // size if c > 1 else r
            if c == 1 or (sc % size == 0 and ld >= r):
                return _Cblas.TRANS, max(1, ld)
        return None

    def __call__(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, beta: float) -> bool:
        """``out = a @ b + beta * out`` if the three are BLAS operands as they are (no copy);
        False, untouched, otherwise."""
        fn = self.fns.get(out.dtype)
        if fn is None or not a.dtype == b.dtype == out.dtype:
            return False
        la, lb, lo = self._layout(a), self._layout(b), self._layout(out)
        if la is None or lb is None or lo is None or lo[0] != self.NO_TRANS:
            return False
        (m, k), n = a.shape, b.shape[1]
        fn(
            self.ROW_MAJOR, la[0], lb[0], m, n, k, 1.0,
            a.ctypes.data, la[1], b.ctypes.data, lb[1], beta, out.ctypes.data, lo[1],
        )  # fmt: skip
        return True


_CBLAS: _Cblas | None = None


def cblas() -> _Cblas:
    """The binding, found on first use (``available`` says whether there is one)."""
    global _CBLAS
    if _CBLAS is None:
        _CBLAS = _Cblas()
    return _CBLAS


def gemm(
    a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, *, accumulate: bool = False
) -> np.ndarray:
    """``a @ b`` into ``out`` (added to it if ``accumulate``), through the BLAS xGEMM.

    Every product of the convolution kernels goes through here: the tap products need GEMM's
    ``beta = 1``, which numpy's matmul does not expose. The BLAS is called through ctypes
    (``_Cblas``: no copy of strided operands, and other threads run meanwhile), else
    through scipy's wrappers, where BLAS is column-major: the C-ordered ``out`` is then
    computed as ``out.T = b.T @ a.T``, a C- or F-ordered operand passed without a copy.
    """
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = np.empty((m, n), a.dtype)
    if out.size == 0 or a.shape[1] == 0:
        if not accumulate:
            out.fill(0)
        return out
    binding = cblas()
    if binding.available and binding(a, b, out, 1.0 if accumulate else 0.0):
        return out
    if not out.flags.c_contiguous:
        prod = gemm(a, b)
        if accumulate:
            out += prod
        else:
            out[...] = prod
        return out
    bt, trans_b = _fortran(b)
    at, trans_a = _fortran(a)
    xgemm = blas.sgemm if a.dtype == np.float32 else blas.dgemm
    c = out.T
    res = xgemm(
        1.0, bt, at, beta=1.0 if accumulate else 0.0, c=c, trans_a=trans_b, trans_b=trans_a, overwrite_c=1
    )
    if res is not c:  # f2py copied ``c`` after all: keep its result
        out[...] = res.T
    return out


def _fortran(z: np.ndarray) -> tuple[np.ndarray, int]:
    """``z.T`` as an F-ordered BLAS operand and its transpose flag."""
    if z.flags.c_contiguous:
        return z.T, 0
    if z.flags.f_contiguous:
        return z, 1
    return np.ascontiguousarray(z).T, 0


class RowProducts:
    """``gemm`` on blocks of rows of C-contiguous 2-D arrays, named by their first row: the
    inner loops' products, through the bound ``cblas_?gemm`` with the addresses computed
    here (a few microseconds a call instead of ``gemm``'s checks), else through ``gemm``."""

    def __init__(self, dtype: np.dtype) -> None:
        binding = cblas()
        self.fn = binding.fns[np.dtype(dtype)] if binding.available else None
        self.size = np.dtype(dtype).itemsize
        self._ptrs: dict[int, tuple[np.ndarray, int]] = {}

    def _ptr(self, a: np.ndarray, row: int) -> int:
        entry = self._ptrs.get(id(a))
        if entry is None:
            assert a.ndim == 2 and a.flags.c_contiguous
            entry = self._ptrs[id(a)] = (a, a.ctypes.data)  # the array kept alive with its address
        return entry[1] + row * a.shape[1] * self.size

    def nn(
        self, a: np.ndarray, a0: int, b: np.ndarray, out: np.ndarray, o0: int, m: int, beta: float
    ) -> None:
        """``out[o0:o0+m] = a[a0:a0+m] @ b + beta * out[o0:o0+m]``."""
        if self.fn is None:
            gemm(a[a0 : a0 + m], b, out=out[o0 : o0 + m], accumulate=bool(beta))
            return
        (k, n), null = b.shape, _Cblas.NO_TRANS
        self.fn(
            _Cblas.ROW_MAJOR, null, null, m, n, k, 1.0,
            self._ptr(a, a0), k, self._ptr(b, 0), n, beta, self._ptr(out, o0), n,
        )  # fmt: skip

    def tn(
        self, a: np.ndarray, a0: int, b: np.ndarray, b0: int, m: int, out: np.ndarray, beta: float
    ) -> None:
        """``out = a[a0:a0+m].T @ b[b0:b0+m] + beta * out``."""
        if self.fn is None:
            gemm(a[a0 : a0 + m].T, b[b0 : b0 + m], out=out, accumulate=bool(beta))
            return
        k, n = a.shape[1], b.shape[1]
        self.fn(
            _Cblas.ROW_MAJOR, _Cblas.TRANS, _Cblas.NO_TRANS, k, n, m, 1.0,
            self._ptr(a, a0), k, self._ptr(b, b0), n, beta, self._ptr(out, 0), n,
        )  # fmt: skip
