"""MatConvNet simplenn net -> a faithful Keras 3 model.

Stock layers where they are exact (Conv2D with ``groups``, ZeroPadding2D for any conv
padding, average pooling without padding, ReLU/LeakyReLU, BatchNormalization ...), the custom
layers of ``harness.translate.layers`` where they are not. The model maps ``N x H x W x C``
images to the scores that enter the net's loss layer; the loss itself is
``keras_loss(net, dialect)``. Keras layer names are the MatConvNet layer names (made
safe), with suffixes ``_pad`` and ``_subsample`` on helper layers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from harness.mcn.net import Net
from harness.mcn.options import McnError, is_empty, pad4, pair
from harness.mcn.simplenn import vl_simplenn_tidy
from harness.translate.weights import conv_to_keras, load_weights

if TYPE_CHECKING:
    import keras

__all__ = ["to_keras", "keras_loss", "keras_name", "TranslationError"]


class TranslationError(McnError):
    """A net the translation cannot express; names the layer and field."""


def keras_name(name: str) -> str:
    """A MatConvNet layer name made safe for Keras (names are untrusted input)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))
    return safe or "layer"


def _scalar(value, default: float = 0.0) -> float:
    return default if is_empty(value) else float(np.asarray(value, dtype=float).ravel()[0])


def _input_size(net: Net, input_size) -> tuple[int, int, int]:
    size = input_size if input_size is not None else net.meta.get("inputSize")
    if size is None:
        raise TranslationError(
            "Expected net.meta.inputSize ([H W C]) or input_size=(H, W, C). Received neither"
        )
    vals = [int(v) for v in np.asarray(size, dtype=float).ravel()]
    if len(vals) < 3:
        vals = vals + [1] * (3 - len(vals))
    return vals[0], vals[1], vals[2]


def to_keras(net: Net, dtype: str = "float64", *, input_size=None) -> keras.Model:
    """Build a Keras model exactly equivalent to ``net`` (weights loaded).

    The model's output is the input of the net's final loss layer (the class scores);
    a net without a loss layer maps to its last layer's output. A DagNN network
    (``harness.mcn.DagNet``) is translated by ``dag_build.to_keras_dag`` (``input_size``
    then sizes its one image input).
    """
    import keras

    from harness.mcn.dagnn import DagNet
    from harness.translate import layers as L

    if isinstance(net, DagNet):
        from harness.translate.dag_build import dag_inputs, to_keras_dag

        names = dag_inputs(net)
        sizes = None if input_size is None or len(names) != 1 else {names[0]: tuple(input_size)}
        return to_keras_dag(net, dtype, input_sizes=sizes)
    if dtype not in ("float64", "float32"):
        raise TranslationError(f"Expected dtype 'float64' or 'float32'. Received dtype={dtype!r}")
    net = vl_simplenn_tidy(net)
    h, w, c = _input_size(net, input_size)
    inputs = keras.Input(shape=(h, w, c), dtype=dtype, name="input")
    x = inputs
    used: set[str] = set()
    body = net.layers
    if body and body[-1].type in ("softmaxloss", "loss"):
        body = body[:-1]
    for i, layer in enumerate(body):
        where = f"layer {i + 1} '{layer.name}' ({layer.type})"
        name = keras_name(layer.name)
        while name in used:
            name += "_"
        used.add(name)
        t = layer.type
        kw = {"dtype": dtype}
        if t == "conv":
            f, b = layer.weights[0], layer.weights[1] if len(layer.weights) > 1 else None
            pads = pad4(layer.pad, "pad")
            stride = pair(layer.stride, "stride")
            dilate = pair(layer.get("dilate", 1), "dilate")
            channels = x.shape[-1]
            if any(pads):
                x = keras.layers.ZeroPadding2D(
                    ((pads[0], pads[1]), (pads[2], pads[3])), name=f"{name}_pad", **kw
                )(x)
            if is_empty(f):
                if stride != (1, 1):
                    x = L.Subsample(stride, name=f"{name}_subsample", **kw)(x)
                if not is_empty(b):
                    x = L.AddBias(int(np.size(b)), name=name, **kw)(x)
                continue
            f = conv_to_keras(f)
            fh, fw, fc, k = f.shape
            if channels % fc or k % (channels // fc):
                raise TranslationError(
                    f"{where}: Expected the filter depth {fc} to divide the {channels} input channels "
                    f"into groups that divide the {k} filters. Received weights{{1}} of shape {f.shape}"
                )
            groups = channels // fc
            conv_stride = stride if dilate == (1, 1) else (1, 1)
            x = keras.layers.Conv2D(
                k,
                (fh, fw),
                strides=conv_stride,
                padding="valid",
                dilation_rate=dilate,
                groups=groups,
                use_bias=not is_empty(b),
                name=name,
                **kw,
            )(x)
            if conv_stride != stride:
                # TensorFlow refuses strides > 1 together with dilation > 1.
                x = L.Subsample(stride, name=f"{name}_subsample", **kw)(x)
        elif t == "pool":
            size = pair(layer.pool, "pool")
            stride = pair(layer.stride, "stride")
            pads = pad4(layer.pad, "pad")
            method = layer.get("method", "max")
            if method not in ("max", "avg"):
                raise TranslationError(f"{where}: Expected method 'max' or 'avg'. Received method={method!r}")
            if any(pads) or method == "max":
                # max: MaxPooling2D breaks ties row-major, MatConvNet column-major
                x = L.MatConvNetPooling(
                    size, stride, ((pads[0], pads[1]), (pads[2], pads[3])), method, name=name, **kw
                )(x)
            else:
                x = keras.layers.AveragePooling2D(size, stride, padding="valid", name=name, **kw)(x)
        elif t == "relu":
            leak = _scalar(layer.get("leak", 0.0))
            if leak > 0:
                x = L.MatConvNetLeakyReLU(leak, name=name, **kw)(x)
            else:
                x = keras.layers.ReLU(name=name, **kw)(x)
        elif t == "sigmoid":
            x = keras.layers.Activation("sigmoid", name=name, **kw)(x)
        elif t == "softmax":
            x = keras.layers.Softmax(axis=-1, name=name, **kw)(x)
        elif t in ("lrn", "normalize"):
            p = np.asarray(layer.param, dtype=float).ravel()
            x = L.MatConvNetLRN(int(p[0]), p[1], p[2], p[3], name=name, **kw)(x)
        elif t == "dropout":
            x = keras.layers.Dropout(_scalar(layer.rate, 0.5), name=name, **kw)(x)
        elif t == "bnorm":
            lr = np.asarray(layer.get("learning_rate", []), dtype=float).ravel()
            momentum = 1.0 - lr[2] if lr.size >= 3 else 0.99
            x = keras.layers.BatchNormalization(
                epsilon=_scalar(layer.epsilon, 1e-5), momentum=momentum, name=name, **kw
            )(x)
        elif t == "convt":
            f, b = layer.weights[0], layer.weights[1] if len(layer.weights) > 1 else None
            groups = int(_scalar(layer.num_groups, 1))
            f = conv_to_keras(f)
            up = pair(layer.upsample, "upsample")
            crop = pad4(layer.crop, "crop")
            if groups == 1:
                x = keras.layers.Conv2DTranspose(
                    f.shape[2],
                    f.shape[:2],
                    strides=up,
                    padding="valid",
                    use_bias=not is_empty(b),
                    name=name,
                    **kw,
                )(x)
            else:
                x = L.GroupedConv2DTranspose(
                    f.shape[2], f.shape[:2], up, groups, use_bias=not is_empty(b), name=name, **kw
                )(x)
            # Keras gives H*s + max(FH - s, 0) rows, MatConvNet (H-1)*s + FH: with filters
            # smaller than the upsampling, Keras' extra rows and columns are cropped too
            crop = [
                crop[0],
                crop[1] + max(up[0] - f.shape[0], 0),
                crop[2],
                crop[3] + max(up[1] - f.shape[1], 0),
            ]
            if any(crop):
                x = keras.layers.Cropping2D(
                    ((crop[0], crop[1]), (crop[2], crop[3])), name=f"{name}_crop", **kw
                )(x)
        elif t in ("softmaxloss", "loss"):
            raise TranslationError(f"{where}: Expected a loss layer only at the end of the net.")
        else:
            raise TranslationError(
                f"{where}: Expected a layer type the translation supports. Received type={t!r}"
            )
    model = keras.Model(inputs, x, name="matconvnet")
    load_weights(model, net)
    return model


def keras_loss(net: Net | None = None, dialect: str = "master", dtype: str = "float64"):
    """The Keras loss equivalent to the net's final softmaxloss/loss layer (computing in
    ``dtype``)."""
    from harness.translate.layers import MatConvNetSoftmaxLoss

    if net is not None and (not net.layers or net.layers[-1].type not in ("softmaxloss", "loss")):
        raise TranslationError("Expected the net to end with a softmaxloss or loss layer.")
    return MatConvNetSoftmaxLoss(dialect=dialect, dtype=dtype)
