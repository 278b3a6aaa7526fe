"""Convolution and transposed convolution: ``vl_nnconv`` and ``vl_nnconvt``.

This file owns MatConvNet's two BLAS-backed linear layers, forward and backward, and
their argument checks. Arrays are ``H x W x C x N``, images last, and every product
goes through scipy's BLAS (``_mm``). Two ways to the same sums:

- Column matrix (any geometry). The column matrix of a filter group is
  ``(FH*FW*FC) x (Ho*Wo*N)`` with rows ordered ``(fh, fw, c)``, the row order of the
  C-order reshape ``F.reshape(-1, K)`` of an ``FH x FW x FC x K`` filter bank, so each
  product is one BLAS call, ``F.reshape(-1, K).T @ cols`` giving ``K x (Ho*Wo*N)``;
  with the images last every copy moves runs of N numbers. Output rows are processed in
  chunks so that the column buffer stays near ``_CHUNK_BYTES``. When the one window
  covers the whole unpadded input (MatConvNet's "fully connected" mode, 1x1 convolutions
  on 1x1 inputs) the input itself is the column matrix.
- Row GEMMs (column stride 1, one group, deep and wide enough: ``_Geom.rows_path``).
  The data is transposed once to ``H x W x N x C``; then the pixels of an output row and
  those a filter tap reads for it are each one contiguous ``(Wo*N) x C`` matrix, and the
  layer is one BLAS product per output row and tap, accumulated in place, with no
  column matrix (which would copy the input FH*FW times).

``vl_nnconvt`` is built from the same kernels, exactly as MatConvNet builds it
(src/bits/nnconv.cu, ConvolutionTranspose*): its forward pass is the data derivative of a
convolution with stride ``upsample`` and padding ``crop``, and its data derivative is that
convolution's forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import blas

from harness.mcn.options import McnError, as_4d, check_budget, float_dtype, is_empty, pad4, pair
from harness.mcn.pool import _PARALLEL_MIN, _cores, _map  # the shared worker threads

__all__ = ["vl_nnconv", "vl_nnconvt"]

# Upper bound on the buffer of one chunk of output rows: the column matrix (one filter
# group), or the row-GEMM outputs.
_CHUNK_BYTES = 16 * 2**20
# The row-GEMM path (see _rows_forward) takes over when its products are big enough:
# they contract over the channels of one tap (thin ones waste the BLAS), there is one per
# output row and tap (each pays for waking the BLAS threads), and one row is Wo*N pixels.
_ROWS_MIN_DEPTH = 16
_ROWS_MIN_PIXELS = 4096


@dataclass(frozen=True)
class _Geom:
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
        """Chunks of output rows whose column matrix fits in ``_CHUNK_BYTES``, and a buffer
        for one chunk's columns."""
        step = min(self.ho, max(1, _CHUNK_BYTES // max(1, self.kd * self.wo * n * np.dtype(dtype).itemsize)))
        chunks = [slice(h0, min(h0 + step, self.ho)) for h0 in range(0, self.ho, step)]
        return chunks, np.empty(self.kd * step * self.wo * n, dtype=dtype)

    def rows_path(self, hp: int, wp: int, n: int) -> bool:
        """Whether the row-GEMM path applies (unit column stride, one group) and pays, for ``n`` images."""
        big = min(self.fc, self.k) >= _ROWS_MIN_DEPTH and self.wo * n >= _ROWS_MIN_PIXELS
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


def _pad(x: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    if pad == (0, 0, 0, 0):
        return x
    pt, pb, pl, pr = pad
    h, w, c, n = x.shape
    xp = np.zeros((h + pt + pb, w + pl + pr, c, n), dtype=x.dtype)
    xp[pt : pt + h, pl : pl + w] = x
    return xp


def _unpad(xp: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    if pad == (0, 0, 0, 0):
        return xp
    pt, pb, pl, pr = pad
    return np.ascontiguousarray(xp[pt : xp.shape[0] - pb, pl : xp.shape[1] - pr])


def _im2col(xp: np.ndarray, g: _Geom, rows: slice, cs: slice, buf: np.ndarray) -> np.ndarray:
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


def _col2im_add(dcols: np.ndarray, g: _Geom, rows: slice, cs: slice, dxp: np.ndarray) -> None:
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

    parts = min(_cores(), a.shape[0]) if a.size >= _PARALLEL_MIN else 1
    _map(part, [slice(a.shape[0] * q // parts, a.shape[0] * (q + 1) // parts) for q in range(parts)])
    return out


def _mm(
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
        prod = _mm(a, b)
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
    gemm = blas.sgemm if a.dtype == np.float32 else blas.dgemm
    res = gemm(1.0, bt, at, beta=float(accumulate), c=out.T, trans_a=trans_b, trans_b=trans_a, overwrite_c=1)
    if res.ctypes.data != out.ctypes.data:  # f2py copied ``c`` after all: keep its result
        out[...] = res.T
    return out


# The row-GEMM path. With the images moved next to the channels (H x W x N x C), the
# pixels of one output row and the pixels a filter tap reads for it are each one
# contiguous (Wo*N) x C matrix, so each (output row, tap) pair is one BLAS product with
# no column matrix at all; the products of one row accumulate in place (beta = 1).


def _row_chunks(g: _Geom, n: int, dt: np.dtype) -> tuple[list[slice], np.ndarray]:
    """Chunks of output rows whose ``(rows, Wo, N, K)`` outputs fit in ``_CHUNK_BYTES``, and a
    buffer for one chunk: the products land in a cached buffer, which is then transposed
    into place, instead of in a layer-sized temporary."""
    step = min(g.ho, max(1, _CHUNK_BYTES // (g.wo * n * g.k * np.dtype(dt).itemsize)))
    return [slice(r, min(r + step, g.ho)) for r in range(0, g.ho, step)], np.empty((step, g.wo, n, g.k), dt)


def _rows_forward(xp: np.ndarray, f: np.ndarray, g: _Geom, bias: np.ndarray | None) -> np.ndarray:
    """``_conv_forward`` for ``g.rows_path``: Y[oy] (Wo*N x K) = sum_ij X_ij[oy] (Wo*N x C) F[i, j]."""
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
                _mm(x_tap, f[i, j], out=y_row, accumulate=t > 0)
        _swap_last(yt[: rows.stop - rows.start], bias, out=y[rows])
    return y


def _rows_backward(
    xp: np.ndarray | None,
    dy: np.ndarray,
    f: np.ndarray,
    g: _Geom,
    padded_hw: tuple[int, int],
    *,
    data: bool,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``_conv_backward`` for ``g.rows_path``: dX_ij[oy] += dY[oy] F[i, j]^T and
    dF[i, j] += X_ij[oy]^T dY[oy], per output row ``oy`` and tap ``(i, j)``."""
    n, dt = dy.shape[3], dy.dtype
    (sy, _), (ddy, ddx) = g.stride, g.dilate
    xt = None if xp is None else _swap_last(xp)
    dxt = np.zeros((*padded_hw, n, g.fc), dt) if data else None
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
                    _mm(x_tap.T, dy_row, out=df[i, j], accumulate=oy > 0)
                if dxt is not None:
                    dx_tap = dxt[ys, xs].reshape(m, g.fc)
                    _mm(dy_row, f[i, j].T, out=dx_tap, accumulate=True)
    return (None if dxt is None else _swap_last(dxt)), df


def _conv_forward(xp: np.ndarray, f: np.ndarray, g: _Geom, bias: np.ndarray | None) -> np.ndarray:
    """y[oy, ox, k, n] = b[k] + sum_{i,j,c} xp[oy*sy + i*dy, ox*sx + j*dx, g*FC + c, n] f[i, j, c, k]."""
    if g.rows_path(*xp.shape[:2], xp.shape[3]):
        return _rows_forward(xp, f, g, bias)
    n = xp.shape[3]
    y = np.empty((g.ho, g.wo, g.k, n), dtype=xp.dtype)
    kg = g.k // g.groups
    if g.direct(*xp.shape[:2]):
        for cs, ks in g.groups_slices():
            _mm(f[:, :, :, ks].reshape(-1, kg).T, _direct_cols(xp, cs), out=y[0, 0, ks])
        if bias is not None:
            y += bias.reshape(-1, 1)
        return y
    chunks, buf = g.row_chunks(n, xp.dtype)
    for rows in chunks:
        for cs, ks in g.groups_slices():
            prod = _mm(f[:, :, :, ks].reshape(-1, kg).T, _im2col(xp, g, rows, cs, buf))
            prod = prod.reshape(kg, rows.stop - rows.start, g.wo, n).transpose(1, 2, 0, 3)
            if bias is None:
                y[rows, :, ks] = prod
            else:  # the bias rides along with the copy into y
                np.add(prod, bias[ks, None], out=y[rows, :, ks])
    return y


def _conv_backward(
    xp: np.ndarray | None,
    dy: np.ndarray,
    f: np.ndarray,
    g: _Geom,
    padded_hw: tuple[int, int],
    *,
    data: bool,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Derivatives of ``_conv_forward`` projected on ``dy``: (dxp on the padded grid if
    ``data``, df if ``xp`` is given). dxp is the transposed convolution of dy."""
    if g.rows_path(*padded_hw, dy.shape[3]):
        return _rows_backward(xp, dy, f, g, padded_hw, data=data)
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
                dxp[:, :, cs] = _mm(f[:, :, :, ks].reshape(-1, kg), dyg).reshape(*padded_hw, g.fc, n)
            if df is not None:
                _mm(dyg, _direct_cols(xp, cs).T, out=df[ks])
    else:
        chunks, buf = g.row_chunks(n, dt)
        for rows in chunks:
            for cs, ks in g.groups_slices():
                dyg = np.ascontiguousarray(dy[rows, :, ks].transpose(2, 0, 1, 3)).reshape(kg, -1)
                if df is not None:
                    _mm(dyg, _im2col(xp, g, rows, cs, buf).T, out=df[ks], accumulate=True)
                if dxp is not None:
                    dcols = buf[: g.kd * dyg.shape[1]].reshape(g.kd, -1)
                    _mm(f[:, :, :, ks].reshape(-1, kg), dyg, out=dcols)
                    _col2im_add(dcols, g, rows, cs, dxp)
    if df is not None:
        df = np.ascontiguousarray(df.T).reshape(g.fh, g.fw, g.fc, g.k)
    return dxp, df


# ----------------------------------------------------------------------------------------
#                                                                       argument checks


def _check_dtype(a: np.ndarray, name: str, dt: np.dtype) -> None:
    if a.dtype != dt:
        raise McnError(f"Expected {name} to have the dtype of x ({dt}). Received {name}.dtype={a.dtype}")


def _bias(b: Any, k: int, dt: np.dtype, what: str) -> np.ndarray | None:
    """Flattened bias vector (any shape with K elements, as MatConvNet accepts), or None."""
    if is_empty(b):
        return None
    b = np.asarray(b)
    _check_dtype(b, "b", dt)
    if b.size != k:
        raise McnError(f"Expected b to have {k} elements ({what}). Received b.shape={b.shape}")
    return b.reshape(-1)


def _dzdy(dzdy: Any, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
    d = as_4d(dzdy, "dzdy")
    _check_dtype(d, "dzdy", dt)
    if d.shape != shape:
        raise McnError(f"Expected dzdy to have the output shape {shape}. Received dzdy.shape={d.shape}")
    return d


def _empty(dt: np.dtype) -> np.ndarray:
    # MATLAB's [] of the data class: what MatConvNet returns for an absent derivative.
    return np.zeros((0, 0), dtype=dt)


def _dzdb(dzdy: np.ndarray, b: Any, bvec: np.ndarray | None) -> np.ndarray:
    """Bias derivative: dzdy summed over pixels and images, in the shape b was given."""
    if bvec is None:
        return _empty(dzdy.dtype)
    # Images first: a pairwise sum along the contiguous axis, then pixels in float64.
    per_pixel = dzdy.sum(axis=3)
    return per_pixel.sum(axis=(0, 1), dtype=np.float64).astype(dzdy.dtype).reshape(np.shape(b))


# ----------------------------------------------------------------------------------------
#                                                                             vl_nnconv


def vl_nnconv(
    x: np.ndarray,
    f: np.ndarray | None,
    b: np.ndarray | None,
    dzdy: np.ndarray | None = None,
    *,
    pad: Any = 0,
    stride: Any = 1,
    dilate: Any = 1,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirrors matlab/vl_nnconv.m (src/vl_nnconv.cu, src/bits/nnconv.cu, nnsubsample.cu).

    Cross-correlation with zero padding ``pad = [T B L R]``, ``stride = [SY SX]``,
    ``dilate = [DY DX]`` and implicit filter groups G = C / FC (group g reads channels
    ``g*FC:(g+1)*FC`` and writes filters ``g*K/G:(g+1)*K/G``)::

        y[oy, ox, k, n] = b[k] + sum_{i, j, c} xpad[oy*SY + i*DY, ox*SX + j*DX, g*FC + c, n] f[i, j, c, k]

    with ``Ho = floor((H + T + B - (FH-1)*DY - 1) / SY) + 1``. ``f`` empty means no
    filtering: ``y = xpad[::SY, ::SX] + b`` (MatConvNet's Subsample, padding included).
    Backward returns ``(dzdx, dzdf, dzdb)``; ``dzdf`` and ``dzdb`` are summed over the
    batch, have the shapes of ``f`` and ``b``, and are empty when ``f`` or ``b`` is.
    """
    x = as_4d(x, "x")
    dt = float_dtype(x, "x")
    h, w, c, n = x.shape
    pad_ = pad4(pad, "pad")
    stride_ = pair(stride, "stride")
    dilate_ = pair(dilate, "dilate")
    pt, pb, pl, pr = pad_

    if is_empty(f):
        if dilate_ != (1, 1):
            raise McnError(f"Expected dilate=1 when f is empty (no filters). Received dilate={dilate!r}")
        return _subsample(x, b, dzdy, pad_, stride_, dt)

    f = as_4d(f, "f")
    _check_dtype(f, "f", dt)
    fh, fw, fc, k = f.shape
    if c % fc != 0:
        raise McnError(
            f"Expected the filter depth f.shape[2] to divide the depth of x ({c}). Received f.shape={f.shape}"
        )
    groups = c // fc
    if k % groups != 0:
        raise McnError(
            f"Expected the number of filter groups ({groups} = {c} channels / depth {fc}) to divide the "
            f"number of filters f.shape[3]. Received f.shape={f.shape}"
        )
    ext_h, ext_w = (fh - 1) * dilate_[0] + 1, (fw - 1) * dilate_[1] + 1
    if h + pt + pb < ext_h or w + pl + pr < ext_w:
        raise McnError(
            f"Expected the (dilated) filter ({ext_h} x {ext_w}) to fit in the padded input "
            f"({h + pt + pb} x {w + pl + pr}). Received f.shape={f.shape}, x.shape={x.shape}, pad={pad!r}, "
            f"dilate={dilate!r}"
        )
    ho, wo = (h + pt + pb - ext_h) // stride_[0] + 1, (w + pl + pr - ext_w) // stride_[1] + 1
    padded = (h + pt + pb) * (w + pl + pr) * c * n
    check_budget(
        dt.itemsize * (padded + ho * wo * k * n) * (1 if dzdy is None else 2),
        f"conv with pad={list(pad_)}, stride={list(stride_)}: the padded input and the output",
    )
    g = _Geom(fh, fw, fc, k, pad_, stride_, dilate_, groups, ho, wo)
    bvec = _bias(b, k, dt, "one per filter")

    xp = _pad(x, pad_)
    if dzdy is None:
        return _conv_forward(xp, f, g, bvec)
    dzdy = _dzdy(dzdy, (ho, wo, k, n), dt)
    dxp, dzdf = _conv_backward(xp, dzdy, f, g, xp.shape[:2], data=True)
    return _unpad(dxp, pad_), dzdf, _dzdb(dzdy, b, bvec)


def _subsample(
    x: np.ndarray,
    b: Any,
    dzdy: Any,
    pad: tuple[int, int, int, int],
    stride: tuple[int, int],
    dt: np.dtype,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vl_nnconv with ``f = []`` (src/bits/nnsubsample.cu): pad with zeros, keep every stride-th
    pixel starting at the top-left padded corner, add the bias (one per channel)."""
    h, w, c, n = x.shape
    pt, pb, pl, pr = pad
    sy, sx = stride
    ho, wo = (h + pt + pb - 1) // sy + 1, (w + pl + pr - 1) // sx + 1
    check_budget(dt.itemsize * ho * wo * c * n, f"conv (no filters) with pad={list(pad)}: the output")
    bvec = _bias(b, c, dt, "one per input channel, as f is empty")
    # Output pixel (oy, ox) reads input row oy*sy - pt, column ox*sx - pl, when inside the image.
    oy0, ox0 = -(-pt // sy), -(-pl // sx)
    iy0, ix0 = oy0 * sy - pt, ox0 * sx - pl
    ny, nx = len(range(iy0, h, sy)), len(range(ix0, w, sx))
    inner = (slice(oy0, oy0 + ny), slice(ox0, ox0 + nx))
    src = (slice(iy0, h, sy), slice(ix0, w, sx))
    if dzdy is None:
        y = np.zeros((ho, wo, c, n), dtype=dt)
        y[inner] = x[src]
        if bvec is not None:
            y += bvec.reshape(-1, 1)
        return y
    d = _dzdy(dzdy, (ho, wo, c, n), dt)
    dzdx = np.zeros_like(x)
    dzdx[src] = d[inner]
    dzdb = _dzdb(d, b, bvec)
    return dzdx, _empty(dt), dzdb


# ----------------------------------------------------------------------------------------
#                                                                            vl_nnconvt


def vl_nnconvt(
    x: np.ndarray,
    f: np.ndarray,
    b: np.ndarray | None,
    dzdy: np.ndarray | None = None,
    *,
    upsample: Any = 1,
    crop: Any = 0,
    num_groups: Any = 1,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirrors matlab/vl_nnconvt.m (src/vl_nnconvt.cu, ConvolutionTranspose in src/bits/nnconv.cu).

    Filters are ``FH x FW x K x D`` with D the depth of ``x``; ``num_groups`` G divides D,
    and group g maps input channels ``g*D/G:(g+1)*D/G`` to outputs ``g*K:(g+1)*K``. The
    result is the adjoint of ``vl_nnconv(., f, [], 'stride', upsample, 'pad', crop)``::

        y[oy*UY + i - CT, ox*UX + j - CL, g*K + k, n] += x[oy, ox, d, n] f[i, j, k, d]   (+ b)

    of size ``(H-1)*UY - CT - CB + FH`` by ``(W-1)*UX - CL - CR + FW`` by ``K*G``.
    Backward returns ``(dzdx, dzdf, dzdb)`` with ``dzdf`` and ``dzdb`` summed over the batch.
    """
    x = as_4d(x, "x")
    dt = float_dtype(x, "x")
    h, w, d, n = x.shape
    up = pair(upsample, "upsample")
    crop_ = pad4(crop, "crop")
    if np.size(num_groups) != 1:
        raise McnError(f"Expected num_groups to be a positive integer. Received num_groups={num_groups!r}")
    groups = pair(num_groups, "num_groups")[0]
    ct, cb, cl, cr = crop_
    if is_empty(f):
        raise McnError(f"Expected f to be a non-empty FH x FW x K x D filter bank. Received f={f!r}")
    f = as_4d(f, "f")
    _check_dtype(f, "f", dt)
    fh, fw, k, fd = f.shape
    if fd % groups != 0:
        raise McnError(
            f"Expected num_groups to divide the filter bank depth f.shape[3] ({fd}). "
            f"Received num_groups={num_groups!r}"
        )
    if fd != d:
        raise McnError(f"Expected f.shape[3] to equal the depth of x ({d}). Received f.shape={f.shape}")
    hy, wy = (h - 1) * up[0] - ct - cb + fh, (w - 1) * up[1] - cl - cr + fw
    if hy < 1 or wy < 1:
        raise McnError(f"Expected crop to leave a non-empty output. Received crop={crop!r}")
    ky = k * groups
    check_budget(
        dt.itemsize * (hy + ct + cb) * (wy + cl + cr) * ky * n * (1 if dzdy is None else 2),
        f"convt with upsample={list(up)}, crop={list(crop_)}: the output",
    )
    bvec = _bias(b, ky, dt, "K * num_groups, one per output channel")
    # The equivalent forward convolution maps the K*G-channel output back to x: stride
    # upsample, padding crop, implicit groups G, filters of depth K.
    g = _Geom(fh, fw, k, d, crop_, up, (1, 1), groups, h, w)
    padded_hw = (hy + ct + cb, wy + cl + cr)

    if dzdy is None:
        y = _unpad(_conv_backward(None, x, f, g, padded_hw, data=True)[0], crop_)
        if bvec is not None:
            y += bvec.reshape(-1, 1)
        return y
    dzdy = _dzdy(dzdy, (hy, wy, ky, n), dt)
    dyp = _pad(dzdy, crop_)
    dzdx = _conv_forward(dyp, f, g, None)
    dzdf = _conv_backward(dyp, x, f, g, padded_hw, data=False)[1]
    return dzdx, dzdf, _dzdb(dzdy, b, bvec)
