"""The column-matrix path of harness.mcn.kernels.conv_gemm: any geometry (thin inputs,
column strides).

Per block of output rows and filter group, the column matrix ``(FH*FW*FC) x (rows*Wo*N)``,
rows ordered ``(fh, fw, c)`` as the C-order reshape ``F.reshape(-1, K)`` of an
``FH x FW x FC x K`` filter bank, is built from the padded input (``_im2col``, copies with
runs of N numbers) and multiplied by the filters in one product; the data derivative goes
back through the adjoint copy (``_col2im_add``), blocks that share input rows one after
the other. The filter derivative is summed per part of the blocks, the partial sums added
in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.mcn.kernels import columns_loops, conv_gemm, jit, threads
from harness.mcn.kernels.blas import gemm

if TYPE_CHECKING:
    from harness.mcn.kernels.conv_gemm import ConvGeometry, Derivatives

__all__ = ["columns_backward", "columns_forward", "pad_zeros", "unpad"]


def pad_zeros(x: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """``x`` (H x W x C x N) with ``pad`` = (top, bottom, left, right) rows and columns of
    zeros around it (``x`` itself when there are none)."""
    if pad == (0, 0, 0, 0):
        return x
    pt, pb, pl, pr = pad
    h, w, c, n = x.shape
    xp = np.zeros((h + pt + pb, w + pl + pr, c, n), dtype=x.dtype)
    xp[pt : pt + h, pl : pl + w] = x
    return xp


def unpad(xp: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """``xp`` without the ``pad`` = (top, bottom, left, right) border, contiguous (``xp``
    itself when there is none)."""
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
    if jit.available():
        columns_loops.im2col(xp, cols, rows.start, cs.start, *g.stride, *g.dilate)
        return cols.reshape(g.kd, -1)
    for i in range(g.fh):
        for j in range(g.fw):
            ys, xs = g.tap(i, j, rows)
            cols[i, j] = xp[ys, xs, cs].transpose(2, 0, 1, 3)
    return cols.reshape(g.kd, -1)


def _col2im_add(dcols: np.ndarray, g: ConvGeometry, rows: slice, cs: slice, dxp: np.ndarray) -> None:
    """Adjoint of ``_im2col``: accumulate (FH*FW*FC) x (rows*Wo*N) columns into ``dxp``."""
    d = dcols.reshape(g.fh, g.fw, g.fc, rows.stop - rows.start, g.wo, dxp.shape[3])
    if jit.available():
        columns_loops.col2im_add(d, dxp, rows.start, cs.start, *g.stride, *g.dilate)
        return
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


def columns_forward(x: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """``conv_forward`` through the column matrix, per block of output rows and group."""
    n, dt = x.shape[3], x.dtype
    xp = pad_zeros(x, g.pad)
    y = np.empty((g.ho, g.wo, g.k, n), dt)
    kg, slices = g.kg, list(g.groups_slices())
    fmats = [np.ascontiguousarray(f[:, :, :, ks].reshape(-1, kg).T) for _, ks in slices]
    chunks = g.row_chunks(n, dt)
    m_max = (chunks[0].stop - chunks[0].start) * g.wo * n
    cols_buf, prod_buf = conv_gemm.Scratch(g.kd * m_max, dt), conv_gemm.Scratch(kg * m_max, dt)

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
        threads.run_tasks(task, len(chunks) * g.groups, conv_gemm.workers(g.macs(n), single))
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
    cols_buf, dy_buf = conv_gemm.Scratch(g.kd * m_max, dt), conv_gemm.Scratch(kg * m_max, dt)
    df = dxp = None
    with threads.blas_single_threaded() as single:
        workers = conv_gemm.workers(g.macs(n), single)
        if x is not None:
            xp = pad_zeros(x, g.pad)
            parts = conv_gemm.filter_parts(len(chunks), g.k * g.kd * dt.itemsize)
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
