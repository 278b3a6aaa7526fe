"""Code a user writes once and shares between ports: intermediate outputs ("taps") keyed by
MatConvNet layer name, weight moves, a counting average pool and an LRN written with
``keras.ops``. Part of the catalogue (see ports.py)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import weakref

import keras
import numpy as np
from keras import layers, ops

# ---------------------------------------------------------------------------------------------
# Intermediate outputs ("taps"), keyed by MatConvNet layer name
# ---------------------------------------------------------------------------------------------

TAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tapped(model: keras.Model, taps: dict) -> keras.Model:
    """Remember which symbolic tensors of a Sequential/functional model are MatConvNet outputs."""
    TAPS[model] = taps
    return model


def trace(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``model`` on ``x`` and return its MatConvNet-layer outputs that it can observe."""
    if hasattr(model, "trace"):
        return model.trace(x)
    taps = TAPS[model]
    probe = keras.Model(model.inputs[0], list(taps.values()))
    outs = probe(x)
    outs = outs if isinstance(outs, list | tuple) else [outs]
    return {k: keras.ops.convert_to_numpy(v) for k, v in zip(taps, outs, strict=True)}


def taps_by_layer(model: keras.Model, names: list[str]) -> dict:
    present = {layer.name for layer in model.layers}
    return {n: model.get_layer(n).output for n in names if n in present}


# ---------------------------------------------------------------------------------------------
# Helpers a user would write once and share
# ---------------------------------------------------------------------------------------------


def conv_params(net, name: str, bug: str | None = None) -> list[np.ndarray]:
    """[kernel, bias] of a MatConvNet conv layer for Conv2D: FH x FW x FC x K is Keras' layout
    already (no flip, no transpose)."""
    f = net[name].filters
    if bug == "kernel_flip":  # "convolution flips the kernel" -- MatConvNet does not
        f = f[::-1, ::-1]
    elif bug == "kernel_hw_transposed":  # "MATLAB is column-major, so swap H and W"
        f = np.transpose(f, (1, 0, 2, 3))
    b = net[name].bias
    return [np.ascontiguousarray(f)] + ([] if b is None else [b])


def bnorm_params(net, name: str, bug: str | None = None) -> list[np.ndarray]:
    """[gamma, beta, moving_mean, moving_variance] for keras BatchNormalization(epsilon=eps).

    MatConvNet stores moments [mu, sigma] with sigma = sqrt(var + eps) and uses sigma as given;
    Keras divides by sqrt(moving_variance + epsilon), hence moving_variance = sigma^2 - eps.
    """
    layer = net[name]
    g, b, moments = layer.weights
    mu, sigma = moments[:, 0], moments[:, 1]
    var = sigma.astype(np.float64) ** 2 - layer.epsilon
    if bug == "bn_var_is_sigma":
        var = sigma
    if bug == "bn_gamma_beta_swapped":
        g, b = b, g
    return [g, b, mu, var]


class CountAvgPool2D(layers.Layer):
    """MatConvNet 'avg' pooling: zero padding that is left out of the divisor."""

    def __init__(self, pool, stride, pad, **kwargs):
        super().__init__(**kwargs)
        self.pool, self.stride, self.pad = pool, stride, pad  # pad = (top, bottom, left, right)

    def call(self, x):
        t, b, l, r = self.pad
        spec = [[0, 0], [t, b], [l, r], [0, 0]]
        total = ops.average_pool(ops.pad(x, spec), self.pool, self.stride, padding="valid")
        count = ops.average_pool(ops.pad(ops.ones_like(x), spec), self.pool, self.stride, padding="valid")
        return total / count


def lrn_with_ops(x, n, kappa, alpha, beta):
    """vl_nnnormalize in keras.ops: y = x / (kappa + alpha * sum_window x^2)^beta, where the
    window for channel c is [c - floor((n-1)/2), c + ceil((n-1)/2)] (as normalize_cpu.cpp)."""
    c = x.shape[-1]
    m1 = (int(n) - 1) // 2
    m2 = int(n) - 1 - m1
    band = np.zeros((c, c))
    for j in range(c):
        band[max(0, j - m1) : min(c, j + m2 + 1), j] = 1.0
    s = ops.matmul(ops.square(x), band.astype(keras.backend.standardize_dtype(x.dtype)))
    return x / ops.power(kappa + alpha * s, beta)


# ---------------------------------------------------------------------------------------------
# 1. keras.Sequential -- seed network
# ---------------------------------------------------------------------------------------------


class TracedModel(keras.Model):
    """A subclassed model whose ``forward(x, taps)`` records its intermediate results in
    ``taps`` (a dict, or None) through ``keep = self.keeper(taps)``; ``call`` is ``forward``."""

    def call(self, x):
        return self.forward(x)

    @staticmethod
    def keeper(taps):
        """``keep(name, t)``: records ``t`` under ``name`` when ``taps`` is a dict; returns ``t``."""

        def keep(name, t):
            if taps is not None:
                taps[name] = t
            return t

        return keep

    def trace(self, x):
        taps: dict = {}
        self.forward(ops.convert_to_tensor(x), taps)
        return {k: ops.convert_to_numpy(v) for k, v in taps.items()}
