"""Small builders shared by test modules of different packages."""

from __future__ import annotations

import numpy as np

from harness.mcn.net import Layer, Net


def bnorm_layer(r: np.random.RandomState, channels: int, name: str = "bn1") -> Layer:
    """A bnorm layer of ``channels`` channels drawn from ``r``: gains near 1, small biases,
    zero moments; learning rates [1 1 0.1] and no weight decay."""
    return Layer(
        "bnorm",
        name,
        [1 + 0.1 * r.randn(channels, 1), 0.1 * r.randn(channels, 1), np.zeros((channels, 2))],
        learning_rate=np.array([[1.0, 1.0, 0.1]]),
        weight_decay=np.array([[0.0, 0.0]]),
    )


def set_bnorm_moments(
    net: Net, rng: np.random.RandomState, mu_scale: float = 1.0, sigma_min: float = 1.0
) -> None:
    """Give every bnorm layer stored moments (float32 ``[mu sigma]`` rows, one per channel):
    ``mu = mu_scale * randn``, ``sigma = sigma_min + rand``."""
    for layer in net.layers:
        if layer.type == "bnorm":
            c = layer.weights[0].shape[0]
            moments = [rng.randn(c) * mu_scale, sigma_min + rng.rand(c)]
            layer.weights[2] = np.stack(moments, axis=1).astype(np.float32)
