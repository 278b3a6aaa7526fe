"""Pooling's work split: parts of the channel-and-image axis among the cores, in
cache-sized blocks when the pooling windows overlap (``run_blocks``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from harness.mcn.kernels import threads

__all__ = ["BLOCK_BYTES", "run_blocks"]

# Each kernel works on blocks of the flattened channel-and-image axis whose buffers fit in
# about this many bytes, so the per-tap passes re-read cached data instead of memory.
BLOCK_BYTES = 4 << 20


def run_blocks(
    kernel: Callable[..., None],
    ins: tuple[np.ndarray, ...],
    outs: tuple[np.ndarray, ...],
    scratch: tuple[tuple[tuple[int, int], np.dtype], ...],
    *,
    overlap: bool,
) -> None:
    """Apply ``kernel(*ins, *outs, *scratch)`` to parts of the last axis of 3-D ``(H, W, C*N)`` arrays.

    Pixels and images are independent, so each core takes its own part of the flattened
    channel-and-image axis. ``scratch`` gives the (H, W) and dtype of per-part work buffers.
    When the windows ``overlap`` every input cell is read by several taps, and the parts
    are blocks of about ``BLOCK_BYTES`` copied into compact buffers first: a block of a
    wide array is hundreds of short runs a power of two apart, which the caches hold
    badly, while in a compact buffer every per-tap pass re-reads cached data. Otherwise
    each tap reads its cells once and the kernel runs on the arrays themselves.
    """
    cn = ins[0].shape[2]
    col_bytes = sum(a.shape[0] * a.shape[1] * a.itemsize for a in ins + outs)
    col_bytes += sum(hw[0] * hw[1] * np.dtype(dt).itemsize for hw, dt in scratch)
    workers = min(threads.cpu_cores(), cn)
    if min(a.size for a in ins + outs) < threads.PARALLEL_MIN:
        workers = 1
    width = BLOCK_BYTES // max(1, col_bytes) if overlap else -(-cn // workers)
    if cn <= width or workers == 1 and not overlap or min(a.size for a in ins + outs) == 0:
        kernel(*ins, *outs, *(np.empty((*hw, cn), dt) for hw, dt in scratch))
        return
    # As many blocks for each worker; buffered blocks are whole cache lines (multiples of
    # 16 numbers) wide, but for the last one.
    nblocks = -(-cn // (max(1, width) * workers)) * workers
    if overlap and cn >= 16 * nblocks:
        width = -(-cn // nblocks // 16) * 16
        blocks = [slice(lo, min(lo + width, cn)) for lo in range(0, cn, width)]
    else:
        blocks = [slice(cn * q // nblocks, cn * (q + 1) // nblocks) for q in range(nblocks)]
        width = -(-cn // nblocks)
    shapes = [a.shape[:2] for a in ins + outs] + [hw for hw, _ in scratch]
    dtypes = [a.dtype for a in ins + outs] + [np.dtype(dt) for _, dt in scratch]

    def work(part: list[slice]) -> None:
        first = 0 if overlap else len(ins + outs)  # without overlap only scratch is buffered
        flat = [
            np.empty(hw[0] * hw[1] * width, dt) for hw, dt in zip(shapes[first:], dtypes[first:], strict=True)
        ]
        for b in part:
            n = b.stop - b.start  # contiguous (H, W, n) buffers, also for a narrower last block
            views = [
                f[: hw[0] * hw[1] * n].reshape(*hw, n) for f, hw in zip(flat, shapes[first:], strict=True)
            ]
            if not overlap:
                kernel(*(a[:, :, b] for a in ins + outs), *views)
                continue
            for a, v in zip(ins, views, strict=False):
                np.copyto(v, a[:, :, b])
            kernel(*views)
            for a, v in zip(outs, views[len(ins) :], strict=False):
                np.copyto(a[:, :, b], v)

    threads.parallel_map(work, [blocks[k::workers] for k in range(workers)])
