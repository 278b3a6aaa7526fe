"""Convolution as BLAS products: the fast path of ``vl_nnconv`` and ``vl_nnconvt``.

``conv_forward`` computes the cross-correlation of an input with a filter bank (zero
padding included) and ``conv_backward`` its derivatives (harness.mcn.conv states the
definition and checks the arguments). Arrays are ``H x W x C x N``, images last, and
every product goes through the BLAS's xGEMM (``gemm``), called through ctypes so that
other threads run meanwhile (``_Cblas``; scipy's wrappers, which hold the GIL, when that
binding is not found). The work is cut into blocks of output rows (and filter groups)
whose buffers stay near ``CHUNK_BYTES``, so they stay in cache; the cores' threads take
the blocks one after the other (threads.run_tasks) and the BLAS runs each product on the
thread that calls it (threads.blas_single_threaded): a core slowed by another process
then takes fewer blocks instead of holding up the other at every product. The padded
copies live in a workspace kept between calls (``_Workspace``): freshly allocated memory
costs a page fault per page. Three ways to the same sums:

- Tap products (column stride 1, inputs FC deep or more: ``ConvGeometry.rows_path``;
  ``rows_forward``, ``rows_backward``). The input is copied once, padded, to a
  pixel-major layout (``_to_grid``): per filter group one ``(pixels*N) x FC`` matrix whose
  row ``(y*W' + x)*N + n`` holds pixel (y, x) of image n on a grid W' pixels wide. The
  pixels that filter tap (i, j) reads for a run of output pixels are then one
  contiguous block of rows, the run shifted by ``i*DY*W' + j*DX`` pixels, and the layer
  is a sum over taps of ``(rows x FC) @ (FC x K/G)`` products accumulated in place, with
  no column matrix (which copies the input FH*FW times). At row stride 1 the output is
  computed on the same W'-wide grid, the ``W' - Wo`` extra pixels of each row computed
  and dropped, so that a block of output rows is one product per tap; otherwise (or
  when the extra pixels would be many) one product per output row and tap. The data
  derivative at stride 1 is the same sum over the output derivative padded by the
  dilated filter extent (minus the padding), with the filters turned by 180 degrees and
  transposed (when that padded grid is not much wider than the input); otherwise each
  input row gathers the output rows and taps that reach it. The filter derivative is,
  per tap, the shifted input block transposed times the derivative block, summed over
  parts of the rows whose partial sums are added in a fixed order.
- Column matrix (any geometry: thin inputs, column strides). Per block of output rows and
  filter group, the column matrix ``(FH*FW*FC) x (rows*Wo*N)``, rows ordered
  ``(fh, fw, c)`` as the C-order reshape ``F.reshape(-1, K)`` of an ``FH x FW x FC x K``
  filter bank, is built from the padded input (``_im2col``, copies with runs of N
  numbers) and multiplied by the filters in one product; the data derivative goes back
  through the adjoint copy (``_col2im_add``), blocks that share input rows one after the
  other.
- Direct: when the one window covers the whole unpadded input (MatConvNet's "fully
  connected" mode, 1x1 convolutions on 1x1 inputs) the input itself is the column matrix.

All three compute the same sums; in float32 they add them in different orders (the
golden tolerances hold for each). The results never depend on which thread ran which
block: every block writes its own part of the output, and partial sums are added in a
fixed order.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from scipy.linalg import blas

from harness.mcn.kernels import threads

__all__ = [
    "CHUNK_BYTES",
    "PARTIAL_BYTES",
    "ROWS_MIN_DEPTH",
    "ROWS_MIN_PIXELS",
    "WORKSPACE_BYTES",
    "ConvGeometry",
    "columns_backward",
    "columns_forward",
    "conv_backward",
    "conv_forward",
    "direct_backward",
    "direct_forward",
    "gemm",
    "pad_zeros",
    "rows_backward",
    "rows_forward",
    "unpad",
]

Derivatives = tuple[np.ndarray | None, np.ndarray | None]
Task = Callable[[int], None]  # called with the index of the worker thread running it

# Target size of one block's buffer (a block of the column matrix, of the tap products'
# outputs, of the rows a filter-derivative part reads): about what a core's cache holds.
CHUNK_BYTES = 1 << 20
# The output rows are cut into at least this many blocks when there are rows enough, so
# that the threads share the work evenly even when one of them is slowed down.
MIN_BLOCKS = 8
# The tap products (see rows_forward) take over from the column matrix when they contract
# over FC >= ROWS_MIN_DEPTH channels (thinner products waste the BLAS: the column matrix
# contracts over FH*FW*FC) and the layer has ROWS_MIN_PIXELS output pixels (Ho*Wo*N) or more.
ROWS_MIN_DEPTH = 8
ROWS_MIN_PIXELS = 64
# At row stride 1 the tap products run on whole blocks of rows, computing W' - Wo extra
# pixels per row, when those are at most this fraction of the row.
FLAT_MAX_WASTE = 0.125
# Memory for the partial sums of a filter derivative (one filter bank per part of the rows).
PARTIAL_BYTES = 16 << 20
# Below this many multiply-adds a layer runs on the calling thread alone.
PARALLEL_MIN_MACS = 1 << 21
# Bytes of pixel-major copies kept between calls for reuse (see _Workspace).
WORKSPACE_BYTES = 64 << 20


@dataclass(frozen=True)
class ConvGeometry:
    """One convolution's geometry, in the forward-convolution sense (also for convt)."""

    fh: int
    fw: int
    fc: int
    k: int
    pad: tuple[int, int, int, int]
    stride: tuple[int, int]
    dilate: tuple[int, int]
    groups: int
    ho: int
    wo: int

    @property
    def kd(self) -> int:
        """Rows of a group's column matrix."""
        return self.fh * self.fw * self.fc

    @property
    def kg(self) -> int:
        """Filters per group."""
        return self.k // self.groups

    @property
    def extent(self) -> tuple[int, int]:
        """Height and width of the dilated filter."""
        return (self.fh - 1) * self.dilate[0] + 1, (self.fw - 1) * self.dilate[1] + 1

    def padded(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Height and width of an ``hw`` input once padded."""
        pt, pb, pl, pr = self.pad
        return hw[0] + pt + pb, hw[1] + pl + pr

    def groups_slices(self) -> Iterator[tuple[slice, slice]]:
        """(input channels, filters) of each group."""
        kg = self.kg
        for q in range(self.groups):
            yield slice(q * self.fc, (q + 1) * self.fc), slice(q * kg, (q + 1) * kg)

    def direct(self, hp: int, wp: int) -> bool:
        """The one window covers the whole unpadded input: the input is the column matrix."""
        return (self.ho, self.wo, self.fh, self.fw, self.pad) == (1, 1, hp, wp, (0, 0, 0, 0))

    def row_chunks(self, n: int, dtype: np.dtype) -> list[slice]:
        """Blocks of output rows whose column matrix (one group) is near ``CHUNK_BYTES``."""
        return _row_blocks(self.ho, self.kd * self.wo * n * np.dtype(dtype).itemsize)

    def rows_path(self, hp: int, wp: int, n: int) -> bool:
        """Whether the tap products apply (column stride 1) and pay, for ``n`` images."""
        big = self.fc >= ROWS_MIN_DEPTH and self.ho * self.wo * n >= ROWS_MIN_PIXELS
        return self.stride[1] == 1 and big and not self.direct(hp, wp)

    def taps(self) -> list[tuple[int, int]]:
        """The filter taps (i, j)."""
        return [(i, j) for i in range(self.fh) for j in range(self.fw)]

    def tap(self, i: int, j: int, rows: slice) -> tuple[slice, slice]:
        """Padded-input rows and columns that filter tap (i, j) reads for output ``rows``."""
        (sy, sx), (dy, dx) = self.stride, self.dilate
        return (
            slice(rows.start * sy + i * dy, (rows.stop - 1) * sy + i * dy + 1, sy),
            slice(j * dx, j * dx + (self.wo - 1) * sx + 1, sx),
        )

    def macs(self, n: int) -> int:
        """Multiply-adds of the forward pass (each derivative costs as many)."""
        return self.ho * self.wo * n * self.k * self.kd


def _row_blocks(total: int, row_bytes: int) -> list[slice]:
    """``range(total)`` cut into blocks of about ``CHUNK_BYTES`` (rows of ``row_bytes``), at
    least one row each and at least ``MIN_BLOCKS`` blocks when there are rows enough. The
    cut depends on the sizes only (never on the cores), so the sums' order does too."""
    step = max(1, min(CHUNK_BYTES // max(1, row_bytes), -(-total // MIN_BLOCKS)))
    return [slice(r, min(r + step, total)) for r in range(0, total, step)]


def _workers(macs: int, single: bool) -> int:
    """Threads for work of ``macs`` multiply-adds: every core when the BLAS runs on its
    callers' threads (``single``), lets go of the GIL (``_Cblas``) and the work is worth
    it, else the calling thread."""
    parallel = single and macs >= PARALLEL_MIN_MACS and _cblas().available
    return threads.cpu_cores() if parallel else 1


class _Workspace:
    """Buffers for the pixel-major copies, kept between calls up to ``WORKSPACE_BYTES`` (the
    least recently returned dropped first). The first write to freshly allocated memory
    costs a page fault per page, which on a virtual machine is as slow as the copy itself."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """An uninitialised ``shape`` array and the buffer that holds it (for ``give``)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)) if fits else None
        if buf is None:
            buf = np.empty(max(nbytes, 1), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape), buf

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)
            while sum(b.nbytes for b in self._free) > WORKSPACE_BYTES:
                self._free.pop(0)


_WORKSPACE = _Workspace()
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]


@contextlib.contextmanager
def _workspace() -> Iterator[Alloc]:
    """``alloc(shape, dtype)`` for arrays used only within the block (then given back)."""
    taken: list[np.ndarray] = []

    def alloc(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        arr, buf = _WORKSPACE.take(shape, dtype)
        taken.append(buf)
        return arr

    try:
        yield alloc
    finally:
        for buf in taken:
            _WORKSPACE.give(buf)


class _Scratch:
    """One work buffer of ``size`` elements per thread, made when the thread first asks."""

    def __init__(self, size: int, dtype: np.dtype) -> None:
        self.size, self.dtype = size, dtype
        self.bufs: dict[int, np.ndarray] = {}

    def get(self, worker: int) -> np.ndarray:
        buf = self.bufs.get(worker)
        if buf is None:
            buf = self.bufs[worker] = np.empty(self.size, self.dtype)
        return buf


def pad_zeros(x: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    if pad == (0, 0, 0, 0):
        return x
    pt, pb, pl, pr = pad
    h, w, c, n = x.shape
    xp = np.zeros((h + pt + pb, w + pl + pr, c, n), dtype=x.dtype)
    xp[pt : pt + h, pl : pl + w] = x
    return xp


def unpad(xp: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    if pad == (0, 0, 0, 0):
        return xp
    pt, pb, pl, pr = pad
    return np.ascontiguousarray(xp[pt : xp.shape[0] - pb, pl : xp.shape[1] - pr])


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
        libs = [c for c in threads.blas_libraries() if getattr(c, "internal_api", "") == "openblas"]
        for lib in sorted(libs, key=lambda c: "numpy" not in c.filepath):
            try:
                self._bind(lib)
            except (AttributeError, OSError, TypeError, ValueError):
                self.fns = {}
                continue
            if self._works():
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


def _cblas() -> _Cblas:
    global _CBLAS
    if _CBLAS is None:
        _CBLAS = _Cblas()
    return _CBLAS


def gemm(
    a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, *, accumulate: bool = False
) -> np.ndarray:
    """``a @ b`` into ``out`` (added to it if ``accumulate``), through the BLAS xGEMM.

    Every product of this module goes through here: the tap products need GEMM's
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
    cblas = _cblas()
    if cblas.available and cblas(a, b, out, 1.0 if accumulate else 0.0):
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


class _RowProducts:
    """``gemm`` on blocks of rows of C-contiguous 2-D arrays, named by their first row: the
    inner loops' products, through the bound ``cblas_?gemm`` with the addresses computed
    here (a few microseconds a call instead of ``gemm``'s checks), else through ``gemm``."""

    def __init__(self, dtype: np.dtype) -> None:
        cblas = _cblas()
        self.fn = cblas.fns[np.dtype(dtype)] if cblas.available else None
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


# ----------------------------------------------------------------------------------------
#                                                                         column matrix


def _im2col(xp: np.ndarray, g: ConvGeometry, rows: slice, cs: slice, buf: np.ndarray) -> np.ndarray:
    """Columns of output ``rows`` for channels ``cs``: (FH*FW*FC) x (rows*Wo*N), in ``buf``."""
    n = xp.shape[3]
    cols = buf[: g.kd * (rows.stop - rows.start) * g.wo * n].reshape(
        g.fh, g.fw, g.fc, rows.stop - rows.start, g.wo, n
    )
    for i in range(g.fh):
        for j in range(g.fw):
            ys, xs = g.tap(i, j, rows)
            cols[i, j] = xp[ys, xs, cs].transpose(2, 0, 1, 3)
    return cols.reshape(g.kd, -1)


def _col2im_add(dcols: np.ndarray, g: ConvGeometry, rows: slice, cs: slice, dxp: np.ndarray) -> None:
    """Adjoint of ``_im2col``: accumulate (FH*FW*FC) x (rows*Wo*N) columns into ``dxp``."""
    d = dcols.reshape(g.fh, g.fw, g.fc, rows.stop - rows.start, g.wo, dxp.shape[3])
    for i in range(g.fh):
        for j in range(g.fw):
            ys, xs = g.tap(i, j, rows)
            dxp[ys, xs, cs] += d[i, j].transpose(1, 2, 0, 3)


def _dy_cols(dy: np.ndarray, rows: slice, ks: slice, buf: np.ndarray) -> np.ndarray:
    """The derivative of output ``rows``, filters ``ks``, as (K/G) x (rows*Wo*N), in ``buf``."""
    r, wo, _, n = dy[rows].shape
    kg = ks.stop - ks.start
    out = buf[: kg * r * wo * n].reshape(kg, r, wo, n)
    np.copyto(out, dy[rows, :, ks].transpose(2, 0, 1, 3))
    return out.reshape(kg, -1)


def _parts(count: int, filter_bytes: int) -> list[range]:
    """``range(count)`` blocks cut into contiguous parts, each with its own partial filter
    derivative: as many as ``MIN_BLOCKS`` allows, within ``PARTIAL_BYTES`` of partial sums."""
    nparts = max(1, min(count, MIN_BLOCKS, PARTIAL_BYTES // max(1, filter_bytes)))
    return [range(count * p // nparts, count * (p + 1) // nparts) for p in range(nparts)]


def columns_forward(x: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """``conv_forward`` through the column matrix, per block of output rows and group."""
    n, dt = x.shape[3], x.dtype
    xp = pad_zeros(x, g.pad)
    y = np.empty((g.ho, g.wo, g.k, n), dtype=dt)
    kg, slices = g.kg, list(g.groups_slices())
    fmats = [np.ascontiguousarray(f[:, :, :, ks].reshape(-1, kg).T) for _, ks in slices]
    chunks = g.row_chunks(n, dt)
    m_max = (chunks[0].stop - chunks[0].start) * g.wo * n
    cols_buf, prod_buf = _Scratch(g.kd * m_max, dt), _Scratch(kg * m_max, dt)

    def task(t: int, worker: int) -> None:
        rows, (cs, ks) = chunks[t // g.groups], slices[t % g.groups]
        cols = _im2col(xp, g, rows, cs, cols_buf.get(worker))
        prod = gemm(fmats[t % g.groups], cols, out=prod_buf.get(worker)[: kg * cols.shape[1]].reshape(kg, -1))
        prod = prod.reshape(kg, rows.stop - rows.start, g.wo, n).transpose(1, 2, 0, 3)
        if bias is None:
            y[rows, :, ks] = prod
        else:  # the bias rides along with the copy into y
            np.add(prod, bias[ks, None], out=y[rows, :, ks])

    with threads.blas_single_threaded() as single:
        threads.run_tasks(task, len(chunks) * g.groups, _workers(g.macs(n), single))
    return y


def columns_backward(
    x: np.ndarray | None, dy: np.ndarray, f: np.ndarray, g: ConvGeometry, in_hw: tuple[int, int], data: bool
) -> Derivatives:
    """``conv_backward`` through the column matrix: the filter derivative per part of the
    blocks (partial sums added in order), the data derivative through ``_col2im_add``."""
    n, dt = dy.shape[3], dy.dtype
    kg, slices = g.kg, list(g.groups_slices())
    chunks = g.row_chunks(n, dt)
    m_max = (chunks[0].stop - chunks[0].start) * g.wo * n
    cols_buf, dy_buf = _Scratch(g.kd * m_max, dt), _Scratch(kg * m_max, dt)
    df = dxp = None
    with threads.blas_single_threaded() as single:
        workers = _workers(g.macs(n), single)
        if x is not None:
            xp = pad_zeros(x, g.pad)
            parts = _parts(len(chunks), g.k * g.kd * dt.itemsize)
            partial = np.empty((len(parts), g.kd, g.k), dt)  # (FH*FW*FC) x K, filled per group

            def df_task(t: int, worker: int) -> None:
                part, (cs, ks) = parts[t // g.groups], slices[t % g.groups]
                for b in part:
                    cols = _im2col(xp, g, chunks[b], cs, cols_buf.get(worker))
                    dyg = _dy_cols(dy, chunks[b], ks, dy_buf.get(worker))
                    gemm(cols, dyg.T, out=partial[t // g.groups, :, ks], accumulate=b > part.start)

            threads.run_tasks(df_task, len(parts) * g.groups, workers)
            df = (partial.sum(axis=0) if len(parts) > 1 else partial[0]).reshape(g.fh, g.fw, g.fc, g.k)
        if data:
            dxp = np.zeros((*g.padded(in_hw), g.fc * g.groups, n), dtype=dt)
            fmats = [np.ascontiguousarray(f[:, :, :, ks].reshape(-1, kg)) for _, ks in slices]

            def dx_task(b: int, q: int, worker: int) -> None:
                (cs, ks), rows = slices[q], chunks[b]
                dyg = _dy_cols(dy, rows, ks, dy_buf.get(worker))
                dcols = cols_buf.get(worker)[: g.kd * dyg.shape[1]].reshape(g.kd, -1)
                gemm(fmats[q], dyg, out=dcols)
                _col2im_add(dcols, g, rows, cs, dxp)

            # Blocks two apart read disjoint input rows when a block spans the filter's
            # reach: then the even blocks run together, then the odd ones; otherwise only
            # the groups (disjoint channels) run side by side.
            step, sy = chunks[0].stop - chunks[0].start, g.stride[0]
            if (step + 1) * sy >= g.extent[0]:
                for first in (0, 1):
                    ids = list(range(first, len(chunks), 2))
                    threads.run_tasks(
                        lambda t, w, ids=ids: dx_task(ids[t // g.groups], t % g.groups, w),
                        len(ids) * g.groups,
                        workers,
                    )
            else:

                def group_task(q: int, worker: int) -> None:
                    for b in range(len(chunks)):
                        dx_task(b, q, worker)

                threads.run_tasks(group_task, g.groups, workers)
    return (None if dxp is None else unpad(dxp, g.pad)), df


# ----------------------------------------------------------------------------------------
#                                                                                direct


def _direct_cols(x: np.ndarray, cs: slice) -> np.ndarray:
    """The column matrix when one window covers the input: the input itself, (H*W*FC) x N."""
    return x[:, :, cs].reshape(-1, x.shape[3])


def _split(count: int, parts: int) -> list[slice]:
    parts = max(1, min(parts, count))
    return [slice(count * p // parts, count * (p + 1) // parts) for p in range(parts)]


def direct_forward(x: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """``conv_forward`` when the window covers the input: y[0, 0] = F^T X per group, the
    filters of a group shared among the threads."""
    n = x.shape[3]
    y = np.empty((1, 1, g.k, n), dtype=x.dtype)
    kg, slices = g.kg, list(g.groups_slices())
    with threads.blas_single_threaded() as single:
        workers = _workers(g.macs(n), single)
        parts = _split(kg, workers)

        def task(t: int, worker: int) -> None:
            (cs, ks), p = slices[t // len(parts)], parts[t % len(parts)]
            ks = slice(ks.start + p.start, ks.start + p.stop)
            gemm(f[:, :, :, ks].reshape(-1, ks.stop - ks.start).T, _direct_cols(x, cs), out=y[0, 0, ks])

        threads.run_tasks(task, g.groups * len(parts), workers)
    if bias is not None:
        y += bias.reshape(-1, 1)
    return y


def direct_backward(
    x: np.ndarray | None, dy: np.ndarray, f: np.ndarray, g: ConvGeometry, in_hw: tuple[int, int], data: bool
) -> Derivatives:
    """``conv_backward`` when the window covers the input, one task per group and derivative."""
    n, dt = dy.shape[3], dy.dtype
    kg, slices = g.kg, list(g.groups_slices())
    dx = np.empty((*in_hw, g.fc * g.groups, n), dtype=dt) if data else None
    df = None if x is None else np.empty((g.kd, g.k), dtype=dt)  # (FH*FW*FC) x K, filled per group
    jobs = [(q, "dx") for q in range(g.groups) if data] + [
        (q, "df") for q in range(g.groups) if x is not None
    ]

    def task(t: int, worker: int) -> None:
        q, what = jobs[t]
        (cs, ks), dyg = slices[q], dy[0, 0, slices[q][1]]
        if what == "dx":
            dx[:, :, cs] = gemm(f[:, :, :, ks].reshape(-1, kg), dyg).reshape(*in_hw, g.fc, n)
        else:
            gemm(_direct_cols(x, cs), dyg.T, out=df[:, ks])

    with threads.blas_single_threaded() as single:
        threads.run_tasks(task, len(jobs), _workers(g.macs(n), single))
    return dx, (None if df is None else df.reshape(g.fh, g.fw, g.fc, g.k))


# ----------------------------------------------------------------------------------------
#                                                                          tap products


def _to_grid(
    a: np.ndarray, pads: tuple[int, int, int, int], groups: int, slack: int, alloc: Alloc
) -> tuple[np.ndarray, int, int]:
    """``a`` (H x W x C x N) zero-padded by ``pads`` = (top, bottom, left, right) (a negative
    pad crops) in the pixel-major layout: ``(G, (H'*W' + slack)*N, C/G)`` where row
    ``(y*W' + x)*N + n`` of group q holds ``a_padded[y, x, q*C/G:(q+1)*C/G, n]``, followed by
    ``slack`` pixels of zeros (which the last row's shifted blocks may read). Returns the
    array, H' and W'. Large copies are shared among the cores, in bands of rows."""
    h, w, c, n = a.shape
    t, b, left, r = pads
    hg, wg, cg = h + t + b, w + left + r, c // groups
    flat = alloc((groups, (hg * wg + slack) * n, cg), a.dtype)
    grid = flat[:, : hg * wg * n].reshape(groups, hg, wg, n, cg)
    y0, y1, x0, x1 = max(t, 0), hg - max(b, 0), max(left, 0), wg - max(r, 0)
    grid[:, :y0] = 0
    grid[:, y1:] = 0
    grid[:, y0:y1, :x0] = 0
    grid[:, y0:y1, x1:] = 0
    flat[:, hg * wg * n :] = 0
    src = a[max(-t, 0) : h - max(-b, 0), max(-left, 0) : w - max(-r, 0)]
    src = src.reshape(y1 - y0, x1 - x0, groups, cg, n).transpose(2, 0, 1, 4, 3)
    bands = _split(y1 - y0, threads.cpu_cores() if a.size >= threads.PARALLEL_MIN else 1)

    def band(p: int, worker: int) -> None:
        rows = bands[p]
        np.copyto(grid[:, y0 + rows.start : y0 + rows.stop, x0:x1], src[:, rows])

    threads.run_tasks(band, len(bands))
    return flat, hg, wg


def _taps_pass(
    src: np.ndarray,
    src_w: int,
    n: int,
    wt: np.ndarray,
    sy: int,
    offsets: list[int],
    out_hw: tuple[int, int],
    epilogue: Callable[[int, slice, np.ndarray], None],
) -> list[Task]:
    """The tasks of the sum over taps on the pixel-major layout, for each group q and output pixel
    (oy, ox) below ``out_hw``::

        out[oy, ox] = sum_t src[q, pixel oy*sy*src_w + ox + offsets[t]] @ wt[q, t]

    in blocks of output rows; ``epilogue(q, rows, block)`` receives each block as a
    ``(rows, src_w, N, cout)`` array whose first ``out_hw[1]`` columns hold the sums."""
    groups, _, _, cout = wt.shape
    out_h, out_w = out_hw
    row = src_w * n  # matrix rows per output row
    blocks = _row_blocks(out_h, row * cout * src.itemsize)
    step = blocks[0].stop - blocks[0].start
    # One product per tap for a whole block: at row stride 1, output pixel q*... of the
    # src_w-wide grid reads src pixel (its index + offset); the extra columns are dropped.
    whole = sy == 1 and step > 1 and src_w - out_w <= FLAT_MAX_WASTE * src_w
    scratch = _Scratch(step * row * cout, src.dtype)

    def task(q: int, rows: slice, worker: int) -> None:
        r = rows.stop - rows.start
        buf = scratch.get(worker)[: r * row * cout].reshape(r * row, cout)
        mm, a, w = _RowProducts(src.dtype), src[q], [wt[q, k] for k in range(len(offsets))]
        if whole:
            for k, off in enumerate(offsets):
                mm.nn(a, rows.start * row + off * n, w[k], buf, 0, r * row, float(k > 0))
        else:
            for i, oy in enumerate(range(rows.start, rows.stop)):
                for k, off in enumerate(offsets):
                    mm.nn(a, oy * sy * row + off * n, w[k], buf, i * row, out_w * n, float(k > 0))
        epilogue(q, rows, buf.reshape(r, src_w, n, cout))

    return [partial(task, q, rows) for q in range(groups) for rows in blocks]


def _taps_filter_grad(
    xs: np.ndarray,
    xs_w: int,
    dys: np.ndarray,
    dys_w: int,
    n: int,
    sy: int,
    offsets: list[int],
    out_hw: tuple[int, int],
) -> tuple[list[Task], Callable[[], np.ndarray]]:
    """The tasks of, per group q and tap t::

        sum_(oy, ox) xs[q, pixel oy*sy*xs_w + ox + offsets[t]]^T dys[q, pixel oy*dys_w + ox]

    (grids ``xs_w`` and ``dys_w`` pixels wide), and the function that returns the sums,
    ``(G, T, cin, cout)``, once they have run. When the grids have the same width, ``dys``
    zero outside the output columns, and the row stride is 1, a run of output rows is one
    product per tap. The output rows are cut into parts, each with its own partial sums,
    added in order at the end."""
    groups, _, cin = xs.shape
    cout = dys.shape[2]
    ho, wo = out_hw
    whole = sy == 1 and xs_w == dys_w
    taps = len(offsets)
    blocks = _row_blocks(ho, xs_w * n * (cin + cout) * xs.itemsize)
    parts = [blocks[p.start : p.stop] for p in _parts(len(blocks), groups * taps * cin * cout * xs.itemsize)]
    # Each task runs its taps over the blocks of its part in order, a block's rows staying
    # in cache from one tap to the next; the taps are shared out when the parts are few.
    tap_sets = _split(taps, -(-2 * MIN_BLOCKS // (len(parts) * groups)))
    sums = np.empty((len(parts), groups, taps, cin, cout), xs.dtype)

    def task(p: int, q: int, ks: slice, worker: int) -> None:
        mm, a, d = _RowProducts(xs.dtype), xs[q], dys[q]
        for b, rows in enumerate(parts[p]):
            for k in range(ks.start, ks.stop):
                off, out = offsets[k] * n, sums[p, q, k]
                if whole:
                    m, s = (rows.stop - rows.start) * xs_w * n, rows.start * xs_w * n
                    mm.tn(a, s + off, d, s, m, out, float(b > 0))
                    continue
                for oy in range(rows.start, rows.stop):
                    mm.tn(
                        a,
                        oy * sy * xs_w * n + off,
                        d,
                        oy * dys_w * n,
                        wo * n,
                        out,
                        float(b > 0 or oy > rows.start),
                    )

    tasks = [partial(task, p, q, ks) for p in range(len(parts)) for q in range(groups) for ks in tap_sets]
    return tasks, lambda: sums.sum(axis=0) if len(parts) > 1 else sums[0]


def _taps_data_grad_rows(
    dys: np.ndarray,
    dys_w: int,
    n: int,
    wt: np.ndarray,
    g: ConvGeometry,
    in_hw: tuple[int, int],
    dx: np.ndarray,
) -> list[Task]:
    """The tasks of the data derivative (column stride 1) into ``dx`` (H x W x C x N), row by
    row: padded input row yp gathers ``dY[oy] @ F[i, j]^T``, shifted by ``j*DX`` pixels,
    over the taps with ``oy*SY + i*DY = yp``; ``dys`` holds dY on a ``dys_w``-wide grid."""
    (sy, _), (ddy, ddx) = g.stride, g.dilate
    pt, _, pl, _ = g.pad
    h, w = in_hw
    wp = g.padded(in_hw)[1]
    row, m = wp * n, g.wo * n
    blocks = _row_blocks(h, row * g.fc * dx.itemsize)
    step = blocks[0].stop - blocks[0].start
    scratch = _Scratch(step * row * g.fc, dx.dtype)

    def task(q: int, rows: slice, worker: int) -> None:
        r = rows.stop - rows.start
        buf = scratch.get(worker)[: r * row * g.fc].reshape(r * row, g.fc)
        buf.fill(0)
        mm, d, taps = _RowProducts(dx.dtype), dys[q], [wt[q, k] for k in range(g.fh * g.fw)]
        for y in range(rows.start, rows.stop):
            for i in range(g.fh):
                oy, rem = divmod(y + pt - i * ddy, sy)
                if rem or not 0 <= oy < g.ho:
                    continue
                for j in range(g.fw):
                    o0 = (y - rows.start) * row + j * ddx * n
                    mm.nn(d, oy * dys_w * n, taps[i * g.fw + j], buf, o0, m, 1.0)
        block = buf.reshape(r, wp, n, g.fc)[:, pl : pl + w].transpose(0, 1, 3, 2)
        dx[rows, :, q * g.fc : (q + 1) * g.fc] = block

    return [partial(task, q, rows) for q in range(g.groups) for rows in blocks]


def _tap_filters(f: np.ndarray, g: ConvGeometry, *, transposed: bool, turned: bool = False) -> np.ndarray:
    """The filter bank as ``(G, FH*FW, FC, K/G)`` tap matrices (``(G, FH*FW, K/G, FC)`` when
    ``transposed``; taps in reverse order when ``turned``), contiguous."""
    if turned:
        f = f[::-1, ::-1]
    t = f.reshape(g.fh * g.fw, g.fc, g.groups, g.kg)
    return np.ascontiguousarray(t.transpose(2, 0, 3, 1) if transposed else t.transpose(2, 0, 1, 3))


def _run(tasks: list[Task], workers: int) -> None:
    """Run ``tasks`` (each given the worker index) on ``workers`` threads, in one go: the
    fewer the waits for the last task, the less a busy machine costs."""
    threads.run_tasks(lambda t, worker: tasks[t](worker), len(tasks), workers)


def rows_forward(x: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """``conv_forward`` for ``g.rows_path``: per group, Y = sum over taps (i, j) of the input
    block shifted by the tap times F[i, j] (FC x K/G), on the pixel-major layout."""
    n, dt = x.shape[3], x.dtype
    (sy, _), (ddy, ddx) = g.stride, g.dilate
    kg = g.kg
    y = np.empty((g.ho, g.wo, g.k, n), dt)

    def epilogue(q: int, rows: slice, block: np.ndarray) -> None:
        ks, sums = slice(q * kg, (q + 1) * kg), block[:, : g.wo]
        if bias is not None:  # added last, as MatConvNet does, while the block is in cache
            np.add(sums, bias[ks], out=sums)
        np.copyto(y[rows, :, ks], sums.transpose(0, 1, 3, 2))

    with _workspace() as alloc, threads.blas_single_threaded() as single:
        xs, _, wg = _to_grid(x, g.pad, g.groups, g.extent[1] - 1, alloc)
        offsets = [i * ddy * wg + j * ddx for i, j in g.taps()]
        wt = _tap_filters(f, g, transposed=False)
        _run(_taps_pass(xs, wg, n, wt, sy, offsets, (g.ho, g.wo), epilogue), _workers(g.macs(n), single))
    return y


def rows_backward(
    x: np.ndarray | None, dy: np.ndarray, f: np.ndarray, g: ConvGeometry, in_hw: tuple[int, int], data: bool
) -> Derivatives:
    """``conv_backward`` for ``g.rows_path``: the data derivative (if ``data``) and the filter
    derivative (if ``x`` is given) as tap products on the pixel-major layout, all their
    blocks in one batch of tasks."""
    n, dt = dy.shape[3], dy.dtype
    (sy, _), (ddy, ddx) = g.stride, g.dilate
    pt, pb, pl, pr = g.pad
    (eh, ew), wp = g.extent, g.padded(in_hw)[1]
    dx = dys = finish = None
    tasks: list[Task] = []
    if data:
        dx = np.empty((*in_hw, g.fc * g.groups, n), dt)
    # dX as one correlation (below) at row stride 1 when its grid wastes little; else row
    # by row. dF in runs of whole rows when the input grid wastes little; else row by row.
    turned = data and sy == 1 and ew - 1 <= FLAT_MAX_WASTE * (in_hw[1] + ew - 1)
    whole_df = x is not None and sy == 1 and wp - g.wo <= FLAT_MAX_WASTE * wp
    with _workspace() as alloc, threads.blas_single_threaded() as single:
        if turned:
            # dX = the correlation of dY, padded by the filter's reach minus the padding,
            # with the filters turned by 180 degrees and transposed (K/G x FC per tap).
            pads = (eh - 1 - pt, eh - 1 - pb, ew - 1 - pl, ew - 1 - pr)
            dyp, _, wq = _to_grid(dy, pads, g.groups, ew - 1, alloc)

            def epilogue(q: int, rows: slice, block: np.ndarray) -> None:
                np.copyto(dx[rows, :, q * g.fc : (q + 1) * g.fc], block[:, : in_hw[1]].transpose(0, 1, 3, 2))

            offsets = [i * ddy * wq + j * ddx for i, j in g.taps()]
            wr = _tap_filters(f, g, transposed=True, turned=True)
            tasks += _taps_pass(dyp, wq, n, wr, 1, offsets, in_hw, epilogue)
            if wq == wp and min(pads) >= 0:
                # The same array, shifted, is dY on the padded input's grid, zero outside
                # the output columns: what the filter derivative reads.
                dys, dys_w = dyp[:, (pads[0] * wq + pads[2]) * n :], wq
        if dys is None and (x is not None or data and not turned):
            dys_w = wp if whole_df else g.wo
            dys = _to_grid(dy, (0, 0, 0, dys_w - g.wo), g.groups, 0, alloc)[0]
        if data and not turned:
            tasks += _taps_data_grad_rows(dys, dys_w, n, _tap_filters(f, g, transposed=True), g, in_hw, dx)
        if x is not None:
            xs, _, wg = _to_grid(x, g.pad, g.groups, ew - 1, alloc)
            offsets = [i * ddy * wg + j * ddx for i, j in g.taps()]
            df_tasks, finish = _taps_filter_grad(xs, wg, dys, dys_w, n, sy, offsets, (g.ho, g.wo))
            tasks = df_tasks + tasks  # the longer tasks first, the short ones balance the end
        _run(tasks, _workers(g.macs(n) * (data + (x is not None)), single))
    df = None
    if finish is not None:
        df = finish().reshape(g.groups, g.fh, g.fw, g.fc, g.kg).transpose(1, 2, 3, 0, 4)
        df = df.reshape(g.fh, g.fw, g.fc, g.k)
    return dx, df


# ----------------------------------------------------------------------------------------
#                                                                              dispatch


def conv_forward(x: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """y[oy, ox, k, n] = b[k] + sum_{i,j,c} xp[oy*sy + i*dy, ox*sx + j*dx, g*FC + c, n] f[i, j, c, k],
    ``xp`` being ``x`` zero-padded by ``g.pad``."""
    hp, wp = g.padded(x.shape[:2])
    if g.direct(hp, wp):
        return direct_forward(x, f, g, bias)
    if g.rows_path(hp, wp, x.shape[3]):
        return rows_forward(x, f, g, bias)
    return columns_forward(x, f, g, bias)


def conv_backward(
    x: np.ndarray | None,
    dy: np.ndarray,
    f: np.ndarray,
    g: ConvGeometry,
    in_hw: tuple[int, int],
    *,
    data: bool,
) -> Derivatives:
    """Derivatives of ``conv_forward`` projected on ``dy``: (dx, of size ``in_hw``, if
    ``data``; df if ``x`` is given). dx is the transposed convolution of dy (cropped by
    the padding)."""
    hp, wp = g.padded(in_hw)
    if g.direct(hp, wp):
        return direct_backward(x, dy, f, g, in_hw, data)
    if g.rows_path(hp, wp, dy.shape[3]):
        return rows_backward(x, dy, f, g, in_hw, data)
    return columns_backward(x, dy, f, g, in_hw, data)
