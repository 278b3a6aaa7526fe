"""The direct path of harness.mcn.kernels.conv_gemm: when the one window covers the whole
unpadded input (MatConvNet's "fully connected" mode, 1x1 convolutions on 1x1 inputs), the
input itself is the column matrix, and each derivative is one product per filter group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.mcn.kernels import conv_gemm, threads
from harness.mcn.kernels.blas import gemm

if TYPE_CHECKING:
    from harness.mcn.kernels.conv_gemm import ConvGeometry, Derivatives

__all__ = ["direct_backward", "direct_forward"]


def _direct_cols(x: np.ndarray, cs: slice) -> np.ndarray:
    """The column matrix when one window covers the input: the input itself, (H*W*FC) x N."""
    return x[:, :, cs].reshape(-1, x.shape[3])


def direct_forward(x: np.ndarray, f: np.ndarray, g: ConvGeometry, bias: np.ndarray | None) -> np.ndarray:
    """``conv_forward`` when the window covers the input: y[0, 0] = F^T X per group, the
    filters of a group shared among the threads."""
    n = x.shape[3]
    y = np.empty((1, 1, g.k, n), dtype=x.dtype)
    kg, slices = g.kg, list(g.groups_slices())
    with threads.blas_single_threaded() as single:
        workers = conv_gemm.workers(g.macs(n), single)
        parts = conv_gemm.split_evenly(kg, workers)

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
    dx = np.empty((*in_hw, g.fc * g.groups, n), dt) if data else None
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
        threads.run_tasks(task, len(jobs), conv_gemm.workers(g.macs(n), single))
    return dx, (None if df is None else df.reshape(g.fh, g.fw, g.fc, g.k))
