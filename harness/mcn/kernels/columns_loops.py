"""The column matrix's copies (harness.mcn.kernels.conv_columns: im2col and its adjoint) as
compiled loops (harness.mcn.kernels.jit).

numpy makes each filter tap's part of the column matrix with one strided copy (and adds
it back with one strided addition): FH*FW calls per block of rows, whose Python costs
more than the copying on thin inputs (a net's first layer, three channels). Here one call
per block runs the same copies, and the additions in the same order (tap after tap, each
element receiving at most one value per tap): the same numbers, bit for bit.
"""

from __future__ import annotations

from harness.mcn.kernels.jit import Compiled

__all__ = ["col2im_add", "im2col"]


def _tap_copies(xp, cols, r0, c0, sy, sx, dy, dx, adjoint):  # noqa: ANN001, ANN202 - compiled by numba
    fh, fw, fc, rows, wo, n = cols.shape
    for i in range(fh):
        for j in range(fw):
            for c in range(fc):
                for a in range(rows):
                    y = (r0 + a) * sy + i * dy
                    for b in range(wo):
                        pixel = xp[y, b * sx + j * dx, c0 + c]
                        column = cols[i, j, c, a, b]
                        if adjoint:
                            for m in range(n):
                                pixel[m] += column[m]
                        else:
                            for m in range(n):
                                column[m] = pixel[m]


_copies = Compiled(_tap_copies)


def im2col(xp, cols, r0, c0, sy, sx, dy, dx) -> None:  # noqa: ANN001
    """cols[i, j, c, a, b] = xp[(r0 + a)*SY + i*DY, b*SX + j*DX, c0 + c] (N numbers each)."""
    _copies(xp, cols, r0, c0, sy, sx, dy, dx, False)


def col2im_add(d, dxp, r0, c0, sy, sx, dy, dx) -> None:  # noqa: ANN001
    """The adjoint of ``im2col``: those pixels of dxp += d[i, j, c, a, b], tap after tap."""
    _copies(dxp, d, r0, c0, sy, sx, dy, dx, True)
