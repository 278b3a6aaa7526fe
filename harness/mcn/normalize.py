"""Local response normalisation (``vl_nnnormalize``) and MatConvNet's approximate power.

The CPU kernel (src/bits/nnnormalize.cpp) raises to ``-BETA`` with ``fast_pow``, cubic
polynomial approximations of log2 and exp2 on the float's bit pattern, which differ from
the exact power by up to about 3.3e-3 relative. The reference reproduces ``fast_pow`` bit
for bit by default, together with the kernel's order of operations and its mix of
precisions, so that it matches MatConvNet's CPU output to float32 rounding; ``exact=True``
swaps in the exact power and keeps everything else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.mcn.options import McnError, as_4d, float_dtype

__all__ = ["fast_pow", "vl_nnnormalize"]

# fast_pow's coefficients: log2(1 + m) ~ m*P1 + m^2*P2 + m^3*P3, 2^r ~ 1 + r*E1 + r^2*E2 + r^3*E3.
_PLOG = (1.442695040888963, -0.606737602222409, 0.164042561333445)
_PEXP = (0.693147180559945, 0.227411277760219, 0.079441541679836)
# (float type, same-size integer type, mantissa bits, exponent bias)
_LAYOUT = {np.dtype(np.float32): (np.int32, 23, 127), np.dtype(np.float64): (np.int64, 52, 1023)}


def fast_pow(x: np.ndarray, y: float) -> np.ndarray:
    """MatConvNet's ``fast_pow(x, y)`` for positive normal ``x`` (nnnormalize.cpp, not VERY_FAST).

    Overloaded in C++ on ``float`` and ``double``: the precision of ``x`` picks the variant
    and every step, constants included, is computed in it. nnnormalize.cpp is compiled
    under ``#pragma GCC optimize ("fast-math")``, and GCC reassociates the two cubics
    (factoring ``m`` out of the odd terms); this is the order its optimised code uses::

        ix = bits(x) - bias<<M;  fx = ix >> M;  mx = float(bits: (ix & (2^M-1)) + bias<<M) - 1
        t  = y * ((fx + mx^2*P2) + mx*(mx^2*P3 + P1))
        fz = floor(t);  rz = t - fz;  tz = (fz + rz^2*E2) + rz*(rz^2*E3 + E1)
        z  = float(bits: int(tz * 2^M) + bias<<M)        (int() truncates toward zero)
    """
    x = np.asarray(x)
    dt = x.dtype
    if dt not in _LAYOUT:
        raise McnError(f"Expected x to be float32 or float64. Received x.dtype={dt}")
    itype, mbits, bias = _LAYOUT[dt]
    f = dt.type
    offset = itype(bias) << itype(mbits)
    ix = x.view(itype) - offset
    imx = (ix & ((itype(1) << itype(mbits)) - itype(1))) + offset
    fx = (ix >> itype(mbits)).astype(dt)
    mx = imx.view(dt) - f(1)
    mx2 = mx * mx
    t = f(y) * ((fx + mx2 * f(_PLOG[1])) + mx * (mx2 * f(_PLOG[2]) + f(_PLOG[0])))
    fz = np.floor(t)
    rz = t - fz
    rz2 = rz * rz
    tz = (fz + rz2 * f(_PEXP[1])) + rz * (rz2 * f(_PEXP[2]) + f(_PEXP[0]))
    return ((tz * f(1 << mbits)).astype(itype) + offset).view(dt)


def _params(param: Any) -> tuple[int, float, float, float]:
    p = np.asarray(param, dtype=float).ravel() if np.size(param) else np.zeros(0)
    if p.size != 4 or not np.all(np.isfinite(p)):
        raise McnError(
            f"Expected param to be four finite numbers [N KAPPA ALPHA BETA]. Received param={param!r}"
        )
    if p[0] < 1 or p[0] != np.round(p[0]):
        raise McnError(
            f"Expected param(1) (the window size N) to be an integer >= 1. Received param={param!r}"
        )
    return int(p[0]), float(p[1]), float(p[2]), float(p[3])


def _window_sums(x: np.ndarray, m1: int, m2: int):
    """Yield ``(t, acc)``: the running sum of squares over channels ``[t-m1, t+m2]``.

    nnnormalize.cpp updates one accumulator incrementally, adding the channel entering the
    window and subtracting the one leaving it, in the precision of ``x``; the rounding of
    that running sum is part of its output. Its ``acc += ap*ap - am*am`` is compiled with
    fast-math as ``(acc + ap*ap) - am*am``. ``x`` is C x ... .
    """
    depth = x.shape[0]
    acc = np.zeros(x.shape[1:], x.dtype)
    for t in range(-m2, depth):
        tm, tp = t - m1 - 1, t + m2
        if tm >= 0 and tp < depth:
            acc += x[tp] * x[tp]
            acc -= x[tm] * x[tm]
        elif tp < depth:
            acc += x[tp] * x[tp]
        elif tm >= 0:
            acc -= x[tm] * x[tm]
        if t >= 0:
            yield t, acc


def vl_nnnormalize(
    x: np.ndarray, param: Any, dzdy: np.ndarray | None = None, *, exact: bool = False
) -> np.ndarray:
    """Cross-channel LRN; mirrors matlab/vl_nnnormalize.m and src/bits/nnnormalize.cpp (CPU).

    ``param = [N KAPPA ALPHA BETA]``; ``y_k = x_k * L_k^(-BETA)`` with
    ``L_k = KAPPA + ALPHA * sum_{q in [k-m1, k+m2]} x_q^2``, ``m1 = floor((N-1)/2)``,
    ``m2 = ceil((N-1)/2)``, clipped to the channels present (ALPHA is not divided by N).
    Backward: ``dzdx_q = dzdy_q L_q^(-BETA) - x_q * sum_{k in [q-m2, q+m1]} 2 ALPHA BETA
    dzdy_k x_k L_k^(-BETA) / L_k``, the inner sum taken as a difference of running
    (prefix) sums over channels, as the kernel does.

    Precisions follow the C++ kernel: for float32 data the forward pass forms ``L`` and
    the power in double (``KAPPA``, ``ALPHA``, ``BETA`` are doubles there) and rounds
    ``x * L^-BETA`` once, while the backward pass rounds ``L`` to float32 and uses the
    float32 ``fast_pow``. ``exact=False`` (default) uses :func:`fast_pow`, ``exact=True``
    the exact power in the same precision.
    """
    dt = float_dtype(x)
    x = as_4d(x)
    n, kappa, alpha, beta = _params(param)
    m1 = (n - 1) // 2
    m2 = n - m1 - 1
    power = (lambda a, b: np.power(a, a.dtype.type(b))) if exact else fast_pow
    # Channels first, so that each channel plane is contiguous.
    xc = np.ascontiguousarray(np.moveaxis(x, 2, 0))

    if dzdy is None:
        yc = np.empty_like(xc)
        for t, acc in _window_sums(xc, m1, m2):
            yc[t] = xc[t] * power(kappa + alpha * acc.astype(np.float64), -beta)
        return np.ascontiguousarray(np.moveaxis(yc, 0, 2))

    dzdy = as_4d(dzdy, "dzdy", dtype=dt)
    if dzdy.shape != x.shape:
        raise McnError(f"Expected dzdy to have the shape of x {x.shape}. Received dzdy.shape={dzdy.shape}")
    gc = np.moveaxis(dzdy, 2, 0)
    f = dt.type
    ab2 = f(2 * alpha * beta)
    dzdx = np.empty_like(xc)
    acc2 = np.empty_like(xc)
    for t, acc in _window_sums(xc, m1, m2):
        big_l = (kappa + alpha * acc.astype(np.float64)).astype(dt)
        temp1 = gc[t] * power(big_l, -f(beta))
        dzdx[t] = temp1
        # Source order x * ab2 * temp1 / L; fast-math compiles it as temp1 * (ab2 * x) / L.
        acc2[t] = temp1 * (ab2 * xc[t]) / big_l
    np.cumsum(acc2, axis=0, out=acc2)
    depth = xc.shape[0]
    for t in range(depth):
        q1, q2 = t - m2 - 1, min(t + m1, depth - 1)
        window = acc2[q2] - acc2[q1] if q1 >= 0 else acc2[q2]
        dzdx[t] -= window * xc[t]
    return np.ascontiguousarray(np.moveaxis(dzdx, 0, 2))
