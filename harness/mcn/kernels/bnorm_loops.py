"""Batch normalisation's passes over memory as compiled loops (harness.mcn.kernels.jit).

harness.mcn.bnorm states the arithmetic (MatConvNet's nnbnorm.cpp: per-channel sums added
one element at a time, n outer, then w, then h; each product and quotient rounded in x's
dtype) in numpy, where it costs two copies to put each channel's numbers in that order,
one pass per sum and one per elementwise operation. Here each pass reads its inputs
once: the pixels' C x N blocks are turned to N x C (so that a channel's next number is
found at a fixed stride), then every sum advances one element at a time in that order
(the channels, whose sums are independent, shared among the cores); the outputs are
written in one pass. Same operations, same order, same bits.

Arrays are H x W x C x N, C-contiguous (the callers make them so). The loops index
per-pixel slices: LLVM vectorises those, not the same loops on four indices (2x slower).
The two sums loops stay separate: one loop with a flag for the derivative's sums made the
ResNet-shaped pass 2.5-3% slower (out-of-process A/B, twice 48 runs each).
"""

from __future__ import annotations

import numpy as np

from harness.mcn.kernels import threads
from harness.mcn.kernels.jit import Compiled

# The sums are shared among the cores by channels from this many elements of x (waking a
# thread costs ~0.2 ms; a 16x16x64x16 batch's sums take ~0.7 ms on one core, cold).
SPLIT_MIN = 1 << 18

__all__ = ["derivative_sums", "moment_sums", "normalize", "normalize_backward"]


def _moment_sums(x, k0, k1, out):  # noqa: ANN001, ANN202 - compiled by numba
    h_, w_, _, n_ = x.shape
    kc = k1 - k0
    t = np.empty((h_, w_, n_, kc), x.dtype)
    for h in range(h_):
        for w in range(w_):
            src, dst = x[h, w, k0:k1], t[h, w]
            for k in range(kc):
                for n in range(n_):
                    dst[n, k] = src[k, n]
    s1 = np.zeros(kc, x.dtype)
    s2 = np.zeros(kc, x.dtype)
    for n in range(n_):
        for w in range(w_):
            for h in range(h_):
                for k in range(kc):
                    v = t[h, w, n, k]
                    s1[k] += v
                    s2[k] += v * v
    out[0, k0:k1] = s1
    out[1, k0:k1] = s2


def _derivative_sums(x, d, k0, k1, out):  # noqa: ANN001, ANN202 - compiled by numba
    h_, w_, _, n_ = x.shape
    kc = k1 - k0
    t = np.empty((h_, w_, n_, 2, kc), x.dtype)
    for h in range(h_):
        for w in range(w_):
            sx, sd, dst = x[h, w, k0:k1], d[h, w, k0:k1], t[h, w]
            for k in range(kc):
                for n in range(n_):
                    dst[n, 0, k] = sx[k, n]
                    dst[n, 1, k] = sd[k, n]
    sdx = np.zeros(kc, x.dtype)
    sd = np.zeros(kc, x.dtype)
    s1 = np.zeros(kc, x.dtype)
    s2 = np.zeros(kc, x.dtype)
    for n in range(n_):
        for w in range(w_):
            for h in range(h_):
                for k in range(kc):
                    v = t[h, w, n, 0, k]
                    e = t[h, w, n, 1, k]
                    sdx[k] += e * v
                    sd[k] += e
                    s1[k] += v
                    s2[k] += v * v
    out[0, k0:k1] = sdx
    out[1, k0:k1] = sd
    out[2, k0:k1] = s1
    out[3, k0:k1] = s2


def _normalize(x, mu, a, b):  # noqa: ANN001, ANN202 - compiled by numba
    h_, w_, c_, n_ = x.shape
    y = np.empty_like(x)
    for h in range(h_):
        for w in range(w_):
            src, dst = x[h, w], y[h, w]
            for k in range(c_):
                m, s, c = mu[k], a[k], b[k]
                for n in range(n_):
                    dst[k, n] = (src[k, n] - m) * s + c
    return y


def _normalize_backward(x, d, mu, g2, db, g1):  # noqa: ANN001, ANN202 - compiled by numba
    h_, w_, c_, n_ = x.shape
    dx = np.empty_like(x)
    for h in range(h_):
        for w in range(w_):
            sx, sd, dst = x[h, w], d[h, w], dx[h, w]
            for k in range(c_):
                m, p, q, r = mu[k], g2[k], db[k], g1[k]
                for n in range(n_):
                    dst[k, n] = (sd[k, n] - q) * r - (sx[k, n] - m) * p
    return dx


_moment_loop = Compiled(_moment_sums)
_derivative_loop = Compiled(_derivative_sums)
normalize = Compiled(_normalize)
normalize.__doc__ = """y = (x - mu) * a + b per channel, each operation rounded."""
normalize_backward = Compiled(_normalize_backward)
normalize_backward.__doc__ = """dx = (d - db) * g1 - (x - mu) * g2 per channel, each
operation rounded (db: the bias derivative over the mass)."""


def _by_channels(loop: Compiled, arrays: tuple[np.ndarray, ...], count: int) -> tuple[np.ndarray, ...]:
    """``count`` per-channel sums of ``loop``, the channels shared among the cores (from
    ``SPLIT_MIN`` elements): each channel's sums are the same whichever thread adds them."""
    c = arrays[0].shape[2]
    out = np.empty((count, c), arrays[0].dtype)
    parts = max(1, min(c, threads.cpu_cores() if arrays[0].size >= SPLIT_MIN else 1))
    cuts = [(c * p // parts, c * (p + 1) // parts) for p in range(parts)]
    threads.run_tasks(lambda t, _worker: loop(*arrays, *cuts[t], out), parts, parts)
    return tuple(out)


def moment_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum x, sum x*x) per channel, each added one element at a time in MatConvNet's order
    (n outer, then w, then h)."""
    return _by_channels(_moment_loop, (x,), 2)


def derivative_sums(x: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, ...]:
    """(sum d*x, sum d, sum x, sum x*x) per channel, in the order of ``moment_sums``."""
    return _by_channels(_derivative_loop, (x, d), 4)
