"""The tap-product path of harness.mcn.kernels.conv_gemm: column stride 1, inputs FC deep
or more (``ConvGeometry.rows_path``).

The input is copied, padded, to a pixel-major layout: per filter group a ``(pixels*N) x
FC`` matrix whose row ``(y*W' + x)*N + n`` holds pixel (y, x) of image n on a grid W'
pixels wide. Each block of output rows copies the grid rows it reads (its rows and the
filter's reach, ``_Grid``) into its thread's buffer just before its products, which then
find them in cache (``_to_grid`` copies the whole grid, for the one path that reads it
in another order). The pixels that filter tap (i, j) reads for a run of
output pixels are then one contiguous block of rows, the run shifted by
``i*DY*W' + j*DX`` pixels, and the layer is a sum over taps of ``(rows x FC) @ (FC x K/G)``
products accumulated in place, with no column matrix (which copies the input FH*FW
times). At row stride 1 the output is computed on the same W'-wide grid, the ``W' - Wo``
extra pixels of each row computed and dropped, so that a block of output rows is one
product per tap; otherwise (or when the extra pixels would be many) one product per
output row and tap. The data derivative at stride 1 is the same sum over the output
derivative padded by the dilated filter extent (minus the padding), with the filters
turned by 180 degrees and transposed (when that padded grid is not much wider than the
input); otherwise each input row gathers the output rows and taps that reach it. The
filter derivative is, per tap, the shifted input block transposed times the derivative
block, summed over parts of the rows whose partial sums are added in a fixed order.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from harness.mcn.kernels import conv_gemm, threads
from harness.mcn.kernels.blas import RowProducts

if TYPE_CHECKING:
    from harness.mcn.kernels.conv_gemm import Alloc, ConvGeometry, Derivatives

__all__ = ["rows_backward", "rows_forward"]

Task = Callable[[int], None]  # called with the index of the worker thread running it


def _to_grid(
    a: np.ndarray, pads: tuple[int, int, int, int], groups: int, slack: int, alloc: Alloc
) -> tuple[np.ndarray, int, int]:
    """``a`` (H x W x C x N) zero-padded by ``pads`` = (top, bottom, left, right) (a negative
    pad crops) in the pixel-major layout: ``(G, (H'*W' + slack)*N, C/G)`` where row
    ``(y*W' + x)*N + n`` of group q holds ``a_padded[y, x, q*C/G:(q+1)*C/G, n]``, followed by
    ``slack`` pixels of zeros (which the last row's shifted blocks may read). Returns the
    array, H' and W'. The copy turns each pixel's C x N block around: on large inputs it is
    shared among the cores by rows (threads.split_rows)."""
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
    dst = grid[:, y0:y1, x0:x1]
    threads.split_rows(lambda rows: np.copyto(dst[:, rows], src[:, rows]), y1 - y0, src.size)
    return flat, hg, wg


def _grid_rows(
    a: np.ndarray, pads: tuple[int, int, int, int], q: int, groups: int, y0: int, count: int, out: np.ndarray
) -> None:
    """Rows ``y0 .. y0+count-1`` of group ``q`` of ``_to_grid``'s padded grid (``a`` padded by
    ``pads``, a negative pad cropping), written over ``out[:count*W'*N]`` (``out`` a
    ``(rows, C/G)`` buffer), zeros included."""
    h, w, c, n = a.shape
    t, _, left, r = pads
    wg, cg = w + left + r, c // groups
    g = out[: count * wg * n].reshape(count, wg, n, cg)
    x0, x1 = max(left, 0), wg - max(r, 0)
    iy0, iy1 = max(y0 - t, 0), min(y0 + count - t, h)  # the input rows these grid rows hold
    r0, r1 = (iy0 + t - y0, iy1 + t - y0) if iy1 > iy0 else (count, count)
    g[:r0] = 0
    g[r1:] = 0
    g[r0:r1, :x0] = 0
    g[r0:r1, x1:] = 0
    if r1 > r0:
        src = a[iy0:iy1, max(-left, 0) : w - max(-r, 0), q * cg : (q + 1) * cg]
        np.copyto(g[r0:r1, x0:x1], src.transpose(0, 1, 3, 2))


class _Grid:
    """``a`` (H x W x C x N) zero-padded by ``pads`` on the pixel-major grid of ``_to_grid``,
    copied block by block: ``block(q, y0, count, worker)`` gives grid rows ``y0 ..
    y0+count-1`` of group q, followed by ``slack`` pixels of zeros, as a C-contiguous
    ``(pixels*N) x FC`` matrix in the worker's own buffer (valid until its next call)."""

    def __init__(self, a: np.ndarray, pads: tuple[int, int, int, int], groups: int, slack: int):
        h, w, c, n = a.shape
        self.a, self.pads, self.groups, self.slack, self.n = a, pads, groups, slack, n
        self.hg, self.wg, self.cg = h + pads[0] + pads[1], w + pads[2] + pads[3], c // groups
        self._bufs: dict[int, np.ndarray] = {}

    def block(self, q: int, y0: int, count: int, worker: int) -> np.ndarray:
        rows = (count * self.wg + self.slack) * self.n
        buf = self._bufs.get(worker)
        if buf is None or buf.shape[0] < rows:
            buf = self._bufs[worker] = np.empty((rows, self.cg), self.a.dtype)
        out = buf[:rows]
        _grid_rows(self.a, self.pads, q, self.groups, y0, count, out)
        out[count * self.wg * self.n :] = 0
        return out


def _taps_pass(
    src: _Grid,
    wt: np.ndarray,
    sy: int,
    offsets: list[int],
    reach: int,
    out_hw: tuple[int, int],
    epilogue: Callable[[int, slice, np.ndarray], None],
) -> list[Task]:
    """The tasks of the sum over taps on the pixel-major grid ``src`` (``src.wg`` pixels wide),
    for each group q and output pixel (oy, ox) below ``out_hw``::

        out[oy, ox] = sum_t src[q, pixel oy*sy*src.wg + ox + offsets[t]] @ wt[q, t]

    in blocks of output rows, each reading the ``(rows - 1)*sy + reach`` grid rows from its
    first one's ``oy*sy`` (``reach``: the filter's extent in rows); ``epilogue(q, rows,
    block)`` receives each block as a ``(rows, src.wg, N, cout)`` array whose first
    ``out_hw[1]`` columns hold the sums."""
    groups, _, _, cout = wt.shape
    out_h, out_w = out_hw
    n, src_w = src.n, src.wg
    row = src_w * n  # matrix rows per output row
    blocks = conv_gemm.row_blocks(out_h, row * cout * src.a.itemsize)
    step = blocks[0].stop - blocks[0].start
    # One product per tap for a whole block: at row stride 1, output pixel q*... of the
    # src_w-wide grid reads src pixel (its index + offset); the extra columns are dropped.
    whole = sy == 1 and step > 1 and src_w - out_w <= conv_gemm.FLAT_MAX_WASTE * src_w
    scratch = conv_gemm.Scratch(step * row * cout, src.a.dtype)

    def task(q: int, rows: slice, worker: int) -> None:
        r = rows.stop - rows.start
        a = src.block(q, rows.start * sy, (r - 1) * sy + reach, worker)
        buf = scratch.get(worker)[: r * row * cout].reshape(r * row, cout)
        mm, w = RowProducts(src.a.dtype), [wt[q, k] for k in range(len(offsets))]
        if whole:
            for k, off in enumerate(offsets):
                mm.nn(a, off * n, w[k], buf, 0, r * row, float(k > 0))
        else:
            for i in range(r):
                for k, off in enumerate(offsets):
                    mm.nn(a, i * sy * row + off * n, w[k], buf, i * row, out_w * n, float(k > 0))
        epilogue(q, rows, buf.reshape(r, src_w, n, cout))

    return [partial(task, q, rows) for q in range(groups) for rows in blocks]


def _taps_filter_grad(
    xs: _Grid,
    dys: _Grid,
    sy: int,
    offsets: list[int],
    reach: int,
    out_hw: tuple[int, int],
) -> tuple[list[Task], Callable[[], np.ndarray]]:
    """The tasks of, per group q and tap t::

        sum_(oy, ox) xs[q, pixel oy*sy*xs.wg + ox + offsets[t]]^T dys[q, pixel oy*dys.wg + ox]

    and the function that returns the sums, ``(G, T, cin, cout)``, once they have run. Each
    block of output rows copies the grid rows it reads (``reach``: the filter's extent in
    rows). When the grids have the same width, ``dys`` zero outside the output columns,
    and the row stride is 1, a run of output rows is one product per tap. The output rows
    are cut into parts, each with its own partial sums, added in order at the end."""
    groups, cin, cout, n = xs.groups, xs.cg, dys.cg, xs.n
    ho, wo = out_hw
    xs_w, dys_w = xs.wg, dys.wg
    whole = sy == 1 and xs_w == dys_w
    taps = len(offsets)
    blocks = conv_gemm.row_blocks(ho, xs_w * n * (cin + cout) * xs.a.itemsize)
    parts = [
        blocks[p.start : p.stop]
        for p in conv_gemm.filter_parts(len(blocks), groups * taps * cin * cout * xs.a.itemsize)
    ]
    # Each task runs its taps over the blocks of its part in order, a block's rows staying
    # in cache from one tap to the next; the taps are shared out when the parts are few.
    tap_sets = conv_gemm.split_evenly(taps, -(-2 * conv_gemm.MIN_BLOCKS // (len(parts) * groups)))
    sums = np.empty((len(parts), groups, taps, cin, cout), xs.a.dtype)

    def task(p: int, q: int, ks: slice, worker: int) -> None:
        mm = RowProducts(xs.a.dtype)
        for b, rows in enumerate(parts[p]):
            r = rows.stop - rows.start
            a = xs.block(q, rows.start * sy, (r - 1) * sy + reach, worker)
            d = dys.block(q, rows.start, r, worker)
            for k in range(ks.start, ks.stop):
                off, out = offsets[k] * n, sums[p, q, k]
                if whole:
                    mm.tn(a, off, d, 0, r * xs_w * n, out, float(b > 0))
                    continue
                for i in range(r):
                    mm.tn(a, i * sy * xs_w * n + off, d, i * dys_w * n, wo * n, out, float(b > 0 or i > 0))

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
    blocks = conv_gemm.row_blocks(h, row * g.fc * dx.itemsize)
    step = blocks[0].stop - blocks[0].start
    scratch = conv_gemm.Scratch(step * row * g.fc, dx.dtype)

    def task(q: int, rows: slice, worker: int) -> None:
        r = rows.stop - rows.start
        buf = scratch.get(worker)[: r * row * g.fc].reshape(r * row, g.fc)
        buf.fill(0)
        mm, d, taps = RowProducts(dx.dtype), dys[q], [wt[q, k] for k in range(g.fh * g.fw)]
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

    with threads.blas_single_threaded() as single:
        xs = _Grid(x, g.pad, g.groups, g.extent[1] - 1)
        offsets = [i * ddy * xs.wg + j * ddx for i, j in g.taps()]
        wt = _tap_filters(f, g, transposed=False)
        _run(
            _taps_pass(xs, wt, sy, offsets, g.extent[0], (g.ho, g.wo), epilogue),
            conv_gemm.workers(g.macs(n), single),
        )
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
    dx = finish = None
    tasks: list[Task] = []
    if data:
        dx = np.empty((*in_hw, g.fc * g.groups, n), dt)
    # dX as one correlation (below) at row stride 1 when its grid wastes little; else row
    # by row. dF in runs of whole rows when the input grid wastes little; else row by row.
    turned = data and sy == 1 and ew - 1 <= conv_gemm.FLAT_MAX_WASTE * (in_hw[1] + ew - 1)
    whole_df = x is not None and sy == 1 and wp - g.wo <= conv_gemm.FLAT_MAX_WASTE * wp
    with conv_gemm.workspace() as alloc, threads.blas_single_threaded() as single:
        if turned:
            # dX = the correlation of dY, padded by the filter's reach minus the padding,
            # with the filters turned by 180 degrees and transposed (K/G x FC per tap).
            pads = (eh - 1 - pt, eh - 1 - pb, ew - 1 - pl, ew - 1 - pr)
            dyp = _Grid(dy, pads, g.groups, ew - 1)

            def epilogue(q: int, rows: slice, block: np.ndarray) -> None:
                np.copyto(dx[rows, :, q * g.fc : (q + 1) * g.fc], block[:, : in_hw[1]].transpose(0, 1, 3, 2))

            offsets = [i * ddy * dyp.wg + j * ddx for i, j in g.taps()]
            wr = _tap_filters(f, g, transposed=True, turned=True)
            tasks += _taps_pass(dyp, wr, 1, offsets, eh, in_hw, epilogue)
        if data and not turned:
            # Each input row gathers from all over dY: the whole grid, copied once.
            dys = _to_grid(dy, (0, 0, 0, 0), g.groups, 0, alloc)[0]
            tasks += _taps_data_grad_rows(dys, g.wo, n, _tap_filters(f, g, transposed=True), g, in_hw, dx)
        if x is not None:
            xs = _Grid(x, g.pad, g.groups, ew - 1)
            # dY on the padded input's grid (zero outside the output columns) for whole runs
            dys_grid = _Grid(dy, (0, 0, 0, (wp if whole_df else g.wo) - g.wo), g.groups, 0)
            offsets = [i * ddy * xs.wg + j * ddx for i, j in g.taps()]
            df_tasks, finish = _taps_filter_grad(xs, dys_grid, sy, offsets, eh, (g.ho, g.wo))
            tasks = df_tasks + tasks  # the longer tasks first, the short ones balance the end
        _run(tasks, conv_gemm.workers(g.macs(n) * (data + (x is not None)), single))
    df = None
    if finish is not None:
        df = finish().reshape(g.groups, g.fh, g.fw, g.fc, g.kg).transpose(1, 2, 3, 0, 4)
        df = df.reshape(g.fh, g.fw, g.fc, g.k)
    return dx, df
