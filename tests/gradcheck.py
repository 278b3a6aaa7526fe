"""Central differences shared by the gradient-check tests."""

from __future__ import annotations

import numpy as np

STEP = 1e-6


def central_difference(f, flat: np.ndarray, i: int, step: float = STEP) -> float:
    """``(f() at flat[i] + step - f() at flat[i] - step) / (2 step)``; ``flat`` is a view of
    what ``f`` reads, changed in place and restored."""
    old = flat[i]
    flat[i] = old + step
    up = f()
    flat[i] = old - step
    down = f()
    flat[i] = old
    return (up - down) / (2 * step)


def numeric_grad(f, x: np.ndarray, step: float = STEP) -> np.ndarray:
    """Central differences of the scalar ``f`` at every element of ``x`` (float64, in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        gflat[i] = central_difference(lambda: f(x), flat, i, step)
    return grad
