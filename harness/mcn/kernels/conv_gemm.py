"""Convolution as BLAS products: the fast path of ``vl_nnconv`` and ``vl_nnconvt``.

``conv_forward`` computes the cross-correlation of a padded input with a filter bank and
``conv_backward`` its derivatives (harness.mcn.conv states the definition and checks the
arguments). Arrays are ``H x W x C x N``, images last, and every product goes through
scipy's BLAS (``gemm``). Two ways to the same sums:

- Column matrix (any geometry). The column matrix of a filter group is
  ``(FH*FW*FC) x (Ho*Wo*N)`` with rows ordered ``(fh, fw, c)``, the row order of the
  C-order reshape ``F.reshape(-1, K)`` of an ``FH x FW x FC x K`` filter bank, so each
  product is one BLAS call, ``F.reshape(-1, K).T @ cols`` giving ``K x (Ho*Wo*N)``;
  with the images last every copy moves runs of N numbers. Output rows are processed in
  chunks so that the column buffer stays near ``CHUNK_BYTES``. When the one window
  covers the whole unpadded input (MatConvNet's "fully connected" mode, 1x1 convolutions
  on 1x1 inputs) the input itself is the column matrix.
- Row GEMMs (column stride 1, one group, deep and wide enough: ``ConvGeometry.rows_path``).
  The data is transposed once to ``H x W x N x C``; then the pixels of an output row and
  those a filter tap reads for it are each one contiguous ``(Wo*N) x C`` matrix, and the
  layer is one BLAS product per output row and tap, accumulated in place, with no
  column matrix (which would copy the input FH*FW times).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas

from harness.mcn.kernels import threads

__all__ = [
    "CHUNK_BYTES",
    "ROWS_MIN_DEPTH",
    "ROWS_MIN_PIXELS",
    "ConvGeometry",
    "conv_backward",
    "conv_forward",
    "gemm",
    "pad_zeros",
    "rows_backward",
    "rows_forward",
    "unpad",
]

Derivatives = tuple[np.ndarray | None, np.ndarray | None]

# Upper bound on the buffer of one chunk of output rows: the column matrix (one filter
# group), or the row-GEMM outputs.
CHUNK_BYTES = 16 * 2**20
# The row-GEMM path (see rows_forward) takes over when its products are big enough:
# they contract over the channels of one tap (thin ones waste the BLAS), there is one per
# output row and tap (each pays for waking the BLAS threads), and one row is Wo*N pixels.
ROWS_MIN_DEPTH = 16
ROWS_MIN_PIXELS = 4096


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

    def groups_slices(self) -> Iterator[tuple[slice, slice]]:
        """(input channels, filters) of each group."""
        kg = self.k // self.groups
        for q in range(self.groups):
            yield slice(q * self.fc, (q + 1) * self.fc), slice(q * kg, (q + 1) * kg)

    def direct(self, hp: int, wp: int) -> bool:
        """The one window covers the whole unpadded input: the input is the column matrix."""
        return (self.ho, self.wo, self.fh, self.fw, self.pad) == (1, 1, hp, wp, (0, 0, 0, 0))

    def row_chunks(self, n: int, dtype: np.dtype) -> tuple[list[slice], np.ndarray]:
        """Chunks of output rows whose column matrix fits in ``CHUNK_BYTES``, and a buffer
        for one chunk's columns."""
        step = min(self.ho, max(1, CHUNK_BYTES // max(1, self.kd * self.wo * n * np.dtype(dtype).itemsize)))
        chunks = [slice(h0, min(h0 + step, self.ho)) for h0 in range(0, self.ho, step)]
        return chunks, np.empty(self.kd * step * self.wo * n, dtype=dtype)

    def rows_path(self, hp: int, wp: int, n: int) -> bool:
        """Whether the row-GEMM path applies (unit column stride, one group) and pays, for ``n`` images."""
        big = min(self.fc, self.k) >= ROWS_MIN_DEPTH and self.wo * n >= ROWS_MIN_PIXELS
        return self.stride[1] == 1 and self.groups == 1 and big and not self.direct(hp, wp)

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


def _direct_cols(xp: np.ndarray, cs: slice) -> np.ndarray:
    """The column matrix when one window covers the input: the input itself, (H*W*FC) x N."""
    return xp[:, :, cs].reshape(-1, xp.shape[3])


def _swap_last(a: np.ndarray, bias: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """``a`` with its last two axes swapped, into ``out`` or a new C-ordered array (plus ``bias``
    along the new third axis). numpy transposes at memory speed at best, so the rows are shared
    among the cores."""
    if out is None:
        out = np.empty(a.shape[:2] + (a.shape[3], a.shape[2]), a.dtype)

    def part(rows: slice) -> None:
        src = a[rows].transpose(0, 1, 3, 2)
        if bias is None:
            np.copyto(out[rows], src)
        else:
            np.add(src, bias[:, None], out=out[rows])

    parts = min(threads.cpu_cores(), a.shape[0]) if a.size >= threads.PARALLEL_MIN else 1
    threads.parallel_map(
        part, [slice(a.shape[0] * q // parts, a.shape[0] * (q + 1) // parts) for q in range(parts)]
    )
    return out


def gemm(
    a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, *, accumulate: bool = False
) -> np.ndarray:
    """``a @ b`` into ``out`` (added to it if ``accumulate``), through scipy's BLAS xGEMM.

    Every product of this module goes through here: the row-GEMM path needs GEMM's
    ``beta = 1``, which numpy's matmul does not expose, and numpy and scipy each bring
    their own OpenBLAS, whose idle threads spin for a while after each call: alternating
    the two stalls both. BLAS is column-major, so the C-ordered ``out`` is computed as
    ``out.T = b.T @ a.T``; a C- or F-ordered operand is passed without a copy.
    """
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = np.empty((m, n), a.dtype)
    if not out.flags.c_contiguous:
        prod = gemm(a, b)
        if accumulate:
            out += prod
        else:
            out[...] = prod
        return out
    if out.size == 0 or a.shape[1] == 0:
        if not accumulate:
            out.fill(0)
        return out

    def fortran(z: np.ndarray) -> tuple[np.ndarray, int]:
        """``z.T`` as an F-ordered BLAS operand and its transpose flag."""
        if z.flags.c_contiguous:
            return z.T, 0
        if z.flags.f_contiguous:
            return z, 1
        return np.ascontiguousarray(z).T, 0

    (bt, trans_b), (at, trans_a) = fortran(b), fortran(a)
    xgemm = blas.sgemm if a.dtype == np.float32 else blas.dgemm
    res = xgemm(1.0, bt, at, beta=float(accumulate), c=out.T, trans_a=trans_b, trans_b=trans_a, overwrite_c=1)
    if res.ctypes.data != out.ctypes.data:  # f2py copied ``c`` after all: keep its result
        out[...] = res.T
    return out


# The row-GEMM path. With the images moved next to the channels (H x W x N x C), the
# pixels of one output row and the pixels a filter tap reads for it are each one
# contiguous (Wo*N) x C matrix, so each (output row, tap) pair is one BLAS product with
# no column matrix at all; the products of one row accumulate in place (beta = 1).


def _row_chunks(g: ConvGeometry, n: int, dt: np.dtype) -> tuple[list[slice], np.ndarray]:
    """Chunks of output rows whose ``(rows, Wo, N, K)`` outputs fit in ``CHUNK_BYTES``, and a
    buffer for one chunk: the products land in a cached buffer, which is then transposed
    into place, instead of in a layer-sized temporary."""
    step = min(g.ho, max(1, CHUNK_BYTES // (g.wo * n * g.k * np.dtype(dt).itemsize)))
    return [slice(r, min(r + step, g.ho)) for r in range(0, g.ho, step)], np.empty((step, g.wo, n, g.k), dt)


def rows_forward(xp: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """``conv_forward`` for ``g.rows_path``: Y[oy] (Wo*N x K) = sum_ij X_ij[oy] (Wo*N x C) F[i, j]."""
    n = xp.shape[3]
    (sy, _), (dy, dx) = g.stride, g.dilate
    xt = _swap_last(xp)
    y = np.empty((g.ho, g.wo, g.k, n), xp.dtype)
    f = np.ascontiguousarray(f)
    m = g.wo * n
    chunks, yt = _row_chunks(g, n, xp.dtype)
    for rows in chunks:
        for oy in range(rows.start, rows.stop):
            y_row = yt[oy - rows.start].reshape(m, g.k)
            for t, (i, j) in enumerate(g.taps()):
                x_tap = xt[oy * sy + i * dy, j * dx : j * dx + g.wo].reshape(m, g.fc)
                gemm(x_tap, f[i, j], out=y_row, accumulate=t > 0)
        _swap_last(yt[: rows.stop - rows.start], bias, out=y[rows])
    return y


def rows_backward(
    xp: np.ndarray | None, dy: np.ndarray, f: np.ndarray, g: ConvGeometry, dx_hw: tuple[int, int] | None
) -> Derivatives:
    """``conv_backward`` for ``g.rows_path``: dX_ij[oy] += dY[oy] F[i, j]^T (on a padded grid
    of ``dx_hw``, if given) and dF[i, j] += X_ij[oy]^T dY[oy] (if ``xp`` is given), per
    output row ``oy`` and tap ``(i, j)``."""
    n, dt = dy.shape[3], dy.dtype
    (sy, _), (ddy, ddx) = g.stride, g.dilate
    xt = None if xp is None else _swap_last(xp)
    dxt = None if dx_hw is None else np.zeros((*dx_hw, n, g.fc), dt)
    df = None if xp is None else np.empty((g.fh, g.fw, g.fc, g.k), dt)
    f = np.ascontiguousarray(f)
    m = g.wo * n
    chunks, dyt = _row_chunks(g, n, dt)
    for rows in chunks:
        _swap_last(dy[rows], out=dyt[: rows.stop - rows.start])
        for oy in range(rows.start, rows.stop):
            dy_row = dyt[oy - rows.start].reshape(m, g.k)
            for i, j in g.taps():
                ys, xs = oy * sy + i * ddy, slice(j * ddx, j * ddx + g.wo)
                if xt is not None:
                    x_tap = xt[ys, xs].reshape(m, g.fc)
                    gemm(x_tap.T, dy_row, out=df[i, j], accumulate=oy > 0)
                if dxt is not None:
                    dx_tap = dxt[ys, xs].reshape(m, g.fc)
                    gemm(dy_row, f[i, j].T, out=dx_tap, accumulate=True)
    return (None if dxt is None else _swap_last(dxt)), df


def conv_forward(xp: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """y[oy, ox, k, n] = b[k] + sum_{i,j,c} xp[oy*sy + i*dy, ox*sx + j*dx, g*FC + c, n] f[i, j, c, k]."""
    if g.rows_path(*xp.shape[:2], xp.shape[3]):
        return rows_forward(xp, f, g, bias)
    n = xp.shape[3]
    y = np.empty((g.ho, g.wo, g.k, n), dtype=xp.dtype)
    kg = g.k // g.groups
    if g.direct(*xp.shape[:2]):
        for cs, ks in g.groups_slices():
            gemm(f[:, :, :, ks].reshape(-1, kg).T, _direct_cols(xp, cs), out=y[0, 0, ks])
        if bias is not None:
            y += bias.reshape(-1, 1)
        return y
    chunks, buf = g.row_chunks(n, xp.dtype)
    for rows in chunks:
        for cs, ks in g.groups_slices():
            prod = gemm(f[:, :, :, ks].reshape(-1, kg).T, _im2col(xp, g, rows, cs, buf))
            prod = prod.reshape(kg, rows.stop - rows.start, g.wo, n).transpose(1, 2, 0, 3)
            if bias is None:
                y[rows, :, ks] = prod
            else:  # the bias rides along with the copy into y
                np.add(prod, bias[ks, None], out=y[rows, :, ks])
    return y


def conv_backward(
    xp: np.ndarray | None,
    dy: np.ndarray,
    f: np.ndarray,
    g: ConvGeometry,
    padded_hw: tuple[int, int],
    *,
    data: bool,
) -> Derivatives:
    """Derivatives of ``conv_forward`` projected on ``dy``: (dxp on the padded grid of
    ``padded_hw`` if ``data``, df if ``xp`` is given). dxp is the transposed convolution of dy."""
    if g.rows_path(*padded_hw, dy.shape[3]):
        return rows_backward(xp, dy, f, g, padded_hw if data else None)
    n = dy.shape[3]
    kg = g.k // g.groups
    dt = dy.dtype
    dxp = None
    if data:
        dxp = np.zeros((*padded_hw, g.fc * g.groups, n), dtype=dt)
    df = None if xp is None else np.zeros((g.k, g.kd), dtype=dt)  # transposed, filled per group
    if g.direct(*padded_hw):
        for cs, ks in g.groups_slices():
            dyg = dy[0, 0, ks]
            if dxp is not None:
                dxp[:, :, cs] = gemm(f[:, :, :, ks].reshape(-1, kg), dyg).reshape(*padded_hw, g.fc, n)
            if df is not None:
                gemm(dyg, _direct_cols(xp, cs).T, out=df[ks])
    else:
        chunks, buf = g.row_chunks(n, dt)
        for rows in chunks:
            for cs, ks in g.groups_slices():
                dyg = np.ascontiguousarray(dy[rows, :, ks].transpose(2, 0, 1, 3)).reshape(kg, -1)
                if df is not None:
                    gemm(dyg, _im2col(xp, g, rows, cs, buf).T, out=df[ks], accumulate=True)
                if dxp is not None:
                    dcols = buf[: g.kd * dyg.shape[1]].reshape(g.kd, -1)
                    gemm(f[:, :, :, ks].reshape(-1, kg), dyg, out=dcols)
                    _col2im_add(dcols, g, rows, cs, dxp)
    if df is not None:
        df = np.ascontiguousarray(df.T).reshape(g.fh, g.fw, g.fc, g.k)
    return dxp, df
