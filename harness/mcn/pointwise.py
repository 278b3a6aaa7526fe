"""Pointwise layers: ``vl_nnrelu``, ``vl_nnsigmoid``, ``vl_nnsoftmax`` and ``vl_nndropout``.

These are MatConvNet's plain MATLAB functions, reproduced operation for operation in the
precision of ``x`` (MATLAB mixes a double option into single data by converting the
option to single first).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from harness.mcn.kernels import jit, pointwise_loops, threads
from harness.mcn.options import McnError, as_4d, float_dtype

__all__ = ["vl_nndropout", "vl_nnrelu", "vl_nnsigmoid", "vl_nnsoftmax"]


def _exp(a: np.ndarray) -> np.ndarray:
    """``exp`` as MATLAB/Octave get it from libm: correctly rounded in practice.

    NumPy's own float32 ``exp`` is off by one ulp on many inputs; rounding the float64
    ``exp`` to float32 reproduces libm's ``expf``.
    """
    if a.dtype == np.float32:
        return np.exp(a, dtype=np.float64).astype(np.float32)
    return np.exp(a)


def _x_and_dzdy(x: Any, dzdy: Any) -> tuple[np.ndarray, np.ndarray | None, np.dtype]:
    dt = float_dtype(x)
    x = as_4d(x)
    if dzdy is None:
        return x, None, dt
    dzdy = as_4d(dzdy, "dzdy", dtype=dt)
    if dzdy.shape != x.shape:
        raise McnError(f"Expected dzdy to have the shape of x {x.shape}. Received dzdy.shape={dzdy.shape}")
    return x, dzdy, dt


def vl_nnrelu(x: np.ndarray, dzdy: np.ndarray | None = None, *, leak: float = 0.0) -> np.ndarray:
    """Rectified linear unit; mirrors matlab/vl_nnrelu.m.

    ``leak == 0``: ``y = max(x, 0)``, ``dzdx = dzdy .* (x > 0)``. Otherwise
    ``y = x .* (leak + (1 - leak) * (x > 0))`` and ``dzdx = dzdy .* (leak + (1 - leak) * (x > 0))``.
    The derivative at exactly 0 is the leak (0 for a plain ReLU); the backward pass is
    evaluated on the layer input ``x``.
    """
    x, dzdy, dt = _x_and_dzdy(x, dzdy)
    leak_arr = np.asarray(leak, dtype=float)
    if leak_arr.size != 1 or not np.isfinite(leak_arr):
        raise McnError(f"Expected leak to be a finite scalar. Received leak={leak!r}")
    leak = float(leak_arr.ravel()[0])
    if leak == 0 and jit.available():
        return _relu_compiled(x, dzdy, dt)
    if leak == 0:
        # The passes over memory are shared among the cores by rows (threads.split_rows):
        # each element is computed alone, so the split changes no value.
        zero, out = dt.type(0), np.empty(x.shape, dt)
        if dzdy is None:
            # MATLAB's max(x, 0) ignores NaN, as fmax does.
            threads.split_rows(lambda r: np.fmax(x[r], zero, out=out[r]), x.shape[0], x.size)
        else:
            threads.split_rows(lambda r: np.multiply(dzdy[r], x[r] > zero, out=out[r]), x.shape[0], x.size)
        return out
    # MATLAB forms the factor in double (leak + (1 - leak) need not be exactly 1) and
    # converts it to the class of x before multiplying.
    factor = np.where(x > 0, dt.type(leak + (1 - leak) * 1.0), dt.type(leak))
    return (x if dzdy is None else dzdy) * factor


def _relu_compiled(x: np.ndarray, dzdy: np.ndarray | None, dt: np.dtype) -> np.ndarray:
    """The plain ReLU through harness.mcn.kernels.pointwise_loops: the numpy above, the
    same bits, one pass (shared among the cores by ranges on large arrays)."""
    flat = np.ascontiguousarray(x, dtype=dt).reshape(-1)
    out = np.empty(x.shape, dt)
    dst = out.reshape(-1)
    if dzdy is None:
        run = partial(pointwise_loops.relu_forward, flat, dst)
    else:
        run = partial(
            pointwise_loops.relu_backward, flat, np.ascontiguousarray(dzdy, dtype=dt).reshape(-1), dst
        )
    threads.split_rows(lambda r: run(r.start, r.stop), flat.size, flat.size)
    return out


def vl_nnsigmoid(x: np.ndarray, dzdy: np.ndarray | None = None) -> np.ndarray:
    """Logistic sigmoid; mirrors matlab/vl_nnsigmoid.m.

    ``y = 1 ./ (1 + exp(-x))``; ``dzdx = dzdy .* (y .* (1 - y))`` with ``y`` recomputed from ``x``.
    """
    x, dzdy, dt = _x_and_dzdy(x, dzdy)
    one = dt.type(1)
    with np.errstate(over="ignore"):
        y = one / (one + _exp(-x))
    if dzdy is None:
        return y
    return dzdy * (y * (one - y))


def vl_nnsoftmax(x: np.ndarray, dzdy: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the channel axis at every pixel; mirrors matlab/vl_nnsoftmax.m.

    ``E = exp(x - max(x, [], 3))``, ``y = E ./ sum(E, 3)``;
    ``dzdx = y .* (dzdy - sum(dzdy .* y, 3))`` with ``y`` recomputed from ``x``.
    """
    x, dzdy, dt = _x_and_dzdy(x, dzdy)
    e = _exp(x - x.max(axis=2, keepdims=True))
    y = e / _channel_sum(e)
    if dzdy is None:
        return y
    return y * (dzdy - _channel_sum(dzdy * y))


def _channel_sum(a: np.ndarray) -> np.ndarray:
    """``sum(a, 3)`` accumulated channel by channel in the precision of ``a``, as MATLAB does."""
    s = a[:, :, :1].copy()
    for k in range(1, a.shape[2]):
        s += a[:, :, k : k + 1]
    return s


def vl_nndropout(
    x: np.ndarray,
    dzdy: np.ndarray | None = None,
    *,
    rate: float = 0.5,
    mask: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    return_mask: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Inverted dropout; mirrors matlab/vl_nndropout.m.

    ``y = mask .* x`` and ``dzdx = mask .* dzdy``, where ``mask`` holds ``1 / (1 - rate)``
    (in the precision of ``x``) or 0. Without ``mask`` one is drawn as MatConvNet does,
    ``scale * (rand(size(x), 'single') >= rate)``, from ``rng`` (a ``np.random.Generator``,
    default ``np.random.default_rng()``); MATLAB's own random stream is not reproduced,
    so pass ``mask`` for determinism. The backward pass requires ``mask`` (MatConvNet only
    warns and draws a fresh, unrelated mask). ``return_mask=True`` returns ``(y, mask)``
    (or ``(dzdx, mask)``), like ``[y, mask] = vl_nndropout(...)``.
    """
    x, dzdy, dt = _x_and_dzdy(x, dzdy)
    rate_arr = np.asarray(rate, dtype=float)
    if rate_arr.size != 1 or not (0 <= float(rate_arr.ravel()[0]) < 1):
        raise McnError(f"Expected rate in [0, 1). Received rate={rate!r}")
    rate = float(rate_arr.ravel()[0])
    if mask is None:
        if dzdy is not None:
            raise McnError(
                "Expected mask for the backward pass (the forward pass's mask). Received mask=None"
            )
        if rng is None:
            rng = np.random.default_rng()
        elif not isinstance(rng, np.random.Generator):
            raise McnError(f"Expected rng to be a numpy.random.Generator. Received rng={rng!r}")
        scale = dt.type(1 / (1 - rate))
        mask = scale * (rng.random(x.shape, dtype=np.float32) >= rate).astype(dt)
    else:
        mask_arr = np.asarray(mask)
        if not (np.issubdtype(mask_arr.dtype, np.number) or mask_arr.dtype == bool):
            raise McnError(f"Expected mask to be numeric. Received mask.dtype={mask_arr.dtype}")
        if mask_arr.ndim > 4 or as_4d(mask_arr, "mask").shape != x.shape:
            raise McnError(
                f"Expected mask to have the shape of x {x.shape}. Received mask.shape={mask_arr.shape}"
            )
        mask = as_4d(mask_arr, "mask")
    out = mask.astype(dt, copy=False) * (x if dzdy is None else dzdy)
    return (out, mask) if return_mask else out
