"""The tap-product path of harness.mcn.kernels.conv_gemm: column stride 1, inputs FC deep
or more (``ConvGeometry.rows_path``).

The input is copied once, padded, to a pixel-major layout (``_to_grid``): per filter
group one ``(pixels*N) x FC`` matrix whose row ``(y*W' + x)*N + n`` holds pixel (y, x) of
image n on a grid W' pixels wide. The pixels that filter tap (i, j) reads for a run of
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

import contextlib
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.kernels import conv_gemm, jit, taps_loops, threads
from harness.mcn.kernels.blas import RowProducts

if TYPE_CHECKING:
    from harness.mcn.kernels.conv_gemm import Alloc, ConvGeometry, Derivatives

__all__ = ["rows_backward", "rows_forward"]

Task = Callable[[int], None]  # called with the index of the worker thread running it

# A pixel-major copy runs beside another (threads.background) from this many elements;
# the forward pass's one copy is shared among the cores from GRID_SPLIT_MIN.
GRID_BESIDE_MIN = 1 << 16
GRID_SPLIT_MIN = 1 << 18
# The compiled tap products (taps_loops.tap_sums) run layers up to this many taps x
# channels deep and this many filters wide: measured in processor time against the BLAS
# (3x3, pad 1, float32, 2 cores), 0.79-0.88 at 32-64 channels and filters (bench_family's
# ResNet-, DnCNN- and VGG-shaped layers), 0.90-1.03 at 64-128, 0.99-1.07 at 128-256
# filters (left to the BLAS). They take the channels in spans whose weights for one tile
# of filters (taps x span x tile) fit in TAP_WEIGHTS_BYTES.
TAP_SUMS_MAX_DEPTH = 9 * 128
TAP_SUMS_MAX_FILTERS = 128
TAP_WEIGHTS_BYTES = 80 << 10


def _to_grid(
    a: np.ndarray, pads: tuple[int, int, int, int], groups: int, slack: int, alloc: Alloc, split: bool = False
) -> tuple[np.ndarray, int, int]:
    """``a`` (H x W x C x N) zero-padded by ``pads`` = (top, bottom, left, right) (a negative
    pad crops) in the pixel-major layout: ``(G, (H'*W' + slack)*N, C/G)`` where row
    ``(y*W' + x)*N + n`` of group q holds ``a_padded[y, x, q*C/G:(q+1)*C/G, n]``, followed by
    ``slack`` pixels of zeros (which the last row's shifted blocks may read). Returns the
    array, H' and W'. With ``split`` the copy is shared among the cores from
    ``GRID_SPLIT_MIN`` elements (else from threads.PARALLEL_MIN_ELEMENTWISE)."""
    h, w, c, n = a.shape
    t, b, left, r = pads
    hg, wg = h + t + b, w + left + r
    flat = alloc((groups, (hg * wg + slack) * n, c // groups), a.dtype)
    _fill_grid(flat, a, pads, slack, GRID_SPLIT_MIN if split else threads.PARALLEL_MIN_ELEMENTWISE)
    return flat, hg, wg


def _fill_grid(
    flat: np.ndarray,
    a: np.ndarray,
    pads: tuple[int, int, int, int],
    slack: int,
    split_min: int = threads.PARALLEL_MIN_ELEMENTWISE,
) -> None:
    """Write ``a`` padded by ``pads`` into ``flat`` (``_to_grid``'s layout, allocated). The
    copy turns each pixel's C x N block around: from ``split_min`` elements it is shared
    among the cores by rows."""
    h, w, c, n = a.shape
    groups, cg = flat.shape[0], flat.shape[2]
    t, b, left, r = pads
    hg, wg = h + t + b, w + left + r
    grid = flat[:, : hg * wg * n].reshape(groups, hg, wg, n, cg)
    y0, y1, x0, x1 = max(t, 0), hg - max(b, 0), max(left, 0), wg - max(r, 0)
    grid[:, :y0] = 0
    grid[:, y1:] = 0
    grid[:, y0:y1, :x0] = 0
    grid[:, y0:y1, x1:] = 0
    flat[:, hg * wg * n :] = 0
    if y1 <= y0 or x1 <= x0:
        return
    src = a[max(-t, 0) : h - max(-b, 0), max(-left, 0) : w - max(-r, 0)]
    src = src.reshape(y1 - y0, x1 - x0, groups, cg, n).transpose(2, 0, 1, 4, 3)
    dst = grid[:, y0:y1, x0:x1]
    parts = conv_gemm.split_evenly(y1 - y0, threads.cpu_cores() if src.size >= split_min else 1)
    threads.run_tasks(lambda p, _worker: np.copyto(dst[:, parts[p]], src[:, parts[p]]), len(parts))


def _phase_grids(
    x: np.ndarray, g: ConvGeometry, alloc: Alloc
) -> tuple[np.ndarray, int, list[int], list[int]]:
    """The padded input cut into the phases that the filter taps read, each in
    ``_to_grid``'s layout: phase (py, px) holds the padded pixels (py + SY*a, px + SX*b)
    at (a, b) of an ``ceil(H'/SY) x ceil(W'/SX)`` grid (zeros where there are none). A
    strided convolution (dilation 1) is the sum over taps (i, j) of unit-stride products
    on phase (i % SY, j % SX) shifted by (i // SY, j // SX). Returns the grids
    ``(phases, G, pixels*N, C/G)``, their width, and each tap's offset (in pixels) and
    grid."""
    h, w, c, n = x.shape
    (sy, sx), (pt, _, pl, _) = g.stride, g.pad
    hp, wp = g.padded((h, w))
    hq, wq = -(-hp // sy), -(-wp // sx)
    taps = g.taps()
    used = sorted({(i % sy, j % sx) for i, j in taps})
    slack = (g.fw - 1) // sx
    flat = alloc((len(used), g.groups, (hq * wq + slack) * n, c // g.groups), x.dtype)
    for u, (py, px) in enumerate(used):
        # the input rows of phase py: r0 + SY*k, at phase row a0 + k (likewise columns)
        r0, c0 = (py - pt) % sy, (px - pl) % sx
        a0, b0 = (r0 + pt - py) // sy, (c0 + pl - px) // sx
        rows, cols = len(range(r0, h, sy)), len(range(c0, w, sx))
        if not rows or not cols:
            flat[u] = 0
            continue
        _fill_grid(flat[u], x[r0::sy, c0::sx], (a0, hq - a0 - rows, b0, wq - b0 - cols), slack)
    offsets = [(i // sy) * wq + j // sx for i, j in taps]
    return flat, wq, offsets, [used.index((i % sy, j % sx)) for i, j in taps]


def _taps_pass(
    src: np.ndarray,
    src_w: int,
    n: int,
    wt: np.ndarray,
    sy: int,
    offsets: list[int],
    out_hw: tuple[int, int],
    epilogue: Callable[[int, slice, np.ndarray], None],
    phases: list[int] | None = None,
) -> list[Task]:
    """The tasks of the sum over taps on the pixel-major layout, for each group q and output pixel
    (oy, ox) below ``out_hw``::

        out[oy, ox] = sum_t src[p_t, q, pixel oy*sy*src_w + ox + offsets[t]] @ wt[q, t]

    in blocks of output rows (``src`` is ``(P, G, pixels*N, cin)``, tap t reading grid
    ``p_t = phases[t]``, 0 by default); ``epilogue(q, rows, block)`` receives each block as
    a ``(rows, src_w, N, cout)`` array whose first ``out_hw[1]`` columns hold the sums."""
    groups, _, _, cout = wt.shape
    phases = phases or [0] * len(offsets)
    out_h, out_w = out_hw
    row = src_w * n  # matrix rows per output row
    blocks = conv_gemm.row_blocks(out_h, row * cout * src.itemsize)
    step = blocks[0].stop - blocks[0].start
    # One product per tap for a whole block: at row stride 1, output pixel q*... of the
    # src_w-wide grid reads src pixel (its index + offset); the extra columns are dropped.
    whole = sy == 1 and step > 1 and src_w - out_w <= conv_gemm.FLAT_MAX_WASTE * src_w
    scratch = conv_gemm.Scratch(step * row * cout, src.dtype)
    if _compiled_taps(src, wt):
        flat, cin = src.reshape(-1), src.shape[3]
        # channels per span: the span's weights for one tile of filters within TAP_WEIGHTS_BYTES
        most = max(1, TAP_WEIGHTS_BYTES // (len(offsets) * taps_loops.sums_tile(cout) * src.itemsize))
        spans = -(-cin // most)
        span = -(-cin // spans)
        starts = _tap_starts(src, phases, offsets, n)

        def compiled(q: int, rows: slice, worker: int) -> None:
            r = rows.stop - rows.start
            buf = scratch.get(worker)[: r * row * cout]
            w, tap0 = wt[q].reshape(-1), starts[q]
            if whole:
                taps_loops.tap_sums(flat, tap0 + rows.start * row * cin, w, buf, 0, r * row, cin, cout, span)
            else:
                for i, oy in enumerate(range(rows.start, rows.stop)):
                    taps_loops.tap_sums(
                        flat, tap0 + oy * sy * row * cin, w, buf, i * row, out_w * n, cin, cout, span
                    )
            epilogue(q, rows, buf.reshape(r, src_w, n, cout))

        return [partial(compiled, q, rows) for q in range(groups) for rows in blocks]

    def task(q: int, rows: slice, worker: int) -> None:
        r = rows.stop - rows.start
        buf = scratch.get(worker)[: r * row * cout].reshape(r * row, cout)
        mm, w = RowProducts(src.dtype), [wt[q, k] for k in range(len(offsets))]
        a = [src[p, q] for p in phases]
        if whole:
            for k, off in enumerate(offsets):
                mm.nn(a[k], rows.start * row + off * n, w[k], buf, 0, r * row, float(k > 0))
        else:
            for i, oy in enumerate(range(rows.start, rows.stop)):
                for k, off in enumerate(offsets):
                    mm.nn(a[k], oy * sy * row + off * n, w[k], buf, i * row, out_w * n, float(k > 0))
        epilogue(q, rows, buf.reshape(r, src_w, n, cout))

    return [partial(task, q, rows) for q in range(groups) for rows in blocks]


def _tap_starts(src: np.ndarray, phases: list[int], offsets: list[int], n: int) -> list[np.ndarray]:
    """Per group q, where each tap's rows start in ``src.reshape(-1)`` (``src`` being
    ``(P, G, rows, cin)``; tap t reads grid ``phases[t]`` shifted by ``offsets[t]`` pixels of
    ``n`` rows), as the compiled loops take them (uint64)."""
    _, groups, rows, cin = src.shape
    return [
        np.array(
            [((p * groups + q) * rows + off * n) * cin for p, off in zip(phases, offsets, strict=True)],
            np.uint64,
        )
        for q in range(groups)
    ]


def _compiled_taps(src: np.ndarray, wt: np.ndarray) -> bool:
    """Whether ``_taps_pass`` runs its sums as compiled loops (taps_loops: float32, the
    filter count a multiple of its tile) rather than as BLAS products: for layers up to
    TAP_SUMS_MAX_DEPTH taps x channels deep and TAP_SUMS_MAX_FILTERS filters, where they
    were measured faster (the BLAS's blocking wins on deeper and wider layers), and from
    conv_gemm.PARALLEL_MIN_MACS multiply-adds (the loops' first use in a process compiles
    them, or loads them from numba's cache: not worth it for a few small products)."""
    groups, taps, cin, cout = wt.shape
    return (
        jit.available()
        and src.shape[2] * groups * taps * cin * cout >= conv_gemm.PARALLEL_MIN_MACS
        and src.dtype == wt.dtype == np.float32
        and cout % taps_loops.TILE == 0
        and taps * cin <= TAP_SUMS_MAX_DEPTH
        and cout <= TAP_SUMS_MAX_FILTERS
        and src.flags.c_contiguous
        and wt.flags.c_contiguous
        and taps_loops.usable(False, cin, cout)
    )


def _compiled_grads(xs: np.ndarray, dys: np.ndarray) -> bool:
    """Whether ``_taps_filter_grad`` runs its sums as compiled loops (taps_loops: float32,
    the channel count a multiple of its tile, the filter count of its tile; from
    conv_gemm.PARALLEL_MIN_MACS multiply-adds, as ``_compiled_taps``)."""
    _, groups, rows, cin = xs.shape
    return (
        jit.available()
        and rows * groups * cin * dys.shape[2] >= conv_gemm.PARALLEL_MIN_MACS
        and xs.dtype == dys.dtype == np.float32
        and cin % taps_loops.CHANNELS[taps_loops.TILE] == 0
        and dys.shape[2] % taps_loops.TILE == 0
        and xs.flags.c_contiguous
        and dys[0].flags.c_contiguous
        and taps_loops.usable(True, cin, dys.shape[2])
    )


def _taps_filter_grad(
    xs: np.ndarray,
    xs_w: int,
    dys: np.ndarray,
    dys_w: int,
    n: int,
    sy: int,
    offsets: list[int],
    out_hw: tuple[int, int],
    phases: list[int] | None = None,
) -> tuple[list[Task], Callable[[], np.ndarray]]:
    """The tasks of, per group q and tap t::

        sum_(oy, ox) xs[p_t, q, pixel oy*sy*xs_w + ox + offsets[t]]^T dys[q, pixel oy*dys_w + ox]

    (``xs`` is ``(P, G, pixels*N, cin)``, tap t reading grid ``p_t = phases[t]``, 0 by default)
    (grids ``xs_w`` and ``dys_w`` pixels wide), and the function that returns the sums,
    ``(G, T, cin, cout)``, once they have run. When the grids have the same width, ``dys``
    zero outside the output columns, and the row stride is 1, a run of output rows is one
    product per tap. The output rows are cut into parts, each with its own partial sums,
    added in order at the end."""
    _, groups, _, cin = xs.shape
    cout = dys.shape[2]
    phases = phases or [0] * len(offsets)
    ho, wo = out_hw
    whole = sy == 1 and xs_w == dys_w
    taps = len(offsets)
    blocks = conv_gemm.row_blocks(ho, xs_w * n * (cin + cout) * xs.itemsize)
    parts = [
        blocks[p.start : p.stop]
        for p in conv_gemm.filter_parts(len(blocks), groups * taps * cin * cout * xs.itemsize)
    ]
    # Each task runs its taps over the blocks of its part in order, a block's rows staying
    # in cache from one tap to the next; the taps are shared out when the parts are few.
    tap_sets = conv_gemm.split_evenly(taps, -(-2 * conv_gemm.MIN_BLOCKS // (len(parts) * groups)))
    sums = np.empty((len(parts), groups, taps, cin, cout), xs.dtype)

    if whole and _compiled_grads(xs, dys):
        flat, starts = xs.reshape(-1), _tap_starts(xs, phases, offsets, n)

        def compiled(p: int, q: int, ks: slice, worker: int) -> None:
            d, out, tap0 = dys[q].reshape(-1), sums[p, q, ks], starts[q][ks]
            out.fill(0)
            for rows in parts[p]:
                m, s = (rows.stop - rows.start) * xs_w * n, rows.start * xs_w * n
                taps_loops.tap_grads(flat, tap0 + s * cin, d, s, m, out, cin, cout)

        tasks = [
            partial(compiled, p, q, ks) for p in range(len(parts)) for q in range(groups) for ks in tap_sets
        ]
        return tasks, lambda: sums.sum(axis=0) if len(parts) > 1 else sums[0]

    def task(p: int, q: int, ks: slice, worker: int) -> None:
        mm, d = RowProducts(xs.dtype), dys[q]
        for b, rows in enumerate(parts[p]):
            for k in range(ks.start, ks.stop):
                off, out, a = offsets[k] * n, sums[p, q, k], xs[phases[k], q]
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


def _tap_offsets(g: ConvGeometry, width: int) -> list[int]:
    """Each filter tap's shift, in pixels, on a grid ``width`` pixels wide (dilation included)."""
    ddy, ddx = g.dilate
    return [i * ddy * width + j * ddx for i, j in g.taps()]


def _beside(fn: Callable[..., Any], *args: Any, started: list[Callable[[], Any]]) -> Callable[[], Any]:
    """``fn(*args)`` on another core (threads.background) when the work is worth waking a
    thread (the first argument, an array, of ``GRID_BESIDE_MIN`` elements or more), else
    when asked for; returns the function that gives the result. A call started on another
    core is added to ``started``, for ``_settle``."""
    if args[0].size >= GRID_BESIDE_MIN:
        result = threads.background(fn, *args)
        started.append(result)
        return result
    return partial(fn, *args)


def _settle(started: list[Callable[[], Any]]) -> None:
    """Wait for the copies started on another core (their results are kept): before their
    workspace buffers are given back, also when the caller failed before asking for them."""
    for result in started:
        with contextlib.suppress(Exception):  # the caller's own error, if any, is raised
            result()


def _run(tasks: list[Task], workers: int) -> None:
    """Run ``tasks`` (each given the worker index) on ``workers`` threads, in one go: the
    fewer the waits for the last task, the less a busy machine costs."""
    threads.run_tasks(lambda t, worker: tasks[t](worker), len(tasks), workers)


def rows_forward(x: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """``conv_forward`` for ``g.rows_path``: per group, Y = sum over taps (i, j) of the input
    block shifted by the tap times F[i, j] (FC x K/G), on the pixel-major layout."""
    n, dt = x.shape[3], x.dtype
    sy = g.stride[0]
    kg = g.kg
    y = np.empty((g.ho, g.wo, g.k, n), dt)

    def epilogue(q: int, rows: slice, block: np.ndarray) -> None:
        ks, sums = slice(q * kg, (q + 1) * kg), block[:, : g.wo]
        if bias is not None:  # added last, as MatConvNet does, while the block is in cache
            np.add(sums, bias[ks], out=sums)
        np.copyto(y[rows, :, ks], sums.transpose(0, 1, 3, 2))

    with conv_gemm.workspace() as alloc, threads.blas_single_threaded() as single:
        wt = _tap_filters(f, g, transposed=False)
        if g.phased:
            xs, wg, offsets, phases = _phase_grids(x, g, alloc)
            tasks = _taps_pass(xs, wg, n, wt, 1, offsets, (g.ho, g.wo), epilogue, phases)
        else:
            xs, _, wg = _to_grid(x, g.pad, g.groups, g.extent[1] - 1, alloc, split=True)
            offsets = _tap_offsets(g, wg)
            tasks = _taps_pass(xs[None], wg, n, wt, sy, offsets, (g.ho, g.wo), epilogue)
        _run(tasks, conv_gemm.workers(g.macs(n), single))
    return y


def _phased_data_grad(
    dy: np.ndarray, f: np.ndarray, g: ConvGeometry, dx: np.ndarray, alloc: Alloc
) -> list[Task]:
    """The tasks of the data derivative of a strided convolution (dilation 1) into ``dx``,
    phase by phase of the padded input: phase (py, px) at (a, b) gathers
    ``dY[a - i // SY, b - j // SX] @ F[i, j]^T`` over the taps of that phase, one
    unit-stride correlation of dY (padded by the phase's reach) each; the phases write
    disjoint elements of dx."""
    h, w, _, n = dx.shape
    (sy, sx), (pt, _, pl, _) = g.stride, g.pad
    hp, wp = g.padded((h, w))
    hq, wq = -(-hp // sy), -(-wp // sx)
    reach_h, reach_w = (g.fh - 1) // sy, (g.fw - 1) // sx
    dyp, _, wd = _to_grid(dy, (reach_h, hq - g.ho, reach_w, wq - g.wo), g.groups, reach_w, alloc)
    wr = _tap_filters(f, g, transposed=True)
    taps, tasks = g.taps(), []
    for py in range(sy):
        for px in range(sx):
            # the input rows of phase py: r0 + SY*k, at phase row a0 + k
            r0, c0 = (py - pt) % sy, (px - pl) % sx
            a0, b0 = (r0 + pt - py) // sy, (c0 + pl - px) // sx
            rows, cols = len(range(r0, h, sy)), len(range(c0, w, sx))
            ids = [t for t, (i, j) in enumerate(taps) if (i % sy, j % sx) == (py, px)]
            if not rows or not cols:
                continue
            if not ids:  # no tap reads these pixels
                dx[r0::sy, c0::sx] = 0
                continue

            def epilogue(
                q: int, block_rows: slice, block: np.ndarray, r0=r0, c0=c0, a0=a0, b0=b0, cols=cols
            ) -> None:
                lo = max(block_rows.start, a0)
                if lo >= block_rows.stop:
                    return
                src = block[lo - block_rows.start :, b0 : b0 + cols].transpose(0, 1, 3, 2)
                y0 = r0 + sy * (lo - a0)
                dst = dx[y0 : y0 + sy * (block_rows.stop - lo) : sy, c0::sx, q * g.fc : (q + 1) * g.fc]
                np.copyto(dst, src)

            offsets = [(reach_h - taps[t][0] // sy) * wd + reach_w - taps[t][1] // sx for t in ids]
            wt = np.ascontiguousarray(wr[:, ids])
            tasks += _taps_pass(dyp[None], wd, n, wt, 1, offsets, (a0 + rows, b0 + cols), epilogue)
    return tasks


def rows_backward(
    x: np.ndarray | None, dy: np.ndarray, f: np.ndarray, g: ConvGeometry, in_hw: tuple[int, int], data: bool
) -> Derivatives:
    """``conv_backward`` for ``g.rows_path``: the data derivative (if ``data``) and the filter
    derivative (if ``x`` is given) as tap products on the pixel-major layout, all their
    blocks in one batch of tasks. A strided convolution without dilation runs on the
    input's phases (``_phase_grids``): dX phase by phase (``_phased_data_grad``), dF per tap
    on the tap's phase."""
    n, dt = dy.shape[3], dy.dtype
    dx = finish = None
    tasks: list[Task] = []
    if data:
        dx = np.empty((*in_hw, g.fc * g.groups, n), dt)
    started: list[Callable[[], Any]] = []  # copies running on another core
    with conv_gemm.workspace() as alloc, threads.blas_single_threaded() as single:
        try:
            if g.phased:
                # the input's phases (for dF) are copied on another core while this one copies dY
                x_grids = None if x is None else _beside(_phase_grids, x, g, alloc, started=started)
                if data:
                    tasks += _phased_data_grad(dy, f, g, dx, alloc)
                if x_grids is not None:
                    xs, wg, offsets, phases = x_grids()
                    dys = _to_grid(dy, (0, 0, 0, wg - g.wo), g.groups, 0, alloc)[0]
                    df_tasks, finish = _taps_filter_grad(xs, wg, dys, wg, n, 1, offsets, (g.ho, g.wo), phases)
                    tasks = df_tasks + tasks
            else:
                tasks, finish = _unit_column_stride_tasks(x, dy, f, g, in_hw, dx, alloc, started)
            _run(tasks, conv_gemm.workers(g.macs(n) * (data + (x is not None)), single))
        finally:
            _settle(started)
    df = None
    if finish is not None:
        df = finish().reshape(g.groups, g.fh, g.fw, g.fc, g.kg).transpose(1, 2, 3, 0, 4)
        df = df.reshape(g.fh, g.fw, g.fc, g.k)
    return dx, df


def _unit_column_stride_tasks(
    x: np.ndarray | None,
    dy: np.ndarray,
    f: np.ndarray,
    g: ConvGeometry,
    in_hw: tuple[int, int],
    dx: np.ndarray | None,
    alloc: Alloc,
    started: list[Callable[[], Any]],
) -> tuple[list[Task], Callable[[], np.ndarray] | None]:
    """``rows_backward``'s tasks at column stride 1 (unit strides, or dilation): dX as one correlation
    (below) at row stride 1 when its grid wastes little, else row by row; dF in runs of
    whole rows when the input grid wastes little, else row by row."""
    n, data = dy.shape[3], dx is not None
    sy = g.stride[0]
    pt, pb, pl, pr = g.pad
    (eh, ew), wp = g.extent, g.padded(in_hw)[1]
    dys = finish = None
    tasks: list[Task] = []
    turned = data and sy == 1 and ew - 1 <= conv_gemm.FLAT_MAX_WASTE * (in_hw[1] + ew - 1)
    whole_df = x is not None and sy == 1 and wp - g.wo <= conv_gemm.FLAT_MAX_WASTE * wp
    # The input's copy (for dF) is made on another core while this one copies dY.
    x_grid = None if x is None else _beside(_to_grid, x, g.pad, g.groups, ew - 1, alloc, started=started)
    if turned:
        # dX = the correlation of dY, padded by the filter's reach minus the padding,
        # with the filters turned by 180 degrees and transposed (K/G x FC per tap).
        pads = (eh - 1 - pt, eh - 1 - pb, ew - 1 - pl, ew - 1 - pr)
        dyp, _, wq = _to_grid(dy, pads, g.groups, ew - 1, alloc)

        def epilogue(q: int, rows: slice, block: np.ndarray) -> None:
            np.copyto(dx[rows, :, q * g.fc : (q + 1) * g.fc], block[:, : in_hw[1]].transpose(0, 1, 3, 2))

        offsets = _tap_offsets(g, wq)
        wr = _tap_filters(f, g, transposed=True, turned=True)
        tasks += _taps_pass(dyp[None], wq, n, wr, 1, offsets, in_hw, epilogue)
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
        xs, _, wg = x_grid()
        offsets = _tap_offsets(g, wg)
        df_tasks, finish = _taps_filter_grad(xs[None], wg, dys, dys_w, n, sy, offsets, (g.ho, g.wo))
        tasks = df_tasks + tasks  # the longer tasks first, the short ones balance the end
    return tasks, finish
