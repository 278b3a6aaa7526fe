"""Average pooling's per-tap sums as one compiled loop (harness.mcn.kernels.jit).

harness.mcn.pool adds the window taps one numpy call each, in MatConvNet's column-major
window order (the backward pass in reverse): a global pooling of a 16 x 16 map is 256
calls on small arrays, which cost more in the calls than in the additions. Here the same
additions run in the same order (each element's running sum meets the taps one after the
other), so the sums are the same bits. A tap is one row of ``table``: output rows and
columns ``[o0, o1) x [p0, p1)`` and the input cells they read, from (``i0``, ``j0``) by
strides (``si``, ``sj``).
"""

from __future__ import annotations

import numpy as np

from harness.mcn.kernels.jit import Compiled

__all__ = ["add_taps", "tap_table"]


def tap_table(taps: list) -> np.ndarray:
    """``(taps, 8)`` int64 rows ``o0 o1 p0 p1 i0 si j0 sj`` of harness.mcn.pool's taps."""
    rows = [
        (o[0].start, o[0].stop, o[1].start, o[1].stop, i[0].start, i[0].step or 1, i[1].start, i[1].step or 1)
        for _, o, i in taps
    ]
    return np.array(rows, np.int64).reshape(-1, 8)


def _add_taps(y, x, table, backward):  # noqa: ANN001, ANN202 - compiled by numba
    cn = y.shape[2]
    count = table.shape[0]
    for u in range(count):
        t = count - 1 - u if backward else u
        o0, o1, p0, p1 = table[t, 0], table[t, 1], table[t, 2], table[t, 3]
        i0, si, j0, sj = table[t, 4], table[t, 5], table[t, 6], table[t, 7]
        for r in range(o0, o1):
            ir = i0 + (r - o0) * si
            for c in range(p0, p1):
                ic = j0 + (c - p0) * sj
                if backward:  # x is the input's derivative, y the scaled output derivative
                    for k in range(cn):
                        x[ir, ic, k] += y[r, c, k]
                else:
                    for k in range(cn):
                        y[r, c, k] += x[ir, ic, k]


add_taps = Compiled(_add_taps)
add_taps.__doc__ = """Forward: ``y[o] += x[i]`` tap after tap; backward: ``x[i] += y[o]`` from
the last tap to the first (``y``: output grid, ``x``: input grid, both H x W x CN)."""
