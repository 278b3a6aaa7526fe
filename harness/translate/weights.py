"""Weight transfer between a MatConvNet net and a Keras model, both ways.

The only layout moves of the project live here:
- data: MatConvNet ``H x W x C x N`` <-> Keras ``N x H x W x C`` (``to_nhwc``/``to_hwcn``);
- conv kernels: none at all (MatConvNet's ``FH x FW x FC x K`` is Keras'
  ``(kh, kw, in_channels // groups, filters)``); biases ``1 x K`` <-> ``(K,)``;
- a fully-connected conv as Flatten + Dense: ``F.reshape(-1, K)`` (row-major over
  ``(H, W, C)``, which is what Keras' Flatten produces; MATLAB's ``F(:)`` is column-major);
- bnorm moments ``[mu, sigma]`` <-> ``moving_mean = mu``, ``moving_variance = sigma^2 - eps``
  (Keras adds its epsilon back; MatConvNet's sigma already contains it).
"""

from __future__ import annotations

import numpy as np

from harness.mcn.net import Net
from harness.mcn.options import McnError, is_empty

__all__ = [
    "to_nhwc",
    "to_hwcn",
    "conv_to_keras",
    "dense_kernel",
    "dense_kernel_to_filters",
    "load_weights",
    "net_from_keras",
    "keras_layer_for",
]


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """MatConvNet data ``H x W x C x N`` -> Keras ``N x H x W x C``."""
    return np.ascontiguousarray(np.asarray(x).transpose(3, 0, 1, 2))


def to_hwcn(x: np.ndarray) -> np.ndarray:
    """Keras ``N x H x W x C`` (or ``N x K``) -> MatConvNet ``H x W x C x N``."""
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[:, None, None, :]
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def conv_to_keras(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f)
    return f.reshape(f.shape + (1,) * (4 - f.ndim))


def dense_kernel(f: np.ndarray) -> np.ndarray:
    """Filters covering the whole input (``FH x FW x C x K``) -> a Dense kernel for Flatten."""
    f = conv_to_keras(f)
    return f.reshape(-1, f.shape[3])


def dense_kernel_to_filters(kernel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(kernel).reshape(shape)


def keras_layer_for(model, name: str):
    from harness.translate.build import keras_name

    try:
        return model.get_layer(keras_name(name))
    except ValueError:
        return None


def _bias(b) -> np.ndarray:
    return np.asarray(b).ravel()


def load_weights(model, net: Net) -> None:
    """Copy every parameter of ``net`` into the same-named layers of ``model``."""
    for i, layer in enumerate(net.layers):
        if not layer.weights or layer.type not in ("conv", "convt", "bnorm"):
            continue
        k = keras_layer_for(model, layer.name)
        if k is None:
            raise McnError(f"layer {i + 1} '{layer.name}': no Keras layer of that name in the model")
        dtype = k.variables[0].dtype if k.variables else "float64"
        k.set_weights([np.asarray(v, dtype=dtype) for v in keras_values(layer, k)])


def keras_values(layer, klayer) -> list[np.ndarray]:
    """MatConvNet parameters of ``layer`` in the order and layout of ``klayer.get_weights()``."""
    cls = type(klayer).__name__
    w = layer.weights
    if layer.type == "bnorm":
        g, b, m = (np.asarray(v) for v in w[:3])
        eps = float(np.asarray(layer.get("epsilon", 1e-5)).ravel()[0])
        eps_k = float(getattr(klayer, "epsilon", eps))
        m = m.reshape(-1, 2)
        return [g.ravel(), b.ravel(), m[:, 0], m[:, 1].astype(np.float64) ** 2 - eps_k]
    f = w[0]
    b = w[1] if len(w) > 1 else None
    if cls == "AddBias":
        return [_bias(b)]
    if cls == "Dense":
        values = [dense_kernel(f)]
    else:
        values = [conv_to_keras(f)]
    if not is_empty(b):
        values.append(_bias(b))
    return values


def net_from_keras(model, net: Net) -> Net:
    """A copy of ``net`` whose parameters are read back from ``model`` (the inverse of
    ``load_weights``): shapes and dtypes are ``net``'s own."""
    out = net.copy()
    for layer in out.layers:
        if not layer.weights or layer.type not in ("conv", "convt", "bnorm"):
            continue
        k = keras_layer_for(model, layer.name)
        if k is None:
            raise McnError(f"layer '{layer.name}': no Keras layer of that name in the model")
        values = [np.asarray(v) for v in k.get_weights()]
        if layer.type == "bnorm":
            g, b, m = layer.weights[:3]
            eps_k = float(getattr(k, "epsilon", 1e-5))
            sigma = np.sqrt(values[3].astype(np.float64) + eps_k)
            moments = np.stack([values[2], sigma], axis=1).reshape(np.shape(m))
            layer.weights[:3] = [
                values[0].reshape(np.shape(g)).astype(np.asarray(g).dtype),
                values[1].reshape(np.shape(b)).astype(np.asarray(b).dtype),
                moments.astype(np.asarray(m).dtype),
            ]
            continue
        f = layer.weights[0]
        b = layer.weights[1] if len(layer.weights) > 1 else None
        if type(k).__name__ == "AddBias":
            layer.weights[1] = values[0].reshape(np.shape(b)).astype(np.asarray(b).dtype)
            continue
        layer.weights[0] = values[0].reshape(np.shape(f)).astype(np.asarray(f).dtype)
        if not is_empty(b):
            layer.weights[1] = values[1].reshape(np.shape(b)).astype(np.asarray(b).dtype)
    return out
