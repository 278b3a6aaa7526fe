"""Batch normalisation (``vl_nnbnorm``): batch-statistics and given-moments modes, forward and backward.

The arithmetic follows MatConvNet's CPU kernels (src/bits/nnbnorm.cu, compiled as nnbnorm.cpp)
operation by operation, in x's dtype: per-channel sums accumulated sequentially in MatConvNet's
memory order (H fastest, then W, then N), the variance as ``E[x^2] - mu^2`` clamped at 0, and
the same association of every product and quotient. In float32 this reproduces MatConvNet's
rounding, not just its formula.

The numpy below is the definition. When numba is installed the passes over memory run as
compiled loops instead (harness.mcn.kernels.bnorm_loops: the same operations in the same
order, the same bits, about four times faster); ``_numpy_*`` are the definitions the tests
hold them to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.mcn.kernels import bnorm_loops, jit
from harness.mcn.options import McnError, as_4d, float_dtype, is_empty

__all__ = ["vl_nnbnorm"]


def _channel_rows(x: np.ndarray) -> np.ndarray:
    """H x W x C x N as an (H*W) x (C*N) array (a view when x is C-contiguous): a per-channel
    vector broadcasts over it as one long row (``_per_channel``), where over H x W x C x N
    numpy would run one loop of N numbers per pixel and channel."""
    h, w, c, n = x.shape
    return x.reshape(h * w, c * n)


def _per_channel(v: np.ndarray, n: int) -> np.ndarray:
    """A length-C vector as the row of C*N numbers that matches ``_channel_rows``."""
    return np.repeat(v, n)


def _channel_columns(a: np.ndarray) -> np.ndarray:
    """H x W x C x N as a C-contiguous (N*W*H) x C array: each channel's values down its
    column in MatConvNet's memory order (H fastest, then W, then N). In two copies: each
    pixel's C x N block turned to N x C, then the blocks moved as runs of C numbers, which
    is about twice as fast as numpy's one strided copy (each element of which reads
    another cache line)."""
    pixels_nc = np.ascontiguousarray(a.transpose(0, 1, 3, 2))
    return np.ascontiguousarray(pixels_nc.transpose(2, 1, 0, 3)).reshape(-1, a.shape[2])


def _sequential_sum(columns: np.ndarray) -> np.ndarray:
    """Per-channel sums added one element at a time in columns' dtype, like nnbnorm's C++ loop.

    ``np.add.reduce`` down axis 0 of a C-contiguous M x C array adds row after row, its inner
    loop running across the channels: each channel's sum is sequential (and the channels are
    added side by side, at memory speed). With one channel the array is a single contiguous
    run, which numpy sums pairwise, so ``np.add.accumulate`` (sequential by definition) is
    used there. tests/mcn/test_bnorm.py checks both against the one-at-a-time definition.
    """
    if columns.shape[1] < 2:
        # accumulate starts from the first value, the C++ loop (and reduce) from +0: the two
        # differ only when every value is -0 (-0 against +0), which adding +0 settles
        return np.add.accumulate(columns, axis=0, dtype=columns.dtype)[-1] + columns.dtype.type(0)
    return np.add.reduce(np.ascontiguousarray(columns), axis=0, dtype=columns.dtype)


def _numpy_moment_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum x, sum x*x) per channel, sequential in MatConvNet's order."""
    xc = _channel_columns(x)
    return _sequential_sum(xc), _sequential_sum(xc * xc)


def _numpy_derivative_sums(x: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, ...]:
    """(sum d*x, sum d, sum x, sum x*x) per channel, sequential in MatConvNet's order."""
    xc, dc = _channel_columns(x), _channel_columns(d)
    return _sequential_sum(dc * xc), _sequential_sum(dc), *_numpy_moment_sums(x)


def _numpy_normalize(x: np.ndarray, mu: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(x - mu) * a + b per channel, in place: the same roundings without temporaries."""
    n = x.shape[3]
    y = _channel_rows(x) - _per_channel(mu, n)
    y *= _per_channel(a, n)
    y += _per_channel(b, n)
    return y.reshape(x.shape)


def _numpy_normalize_backward(x: np.ndarray, d: np.ndarray, mu, g2, db, g1) -> np.ndarray:  # noqa: ANN001
    """(d - db) * g1 - (x - mu) * g2 per channel, in place: the same roundings without temporaries."""
    n = x.shape[3]
    centred = _channel_rows(x) - _per_channel(mu, n)
    centred *= _per_channel(g2, n)
    dx = _channel_rows(d) - _per_channel(db, n)
    dx *= _per_channel(g1, n)
    dx -= centred
    return dx.reshape(x.shape)


def _passes() -> tuple[Any, Any, Any, Any]:
    """(moment_sums, derivative_sums, normalize, normalize_backward): compiled when numba is
    there, else the numpy definitions."""
    if jit.available():
        loops = bnorm_loops
        return loops.moment_sums, loops.derivative_sums, loops.normalize, loops.normalize_backward
    return _numpy_moment_sums, _numpy_derivative_sums, _numpy_normalize, _numpy_normalize_backward


def _vector(value: Any, name: str, depth: int, dt: np.dtype) -> np.ndarray:
    """Gains or biases: any array of C numbers (vl_nnbnorm reshapes them to C x 1)."""
    a = np.asarray(value)
    if not np.issubdtype(a.dtype, np.number) or a.size != depth:
        raise McnError(
            f"Expected {name} to hold one value per channel of x ({depth}, e.g. C x 1). "
            f"Received {name}.shape={a.shape}"
        )
    return a.reshape(depth).astype(dt)


def _given_moments(moments: Any, depth: int, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(moments)
    if (
        not np.issubdtype(a.dtype, np.number)
        or a.ndim < 2
        or a.shape[:2] != (depth, 2)
        or any(s != 1 for s in a.shape[2:])
    ):
        raise McnError(
            f"Expected moments to be a C x 2 array [mu, sigma] with C={depth}. "
            f"Received moments.shape={a.shape}"
        )
    a = a.reshape(depth, 2).astype(dt)
    if not np.all(np.isfinite(a)) or np.any(a[:, 1] <= 0):
        raise McnError(
            "Expected moments to be finite with positive sigmas (second column, epsilon "
            f"already included). Received moments={a.tolist()}"
        )
    return np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(a[:, 1])


def _epsilon(epsilon: Any) -> float:
    if np.size(epsilon) != 1 or isinstance(epsilon, bool | np.bool_):
        raise McnError(f"Expected epsilon to be a non-negative scalar. Received epsilon={epsilon!r}")
    try:
        e = float(np.asarray(epsilon).reshape(()))
    except (TypeError, ValueError) as err:
        raise McnError(f"Expected epsilon to be a non-negative scalar. Received epsilon={epsilon!r}") from err
    if not np.isfinite(e) or e < 0:
        raise McnError(f"Expected epsilon to be a non-negative scalar. Received epsilon={epsilon!r}")
    return e


def vl_nnbnorm(
    x: np.ndarray,
    g: Any,
    b: Any,
    dzdy: Any = None,
    *,
    epsilon: float = 1e-4,
    moments: Any = None,
    return_moments: bool = False,
) -> Any:
    """Batch normalisation; mirrors matlab/vl_nnbnorm.m (MEX src/vl_nnbnorm.cu, src/bits/nnbnorm.cu).

    Per channel k over H, W and N (M = H*W*N values)::

        mu = sum(x) / M,  s2 = max(0, sum(x^2) / M - mu^2),  sigma = sqrt(s2 + epsilon)
        y  = (g / sigma) * (x - mu) + b

    ``moments`` (a C x 2 array ``[mu, sigma]``, sigma including epsilon) replaces the batch
    statistics; epsilon is then not used. Forward returns ``y``, or ``(y, moments)`` with
    ``return_moments=True`` (the batch moments, or the given ones).

    Backward (``dzdy`` given) returns ``(dzdx, dzdg, dzdb, moments)``::

        dzdb = sum(dzdy),  dzdg = (sum(dzdy * x) - mu * dzdb) / sigma
        dzdx = (g / sigma) * (dzdy - dzdb / M) - (g / sigma) * dzdg / (M * sigma) * (x - mu)

    The fourth output is the moments ``[mu, sigma]`` used, NOT a derivative: MatConvNet's
    ``[dzdx, dzdg, dzdb, moments]`` returns the batch moments (vl_simplenn stores them as the
    moments "derivative" that cnn_train averages in). With ``moments`` given, the backward
    pass still uses the batch-statistics formula above, only with the given mu and sigma
    (MatConvNet's BatchNormBackwardWithMoment), not the derivative through fixed moments.

    ``dzdg`` and ``dzdb`` are C x 1 whatever the shape of g and b (the MEX reshapes them to
    C x 1 before sizing the outputs); moments are C x 2. g, b and moments are cast to x's dtype.
    """
    dt = float_dtype(x)
    x = as_4d(x)
    if x.size == 0:
        raise McnError(f"Expected x to be non-empty. Received x.shape={x.shape}")
    depth = x.shape[2]
    g = _vector(g, "g", depth, dt)
    b = _vector(b, "b", depth, dt)
    eps = dt.type(_epsilon(epsilon))
    given = not is_empty(moments)
    if given:
        mu, sigma = _given_moments(moments, depth, dt)
    mass = dt.type(x.shape[0] * x.shape[1] * x.shape[3])
    x = np.ascontiguousarray(x, dtype=dt)
    moment_sums, derivative_sums, normalize, normalize_backward = _passes()

    if is_empty(dzdy):
        if not given:
            s1, s2 = moment_sums(x)
            mu = s1 / mass
            sigma = np.sqrt(np.maximum(dt.type(0), s2 / mass - mu * mu) + eps)
        y = normalize(x, mu, g / sigma, b)
        return (y, np.stack([mu, sigma], axis=1)) if return_moments else y

    dzdy = as_4d(np.asarray(dzdy), "dzdy")
    if dzdy.shape != x.shape:
        raise McnError(f"Expected dzdy to have the shape of x {x.shape}. Received dzdy.shape={dzdy.shape}")
    dzdy = np.ascontiguousarray(dzdy, dtype=dt)
    dzdg, dzdb, s1, s2 = derivative_sums(x, dzdy)
    if not given:
        mu = s1 / mass
        sigma = np.sqrt(np.maximum(dt.type(0), s2 / mass - mu * mu) + eps)
    dzdg = (dzdg - mu * dzdb) / sigma
    g1 = g / sigma
    g2 = g1 * dzdg / (mass * sigma)
    dzdx = normalize_backward(x, dzdy, mu, g2, dzdb / mass, g1)
    moments_used = np.stack([mu, sigma], axis=1)
    return dzdx, dzdg.reshape(depth, 1), dzdb.reshape(depth, 1), moments_used
