"""Central differences shared by the gradient-check tests."""

from __future__ import annotations

import numpy as np

STEP = 1e-6


def numeric_grad(f, x: np.ndarray, step: float = STEP) -> np.ndarray:
    """Central differences of the scalar ``f`` at every element of ``x`` (float64, in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + step
        up = f(x)
        flat[i] = old - step
        down = f(x)
        flat[i] = old
        gflat[i] = (up - down) / (2 * step)
    return grad
