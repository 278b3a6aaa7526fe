"""Spatial pooling (``vl_nnpool``): max and average, forward and backward.

MatConvNet's pooling windows are clipped to the real image: padding is never a value.
Max pooling therefore never picks a padded cell, and average pooling divides by the
number of real cells in the clipped window. The reference loops over the few pooling
taps only; every tap is one strided slice of the input against a sub-range of the
output grid, so the padded cells are simply never visited. The work is split along the
flattened channel-and-image axis among the cores, in cache-sized blocks when windows
overlap (harness.mcn.kernels.pool_blocks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.mcn.geometry import pool_output_size
from harness.mcn.kernels import jit, pool_loops
from harness.mcn.kernels.pool_blocks import run_blocks
from harness.mcn.options import McnError, as_4d, check_budget, float_dtype, pad4, pair

__all__ = ["vl_nnpool"]

_METHODS = ("max", "avg")

# One tap: its index in MATLAB column-major window order, and the (output, input)
# index tuples over which it reads real input cells.
_Tap = tuple[int, tuple[slice, slice], tuple[slice, slice]]


def _tap_range(n_in: int, n_out: int, pad_before: int, stride: int, offset: int) -> tuple[slice, slice]:
    """Outputs ``o`` whose window cell ``offset`` is the real cell ``o*stride - pad_before + offset``."""
    lo = max(0, -((offset - pad_before) // stride))  # ceil((pad_before - offset) / stride)
    hi = min(n_out, (n_in - 1 + pad_before - offset) // stride + 1)
    if hi <= lo:
        return slice(0, 0), slice(0, 0)
    start = lo * stride - pad_before + offset
    return slice(lo, hi), slice(start, start + (hi - lo - 1) * stride + 1, stride)


def _taps(shape: tuple[int, int], out: tuple[int, int], pool, stride, pad) -> list[_Tap]:
    """The pooling taps in MATLAB column-major order (rows fastest), as nnpooling.cpp scans a window."""
    (h, w), (ho, wo), (ph, pw), (sy, sx), (pt, _, pl, _) = shape, out, pool, stride, pad
    taps = []
    for b in range(pw):
        o_cols, i_cols = _tap_range(w, wo, pl, sx, b)
        for a in range(ph):
            o_rows, i_rows = _tap_range(h, ho, pt, sy, a)
            taps.append((b * ph + a, (o_rows, o_cols), (i_rows, i_cols)))
    # A tap that meets only padding reads nothing.
    return [t for t in taps if t[1][0].stop > t[1][0].start and t[1][1].stop > t[1][1].start]


def _clipped_counts(n_in: int, n_out: int, pad_before: int, stride: int, size: int) -> np.ndarray:
    """Number of real cells in each clipped window along one axis (nnpooling.cpp's y2 - y1)."""
    first = np.arange(n_out) * stride - pad_before
    return np.minimum(first + size, n_in) - np.maximum(first, 0)


def _max_forward(x: np.ndarray, y: np.ndarray, taps: list[_Tap]) -> None:
    # fmax from -inf, like acc_max's std::max(value, x), skips NaN inputs.
    y.fill(-np.inf)
    for _, o, i in taps:
        np.fmax(y[o], x[i], out=y[o])


def _max_backward(
    x: np.ndarray,
    dzdy: np.ndarray,
    dzdx: np.ndarray,
    best: np.ndarray,
    win: np.ndarray,
    hit: np.ndarray,
    taps: list[_Tap],
) -> None:
    # acc_max scans with a strict '>' from -inf: the derivative goes to the first cell equal
    # to the window maximum, and nowhere when that maximum is -inf. ``win`` holds each
    # output's winning tap as 1 + its position in ``taps`` (0: none): a later strict
    # improvement always has a larger number, so a maximum records it without a masked
    # store (masked numpy ops are slow on random masks).
    best.fill(-np.inf)
    win.fill(0)
    hit8 = hit.view(np.uint8)
    for t, (_, o, i) in enumerate(taps, 1):
        np.greater(x[i], best[o], out=hit[o])
        np.fmax(best[o], x[i], out=best[o])
        if win.dtype == np.uint8:
            np.multiply(hit8[o], np.uint8(t), out=hit8[o])
            np.maximum(win[o], hit8[o], out=win[o])
        else:  # 255 taps or more (a huge pool): the slow store
            np.copyto(win[o], t, where=hit[o])
    # dzdy * 0 is NaN where dzdy is not finite, where the C++ adds nothing: such blocks
    # (never in practice) select with the slow masked copy.
    finite = bool(np.isfinite(dzdy, out=hit).all())
    contrib = best  # reuse the buffer
    dzdx.fill(0)
    for t, (_, o, i) in reversed(list(enumerate(taps, 1))):
        np.equal(win[o], t, out=hit[o])
        if finite:
            np.multiply(dzdy[o], hit[o], out=contrib[o])
        else:
            contrib[o] = 0
            np.copyto(contrib[o], dzdy[o], where=hit[o])
        np.add(dzdx[i], contrib[o], out=dzdx[i])


def _avg_forward(
    x: np.ndarray, y: np.ndarray, taps: list[_Tap], scale: np.ndarray, table: np.ndarray | None
) -> None:
    # acc_sum: a running sum from 0 in column-major window order, then times 1/n.
    y.fill(0)
    if table is not None:  # the compiled loop (pool_loops), the same additions in one call
        pool_loops.add_taps(y, x, table, False)
    else:
        for _, o, i in taps:
            np.add(y[o], x[i], out=y[o])
    with np.errstate(invalid="ignore"):  # 0 * inf = NaN for an empty input, as in the C++
        y *= scale


def _avg_backward(
    dzdy: np.ndarray,
    dzdx: np.ndarray,
    g: np.ndarray,
    taps: list[_Tap],
    scale: np.ndarray,
    table: np.ndarray | None,
) -> None:
    np.multiply(dzdy, scale, out=g)
    dzdx.fill(0)
    if table is not None:
        pool_loops.add_taps(g, dzdx, table, True)
        return
    for _, o, i in reversed(taps):
        np.add(dzdx[i], g[o], out=dzdx[i])


def _options(x: Any, pool: Any, method: str, pad: Any, stride: Any):
    dt = float_dtype(x)
    x = as_4d(x)
    ph, pw = pair(pool, "pool")
    sy, sx = pair(stride, "stride")
    pt, pb, pl, pr = pad4(pad, "pad")
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise McnError(f"Expected method to be one of {list(_METHODS)}. Received method={method!r}")
    out = pool_output_size(x.shape, (ph, pw), (pt, pb, pl, pr), (sy, sx))[:2]
    # the output, and a window of ph * pw cells read for each of its elements
    check_budget(dt.itemsize * out[0] * out[1] * x.shape[2] * x.shape[3], f"pool={[ph, pw]}: the output")
    check_budget(
        dt.itemsize * ph * pw * out[0] * out[1],
        f"pool={[ph, pw]} with pad={[pt, pb, pl, pr]}: the window taps",
    )
    return x, dt, (ph, pw), (sy, sx), (pt, pb, pl, pr), method.lower(), out


def vl_nnpool(
    x: np.ndarray,
    pool: Any,
    dzdy: np.ndarray | None = None,
    *,
    method: str = "max",
    pad: Any = 0,
    stride: Any = 1,
) -> np.ndarray:
    """Max or average pooling; mirrors matlab/vl_nnpool.m and src/bits/nnpooling.cpp (CPU).

    ``y = vl_nnpool(x, pool, method=, pad=, stride=)`` and
    ``dzdx = vl_nnpool(x, pool, dzdy, ...)``. ``pool`` is ``PH`` or ``[PH PW]``, ``pad``
    ``[TOP BOTTOM LEFT RIGHT]`` (each smaller than the pool size on its axis), ``stride``
    ``[SY SX]``. Output size ``floor((H + PT + PB - PH) / SY) + 1`` (likewise for W).

    Each window is clipped to the real image. ``max``: ``y`` is the window maximum and the
    backward pass gives the whole derivative to the first strict maximum met scanning the
    window in column-major order. ``avg``: ``y = sum * (1 / n)`` with ``n`` the number of
    real cells, summed in column-major window order in the precision of ``x``; the
    backward pass spreads ``dzdy * (1 / n)`` over the same cells.
    """
    x, dt, pool_hw, stride_yx, pad_tblr, method, out = _options(x, pool, method, pad, stride)
    out_shape = out + x.shape[2:]
    taps = _taps(x.shape[:2], out, pool_hw, stride_yx, pad_tblr)
    scale = table = None
    if method == "avg":
        # the taps as the compiled loop reads them, once for every block (None: numpy's loop)
        table = pool_loops.tap_table(taps) if jit.available() else None
        counts = np.multiply.outer(
            _clipped_counts(x.shape[0], out[0], pad_tblr[0], stride_yx[0], pool_hw[0]),
            _clipped_counts(x.shape[1], out[1], pad_tblr[2], stride_yx[1], pool_hw[1]),
        )
        with np.errstate(divide="ignore"):  # only an empty input has windows without real cells
            scale = (dt.type(1) / counts.astype(dt))[:, :, None]

    # Reverse tap order in the backward kernels adds each input cell's contributions in the
    # order of nnpooling.cpp's output loop (later outputs reach a cell through earlier taps),
    # so float32 sums agree bit for bit.
    overlap = pool_hw[0] > stride_yx[0] or pool_hw[1] > stride_yx[1]
    cn = x.shape[2] * x.shape[3]
    x3 = np.ascontiguousarray(x).reshape(x.shape[:2] + (cn,))
    if dzdy is None:
        y = np.empty(out_shape, dt)
        y3 = y.reshape(out + (cn,))
        if method == "max":
            run_blocks(lambda x_, y_: _max_forward(x_, y_, taps), (x3,), (y3,), (), overlap=overlap)
        else:
            run_blocks(
                lambda x_, y_: _avg_forward(x_, y_, taps, scale, table), (x3,), (y3,), (), overlap=overlap
            )
        return y

    dzdy = as_4d(dzdy, "dzdy", dtype=dt)
    if dzdy.shape != out_shape:
        raise McnError(
            f"Expected dzdy to have the output shape {out_shape}. Received dzdy.shape={dzdy.shape}"
        )
    dzdy3 = np.ascontiguousarray(dzdy).reshape(out + (cn,))
    dzdx = np.empty(x.shape, dt)
    dzdx3 = dzdx.reshape(x3.shape)
    if method == "max":
        win_dt = np.dtype(np.uint8 if len(taps) < 256 else np.uint32)
        scratch = ((out, dt), (out, win_dt), (out, np.dtype(bool)))
        run_blocks(lambda *a: _max_backward(*a, taps), (x3, dzdy3), (dzdx3,), scratch, overlap=overlap)
    else:
        run_blocks(
            lambda g_, d_, s_: _avg_backward(g_, d_, s_, taps, scale, table),
            (dzdy3,),
            (dzdx3,),
            ((out, dt),),
            overlap=overlap,
        )
    return dzdx
