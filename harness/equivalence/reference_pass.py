"""The MatConvNet side of a comparison: ``vl_simplenn`` on the batch, as ``compare`` runs it.

LRN with the exact power (Keras has no ``fast_pow``), ``dzdy = 1``, dropout masks drawn
from ``np.random.default_rng(seed)`` (and handed to the Keras side in 'normal' mode).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.mcn.geometry import layer_output_shapes
from harness.mcn.net import Net
from harness.mcn.simplenn import Res, vl_simplenn

__all__ = ["cast_net", "dropout_masks", "run_reference"]


def cast_net(net: Net, dtype) -> Net:
    """A copy of ``net`` whose non-empty parameters are ``dtype`` arrays."""
    out = net.copy()
    for layer in out.layers:
        layer.weights = [np.asarray(w, dtype=dtype) if np.size(w) else np.asarray(w) for w in layer.weights]
    return out


def run_reference(
    net: Net, x: np.ndarray, labels: Any, *, mode: str = "normal", dialect: str = "master", seed: int = 0
) -> list[Res]:
    """vl_simplenn's ``res`` for a tidied ``net``, forward and backward with ``dzdy = 1``
    (a net without a loss layer: ones of its output's shape, the derivatives of the sum
    of its outputs, which the Keras side takes too)."""
    rng = np.random.default_rng(seed)
    labels = None if labels is None else np.asarray(labels, dtype=np.float64)
    dzdy: Any = 1.0
    if net.layers and net.layers[-1].type not in ("softmaxloss", "loss"):
        h, w, c = layer_output_shapes(net, x.shape[:3])[-1]
        dzdy = np.ones((h, w, c, x.shape[3]), dtype=x.dtype)
    return vl_simplenn(net, x, dzdy, labels, mode=mode, dialect=dialect, lrn_exact=True, rng=rng)


def dropout_masks(net: Net, res: list[Res], mode: str) -> dict[int, np.ndarray]:
    """The dropout masks the reference drew (``H x W x C x N``), by layer index; none
    outside 'normal' mode."""
    return {
        i: res[i + 1].aux
        for i, layer in enumerate(net.layers)
        if layer.type == "dropout" and mode == "normal"
    }
