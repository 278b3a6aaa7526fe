"""Planting a translation bug: the Keras side of the bug catalogue (``harness.testing.bugs``).

Every ``plant_*`` function takes the tidied net, the faithful translation
``harness.translate.to_keras(net)`` and the 0-based index of the MatConvNet layer, and
returns a new functional model rebuilt from the model's layer chain (``rebuild``: every
layer cloned with its weights, one spot changed), so the faithful model is left alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.geometry import layer_output_shapes
from harness.mcn.net import Net
from harness.mcn.options import pad4, pair
from harness.translate.build import keras_name
from harness.translate.weights import embed_groups

if TYPE_CHECKING:
    import keras

__all__ = [
    "KERAS_BNORM_EPSILON",
    "clone_layer",
    "edit_layer",
    "flip_kernel",
    "keras_run",
    "kernel_planter",
    "matlab_order_dense_kernel",
    "plant_bnorm_epsilon",
    "plant_extra_relu",
    "plant_flatten_order",
    "plant_missing_groups",
    "plant_missing_relu",
    "plant_off_by_one",
    "plant_softmax_twice",
    "plant_wrong_padding_side",
    "plant_wrong_stride",
    "plant_zero_padded_pooling",
    "rebuild",
    "transpose_kernel",
]

KERAS_BNORM_EPSILON = 1e-3  # BatchNormalization's default

Edit = Callable[[Any, Any], Any]


# ------------------------------------------------------------------------------ rebuilding


def keras_run(model: keras.Model, name: str) -> list[str]:
    """The Keras layers to_keras made for MatConvNet layer ``name``, in model order."""
    kn = keras_name(name)
    own = {kn, f"{kn}_pad", f"{kn}_subsample", f"{kn}_crop"}
    return [l.name for l in model.layers if l.name in own]


def clone_layer(kl, x, changes: dict | None = None, weights: list | None = None):
    """Apply a fresh copy of Keras layer ``kl`` (config ``changes`` applied) to ``x``;
    the copy holds ``weights`` or ``kl``'s own."""
    config = kl.get_config()
    config.update(changes or {})
    new = type(kl).from_config(config)
    y = new(x)
    values = kl.get_weights() if weights is None else weights
    if values:
        new.set_weights(
            [np.asarray(v, dtype=w.dtype) for v, w in zip(values, new.get_weights(), strict=True)]
        )
    return y


def rebuild(
    model: keras.Model, edit: Edit | None = None, tail: Callable[[Any], Any] | None = None
) -> keras.Model:
    """A new functional model: ``model``'s layer chain with every layer cloned, except
    that ``edit(klayer, x)`` may return the tensor to use instead (``None``: clone), and
    ``tail(x)`` is applied at the end."""
    import keras

    spec = model.inputs[0]
    inputs = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name="input")
    x = inputs
    for kl in model.layers:
        if type(kl).__name__ == "InputLayer":
            continue
        y = edit(kl, x) if edit is not None else None
        x = clone_layer(kl, x) if y is None else y
    if tail is not None:
        x = tail(x)
    return keras.Model(inputs, x, name=f"{model.name}_planted")


def edit_layer(name: str, fn: Edit) -> Edit:
    """An edit applying ``fn`` to the Keras layer named after MatConvNet layer ``name``."""
    kn = keras_name(name)
    return lambda kl, x: fn(kl, x) if kl.name == kn else None


def _dtype(model: keras.Model) -> str:
    return str(model.inputs[0].dtype)


@functools.cache
def _roll_classes():
    import keras

    class RollClasses(keras.layers.Layer):
        """``y[..., k] = x[..., (k + shift) % K]``: class k's score read from class k + shift."""

        def __init__(self, shift: int = 1, **kwargs):
            super().__init__(**kwargs)
            self.shift = int(shift)

        def call(self, x):
            return keras.ops.roll(x, -self.shift, axis=-1)

        def get_config(self):
            return {**super().get_config(), "shift": self.shift}

    return RollClasses


# ------------------------------------------------------------------------------ the mistakes


def plant_missing_groups(net: Net, model: keras.Model, i: int) -> keras.Model:
    """Conv2D without ``groups``, the grouped kernel embedded block-diagonally."""
    channels = layer_output_shapes(net)[i][2]

    def edit(kl, x):
        values = kl.get_weights()
        full = embed_groups(values[0], channels // values[0].shape[2])
        return clone_layer(kl, x, {"groups": 1}, [full, *values[1:]])

    return rebuild(model, edit_layer(net.layers[i].name, edit))


def plant_zero_padded_pooling(net: Net, model: keras.Model, i: int) -> keras.Model:
    import keras

    layer = net.layers[i]
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    dt = _dtype(model)

    def edit(kl, x):
        kn = kl.name
        x = keras.layers.ZeroPadding2D(((pt, pb), (pl, pr)), name=f"{kn}_pad", dtype=dt)(x)
        cls = (
            keras.layers.MaxPooling2D
            if layer.get("method", "max") == "max"
            else keras.layers.AveragePooling2D
        )
        size, stride = pair(layer.pool, "pool"), pair(layer.stride, "stride")
        return cls(size, stride, padding="valid", name=kn, dtype=dt)(x)

    return rebuild(model, edit_layer(layer.name, edit))


def kernel_planter(transform: Callable[[np.ndarray], np.ndarray]) -> Callable[[Net, Any, int], Any]:
    """A weight-transfer bug: the layer's kernel passed through ``transform``."""

    def plant(net: Net, model: keras.Model, i: int) -> keras.Model:
        def edit(kl, x):
            values = kl.get_weights()
            return clone_layer(kl, x, weights=[transform(values[0]), *values[1:]])

        return rebuild(model, edit_layer(net.layers[i].name, edit))

    return plant


def flip_kernel(f: np.ndarray) -> np.ndarray:
    return f[::-1, ::-1].copy()


def transpose_kernel(f: np.ndarray) -> np.ndarray:
    # FW x FH read where FH x FW was stored, then reshaped to the expected FH x FW
    return np.ascontiguousarray(f.transpose(1, 0, 2, 3)).reshape(f.shape)


def plant_wrong_stride(net: Net, model: keras.Model, i: int) -> keras.Model:
    kn = keras_name(net.layers[i].name)

    def edit(kl, x):
        if kl.name == f"{kn}_subsample":
            return x  # the stride of a dilated conv lives here
        if kl.name == kn:
            return clone_layer(kl, x, {"strides": (1, 1)})
        return None

    return rebuild(model, edit)


def plant_wrong_padding_side(net: Net, model: keras.Model, i: int) -> keras.Model:
    layer = net.layers[i]
    kn = keras_name(layer.name)
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    swapped = ((pb, pt), (pr, pl))

    def edit(kl, x):
        if layer.type == "conv" and kl.name == f"{kn}_pad":
            return clone_layer(kl, x, {"padding": swapped})
        if layer.type == "pool" and kl.name == kn:
            return clone_layer(kl, x, {"padding": swapped})
        return None

    return rebuild(model, edit)


def plant_missing_relu(net: Net, model: keras.Model, i: int) -> keras.Model:
    return rebuild(model, edit_layer(net.layers[i].name, lambda kl, x: x))


def plant_extra_relu(net: Net, model: keras.Model, i: int) -> keras.Model:
    import keras

    last = keras_run(model, net.layers[i].name)[-1]

    def edit(kl, x):
        if kl.name != last:
            return None
        y = clone_layer(kl, x)
        return keras.layers.ReLU(name=f"{keras_name(net.layers[i].name)}_extra_relu", dtype=_dtype(model))(y)

    return rebuild(model, edit)


def plant_bnorm_epsilon(net: Net, model: keras.Model, i: int) -> keras.Model:
    edit = edit_layer(net.layers[i].name, lambda kl, x: clone_layer(kl, x, {"epsilon": KERAS_BNORM_EPSILON}))
    return rebuild(model, edit)


def plant_softmax_twice(net: Net, model: keras.Model, i: int) -> keras.Model:
    import keras

    dt = _dtype(model)

    def tail(x):
        x = keras.layers.Softmax(name="prob", dtype=dt)(x)
        return keras.layers.Softmax(name="prob_again", dtype=dt)(x)

    return rebuild(model, tail=tail)


def matlab_order_dense_kernel(f: np.ndarray) -> np.ndarray:
    """The mistaken Dense kernel: MATLAB's column-major ``F(:)`` order, not Flatten's."""
    return f.reshape(-1, f.shape[3], order="F")


def plant_flatten_order(net: Net, model: keras.Model, i: int) -> keras.Model:
    import keras

    dt = _dtype(model)

    def edit(kl, x):
        values = kl.get_weights()
        f = values[0]
        y = keras.layers.Flatten(name=f"{kl.name}_flatten", dtype=dt)(x)
        dense = keras.layers.Dense(f.shape[3], use_bias=len(values) > 1, name=kl.name, dtype=dt)
        y = dense(y)
        dense.set_weights([matlab_order_dense_kernel(f), *values[1:]])
        return y

    return rebuild(model, edit_layer(net.layers[i].name, edit))


def plant_off_by_one(net: Net, model: keras.Model, i: int) -> keras.Model:
    roll = _roll_classes()
    return rebuild(model, tail=lambda x: roll(1, name="labels_0_based", dtype=_dtype(model))(x))
