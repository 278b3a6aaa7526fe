"""Convolution as BLAS products: the fast path of ``vl_nnconv`` and ``vl_nnconvt``.

``conv_forward`` computes the cross-correlation of an input with a filter bank (zero
padding included) and ``conv_backward`` its derivatives (harness.mcn.conv states the
definition and checks the arguments). Arrays are ``H x W x C x N``, images last, and
every product goes through the BLAS's xGEMM (harness.mcn.kernels.blas ``gemm``), called
through ctypes so that other threads run meanwhile (scipy's wrappers, which hold the GIL,
when that binding is not found). The work is cut into blocks of output rows (and filter
groups) whose buffers stay near ``CHUNK_BYTES``, so they stay in cache; the cores' threads
take the blocks one after the other (threads.run_tasks) and the BLAS runs each product on
the thread that calls it (threads.blas_single_threaded): a core slowed by another process
then takes fewer blocks instead of holding up the other at every product. The padded
copies live in a workspace kept between calls (``Workspace``): freshly allocated memory
costs a page fault per page. Three ways to the same sums, one module each:

- Tap products (conv_rows; column stride 1, inputs FC deep or more:
  ``ConvGeometry.rows_path``): the input copied once, padded, to a pixel-major layout,
  and the layer a sum over filter taps of products of shifted blocks of its rows, with
  no column matrix.
- Column matrix (conv_columns; any geometry: thin inputs, column strides): per block of
  output rows and filter group, the column matrix (im2col) times the filters in one
  product; the data derivative goes back through the adjoint copy (col2im).
- Direct (conv_direct): when the one window covers the whole unpadded input
  (MatConvNet's "fully connected" mode, 1x1 convolutions on 1x1 inputs) the input itself
  is the column matrix.

All three compute the same sums; in float32 they add them in different orders (the
golden tolerances hold for each). The results never depend on which thread ran which
block: every block writes its own part of the output, and partial sums are added in a
fixed order.

This module holds what the three share, and picks one (``conv_forward``,
``conv_backward``): the geometry (``ConvGeometry``); the sizes and thresholds below, which
the paths read here at each call (so that a test can set them here); the cut into blocks
and parts; the threads' count; the buffers (``Scratch``, ``Workspace``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from harness.mcn.kernels import threads
from harness.mcn.kernels.blas import cblas, gemm

# The path modules import this module back (``conv_gemm.X``, looked up when called, never
# while they load), so that the thresholds have one home and a test that sets one here
# reaches every path; gemm, pad_zeros and unpad are re-exported under their old address.
from harness.mcn.kernels.conv_columns import columns_backward, columns_forward, pad_zeros, unpad
from harness.mcn.kernels.conv_direct import direct_backward, direct_forward
from harness.mcn.kernels.conv_rows import rows_backward, rows_forward

__all__ = [
    "BIAS_PIXELS_FIRST_BELOW",
    "CHUNK_BYTES",
    "FLAT_MAX_WASTE",
    "MIN_BLOCKS",
    "PARALLEL_MIN_MACS",
    "PARTIAL_BYTES",
    "ROWS_MIN_DEPTH",
    "ROWS_MIN_PIXELS",
    "WORKSPACE_BYTES",
    "Alloc",
    "ConvGeometry",
    "Derivatives",
    "Scratch",
    "Workspace",
    "bias_sums",
    "columns_backward",
    "columns_forward",
    "conv_backward",
    "conv_forward",
    "direct_backward",
    "direct_forward",
    "filter_parts",
    "gemm",
    "pad_zeros",
    "row_blocks",
    "rows_backward",
    "rows_forward",
    "split_evenly",
    "unpad",
    "workers",
    "workspace",
]

Derivatives = tuple[np.ndarray | None, np.ndarray | None]

# Target size of one block's buffer (a block of the column matrix, of the tap products'
# outputs, of the rows a filter-derivative part reads): about what a core's cache holds.
CHUNK_BYTES = 1 << 20
# The output rows are cut into at least this many blocks when there are rows enough, so
# that the threads share the work evenly even when one of them is slowed down. More
# blocks make the products of small layers (a ResNet's 16x16x64 at batch 16) too short:
# 8 cost bench_family's resnet case 8% against 4 (median of 40 interleaved passes).
MIN_BLOCKS = 4
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
# Bytes of pixel-major copies kept between calls for reuse (see Workspace).
WORKSPACE_BYTES = 64 << 20
# bias_sums adds the pixels first for fewer images than this (see there).
BIAS_PIXELS_FIRST_BELOW = 32


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
        return row_blocks(self.ho, self.kd * self.wo * n * np.dtype(dtype).itemsize)

    @property
    def phased(self) -> bool:
        """Strided without dilation: the tap products run on the input's phases."""
        return self.stride != (1, 1) and self.dilate == (1, 1)

    def rows_path(self, hp: int, wp: int, n: int) -> bool:
        """Whether the tap products apply (column stride 1, or strides without dilation) and
        pay, for ``n`` images."""
        big = self.fc >= ROWS_MIN_DEPTH and self.ho * self.wo * n >= ROWS_MIN_PIXELS
        return (self.stride[1] == 1 or self.phased) and big and not self.direct(hp, wp)

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


# ----------------------------------------------------------------------------------------
#                                                            blocks, threads and buffers


def row_blocks(total: int, row_bytes: int) -> list[slice]:
    """``range(total)`` cut into blocks of about ``CHUNK_BYTES`` (rows of ``row_bytes``), at
    least one row each and at least ``MIN_BLOCKS`` blocks when there are rows enough. The
    cut depends on the sizes only (never on the cores), so the sums' order does too."""
    step = max(1, min(CHUNK_BYTES // max(1, row_bytes), -(-total // MIN_BLOCKS)))
    return [slice(r, min(r + step, total)) for r in range(0, total, step)]


def filter_parts(count: int, filter_bytes: int) -> list[range]:
    """``range(count)`` blocks cut into contiguous parts, each with its own partial filter
    derivative: as many as ``MIN_BLOCKS`` allows, within ``PARTIAL_BYTES`` of partial sums."""
    nparts = max(1, min(count, MIN_BLOCKS, PARTIAL_BYTES // max(1, filter_bytes)))
    return [range(count * p // nparts, count * (p + 1) // nparts) for p in range(nparts)]


def split_evenly(count: int, parts: int) -> list[slice]:
    """``range(count)`` cut into ``parts`` contiguous slices (fewer when ``count`` is smaller)
    whose lengths differ by at most one."""
    parts = max(1, min(parts, count))
    return [slice(count * p // parts, count * (p + 1) // parts) for p in range(parts)]


def workers(macs: int, single: bool) -> int:
    """Threads for work of ``macs`` multiply-adds: every core when the BLAS runs on its
    callers' threads (``single``), lets go of the GIL (the ctypes binding) and the work is
    worth it, else the calling thread."""
    parallel = single and macs >= PARALLEL_MIN_MACS and cblas().available
    return threads.cpu_cores() if parallel else 1


class Workspace:
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
        """Keep ``buf`` for reuse, dropping the least recently returned buffers beyond
        ``WORKSPACE_BYTES``."""
        with self._lock:
            self._free.append(buf)
            while sum(b.nbytes for b in self._free) > WORKSPACE_BYTES:
                self._free.pop(0)


_WORKSPACE = Workspace()
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]


@contextlib.contextmanager
def workspace() -> Iterator[Alloc]:
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


class Scratch:
    """One work buffer of ``size`` elements per thread, made when the thread first asks."""

    def __init__(self, size: int, dtype: np.dtype) -> None:
        self.size, self.dtype = size, dtype
        self.bufs: dict[int, np.ndarray] = {}

    def get(self, worker: int) -> np.ndarray:
        """The buffer of thread ``worker``."""
        buf = self.bufs.get(worker)
        if buf is None:
            buf = self.bufs[worker] = np.empty(self.size, self.dtype)
        return buf


# ----------------------------------------------------------------------------------------
#                                                                    bias derivative sums


def bias_sums(dy: np.ndarray) -> np.ndarray:
    """``dy`` (H x W x K x N) summed over pixels and images, per filter, in float64. With few
    images, pixels first: whole rows of K*N numbers added at once, where numpy's sum along
    the short contiguous image axis runs one short loop per number; otherwise images
    first (a pairwise sum along the contiguous axis), then pixels."""
    h, w, k, n = dy.shape
    if n < BIAS_PIXELS_FIRST_BELOW:
        return dy.reshape(h * w, k * n).sum(axis=0, dtype=np.float64).reshape(k, n).sum(axis=1)
    return dy.sum(axis=3).sum(axis=(0, 1), dtype=np.float64)


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
    if not g.rows_path(hp, wp, dy.shape[3]):
        return columns_backward(x, dy, f, g, in_hw, data)
    dx, df = rows_backward(x, dy, f, g, in_hw, data)
    # The tap products read whole rows of their grids: dF multiplies the input's pixels
    # beyond a tap's reach by dY's zero columns, dX the filters by dY's zero padding. Those
    # products are 0 unless the input (for dF) or the filters (for dX) hold an infinity or
    # a NaN, which would turn a derivative the definition leaves finite into NaN: then the
    # column matrix, which multiplies exactly the definition's terms, computes it again.
    redo_df = df is not None and not np.isfinite(df).all()
    redo_dx = dx is not None and not np.isfinite(f).all()
    if redo_df or redo_dx:
        cdx, cdf = columns_backward(x if redo_df else None, dy, f, g, in_hw, redo_dx)
        dx, df = (cdx if redo_dx else dx), (cdf if redo_df else df)
    return dx, df
