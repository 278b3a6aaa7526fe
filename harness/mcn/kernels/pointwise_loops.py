"""The plain ReLU's passes over memory as compiled loops (harness.mcn.kernels.jit).

harness.mcn.pointwise states them in numpy: ``fmax(x, 0)`` forward (NaN and -0 give +0)
and ``dzdy .* (x > 0)`` backward (the comparison made a 0/1 factor of x's dtype, then
multiplied: a NaN or infinite dzdy times 0 stays NaN). Here each is one pass that reads
its inputs once, with the same comparisons and the same products: the same bits (but for
the sign of the forward's zero from x = -0: always +0 here, -0 or +0 from numpy's fmax
depending on whether its vector or scalar loop ran), without numpy's temporary mask and
at several times its speed. Arrays are flat and contiguous;
each call fills ``out[lo:hi]``, so that the cores can share an array by ranges.
"""

from __future__ import annotations

from harness.mcn.kernels.jit import Compiled

__all__ = ["relu_backward", "relu_forward"]


# The loops run over slices from 0 to their size: with the range's ends as arguments LLVM
# does not vectorise them (12x slower).
def _relu_forward(x, out, lo, hi):  # noqa: ANN001, ANN202 - compiled by numba
    zero = x.dtype.type(0)
    xs, ys = x[lo:hi], out[lo:hi]
    for i in range(xs.size):
        v = xs[i]
        ys[i] = v if v > zero else zero


def _relu_backward(x, d, out, lo, hi):  # noqa: ANN001, ANN202 - compiled by numba
    zero, one = x.dtype.type(0), x.dtype.type(1)
    xs, ds, ys = x[lo:hi], d[lo:hi], out[lo:hi]
    for i in range(xs.size):
        ys[i] = ds[i] * (one if xs[i] > zero else zero)


relu_forward = Compiled(_relu_forward)
relu_forward.__doc__ = """out[lo:hi] = fmax(x[lo:hi], 0), as numpy computes it (+0 for NaN and -0)."""
relu_backward = Compiled(_relu_backward)
relu_backward.__doc__ = """out[lo:hi] = d[lo:hi] * (x[lo:hi] > 0), the mask a 0/1 factor of x's dtype."""
