"""The Keras layers of one DagNN block at a time, for ``to_keras_dag`` (the table of block
semantics is in ``harness.translate.dag_build``'s docstring).

``DagBlockBuilder(net, plan, dtype=...)(layer, tensors)`` applies the Keras layer(s) of one
DagNN layer to its input tensors: the layer holding its params (built once for a group of
layers sharing them, named as the plan says) and the helper layers around it (``_pad``,
``_subsample``, ``_crop``). The param readers (``required_param``, ``conv_bias``,
``block_number``, ``scale_weights``) serve the weights too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.dagnn_blocks import parse_opts
from harness.mcn.options import as_4d, is_empty, pad4, pair
from harness.translate.build import TranslationError, keras_name
from harness.translate.dag_plan import DagPlan, layer_where
from harness.translate.weights import conv_to_keras, to_nhwc

__all__ = [
    "DagBlockBuilder",
    "block_number",
    "conv_bias",
    "required_param",
    "scale_operands",
    "scale_weights",
]


def block_number(value: Any, default: float) -> float:
    """The first number of a block property, ``default`` when it is empty."""
    return default if is_empty(value) else float(np.asarray(value, dtype=float).ravel()[0])


def _value(net: DagNet, layer: DagLayer, j: int, what: str) -> np.ndarray | None:
    """The value of ``layer``'s ``j``-th param (None when empty); an error when it has none."""
    if len(layer.params) <= j:
        raise TranslationError(
            f"Expected at least {j + 1} params ({what}) for a {layer.type} block. "
            f"Received params={layer.params}"
        )
    value = net.param(layer.params[j]).value
    return None if is_empty(value) else np.asarray(value)


def required_param(net: DagNet, layer: DagLayer, j: int, what: str) -> np.ndarray:
    """The value of ``layer``'s ``j``-th param (``what``: its role, for the error); an error
    naming the layer when the param is missing or empty."""
    value = _value(net, layer, j, what)
    if value is None:
        raise TranslationError(
            f"{layer_where(net, layer)}: Expected a value for param '{layer.params[j]}' ({what}). "
            "Received an empty param"
        )
    return value


def conv_bias(net: DagNet, layer: DagLayer) -> np.ndarray | None:
    """The biases of a Conv or ConvTranspose layer: its second param, None without
    ``has_bias`` or with an empty param."""
    if not layer.block.get("has_bias", True):
        return None
    return _value(net, layer, 1, "biases")


class DagBlockBuilder:
    """Builds the Keras layer(s) of one DagNN layer at a time: ``builder(layer, tensors)``."""

    def __init__(self, net: DagNet, plan: DagPlan, *, dtype: str):
        import keras

        from harness.translate import layers as L

        self.keras, self.L = keras, L
        self.net, self.plan = net, plan
        self.kw = {"dtype": dtype}
        self.built: dict[str, Any] = {}  # owner DagNN layer -> its Keras layer

    def helper(self, layer: DagLayer, suffix: str) -> str:
        return self.plan.unique(f"{keras_name(layer.name)}_{suffix}")

    def core(self, layer: DagLayer, make):
        """The Keras layer holding ``layer``'s params (or operation): built once per owner,
        ``make(name)`` building it."""
        owner = self.plan.owner[layer.name]
        if owner not in self.built:
            self.built[owner] = make(self.plan.names[layer.name])
        return self.built[owner]

    def __call__(self, layer: DagLayer, xs: list) -> Any:
        method = "_" + layer.type.split(".", 1)[1].lower()
        return getattr(self, method)(layer, layer.block, xs)

    def _filters(self, layer: DagLayer) -> tuple[np.ndarray, np.ndarray | None]:
        return conv_to_keras(required_param(self.net, layer, 0, "filters")), conv_bias(self.net, layer)

    def _conv(self, layer: DagLayer, b: dict, xs: list) -> Any:
        keras, kw, x = self.keras, self.kw, xs[0]
        parse_opts(b.get("opts"), {}, "vl_nnconv")
        f, bias = self._filters(layer)
        pads = pad4(b["pad"], "pad")
        stride, dilate = pair(b["stride"], "stride"), pair(b["dilate"], "dilate")
        fh, fw, fc, k = f.shape
        channels = x.shape[-1]
        if channels is None or channels % fc or k % (channels // fc):
            raise TranslationError(
                f"Expected the filter depth {fc} to divide the {channels} input channels into "
                f"groups that divide the {k} filters. Received filters of shape {f.shape}"
            )
        conv_stride = stride if dilate == (1, 1) else (1, 1)
        if any(pads):
            pad = ((pads[0], pads[1]), (pads[2], pads[3]))
            x = keras.layers.ZeroPadding2D(pad, name=self.helper(layer, "pad"), **kw)(x)
        conv = self.core(
            layer,
            lambda name: keras.layers.Conv2D(
                k,
                (fh, fw),
                strides=conv_stride,
                padding="valid",
                dilation_rate=dilate,
                groups=channels // fc,
                use_bias=bias is not None,
                name=name,
                **kw,
            ),
        )
        x = conv(x)
        if conv_stride != stride:  # TensorFlow refuses strides > 1 together with dilation > 1
            x = self.L.Subsample(stride, name=self.helper(layer, "subsample"), **kw)(x)
        return x

    def _convtranspose(self, layer: DagLayer, b: dict, xs: list) -> Any:
        keras, L, kw, x = self.keras, self.L, self.kw, xs[0]
        parse_opts(b.get("opts"), {}, "vl_nnconvt")
        f, bias = self._filters(layer)
        groups = int(block_number(b.get("num_groups"), 1))
        up, crop = pair(b["upsample"], "upsample"), list(pad4(b["crop"], "crop"))
        fh, fw, k, d = f.shape
        if x.shape[-1] != d or d % groups:
            raise TranslationError(
                f"Expected {d} input channels (filters {f.shape}) in num_groups={groups} groups. "
                f"Received {x.shape[-1]} channels"
            )
        if groups > 1 and (fh < up[0] or fw < up[1]):
            # GroupedConv2DTranspose states (H-1)*s + FH rows but makes H*s when FH < s
            raise TranslationError(
                f"Expected filters of at least the upsampling {list(up)} with num_groups={groups} > 1. "
                f"Received filters {fh} x {fw}: GroupedConv2DTranspose's static output shape is wrong there"
            )
        # Keras makes H*s rows where MatConvNet makes (H-1)*s + FH when FH < s: crop the rest
        crop[1] += max(up[0] - fh, 0)
        crop[3] += max(up[1] - fw, 0)
        if groups == 1:
            make = lambda name: keras.layers.Conv2DTranspose(  # noqa: E731
                k, (fh, fw), strides=up, padding="valid", use_bias=bias is not None, name=name, **kw
            )
        else:
            make = lambda name: L.GroupedConv2DTranspose(  # noqa: E731
                k, (fh, fw), up, groups, use_bias=bias is not None, name=name, **kw
            )
        x = self.core(layer, make)(x)
        if any(crop):
            cropping = ((crop[0], crop[1]), (crop[2], crop[3]))
            x = keras.layers.Cropping2D(cropping, name=self.helper(layer, "crop"), **kw)(x)
        return x

    def _batchnorm(self, layer: DagLayer, b: dict, xs: list) -> Any:
        x = xs[0]
        parse_opts(b.get("opts"), {}, "vl_nnbnorm")
        gains = required_param(self.net, layer, 0, "gains")
        required_param(self.net, layer, 1, "biases")
        required_param(self.net, layer, 2, "moments")
        if x.shape[-1] != gains.size:
            raise TranslationError(f"Expected {gains.size} input channels. Received {x.shape[-1]}")
        lr = self.net.param(layer.params[2]).learning_rate
        momentum = min(max(1.0 - float(lr), 0.0), 1.0)  # trainMethod 'average' with rate lr
        eps = block_number(b.get("epsilon"), 1e-5)
        return self.core(
            layer,
            lambda name: self.keras.layers.BatchNormalization(
                axis=-1, epsilon=eps, momentum=momentum, name=name, **self.kw
            ),
        )(x)

    def _relu(self, layer: DagLayer, b: dict, xs: list) -> Any:
        opts = parse_opts(b.get("opts"), {"leak": "leak"}, "vl_nnrelu")
        leak = block_number(opts.get("leak", b.get("leak")), 0.0)
        if leak != 0:
            make = lambda name: self.L.MatConvNetLeakyReLU(leak, name=name, **self.kw)  # noqa: E731
        else:
            make = lambda name: self.keras.layers.ReLU(name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(xs[0])

    def _sigmoid(self, layer: DagLayer, b: dict, xs: list) -> Any:
        make = lambda name: self.keras.layers.Activation("sigmoid", name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(xs[0])

    def _softmax(self, layer: DagLayer, b: dict, xs: list) -> Any:
        make = lambda name: self.keras.layers.Softmax(axis=-1, name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(xs[0])

    def _pooling(self, layer: DagLayer, b: dict, xs: list) -> Any:
        keras, L, kw = self.keras, self.L, self.kw
        parse_opts(b.get("opts"), {}, "vl_nnpool")
        size, stride = pair(b["pool_size"], "pool_size"), pair(b["stride"], "stride")
        pads = pad4(b["pad"], "pad")
        method = b.get("method", "max")
        if method not in ("max", "avg"):
            raise TranslationError(f"Expected method 'max' or 'avg'. Received method={method!r}")
        if any(pads) or method == "max":
            # clipped windows; max: MaxPooling2D breaks ties row-major, MatConvNet column-major
            padding = ((pads[0], pads[1]), (pads[2], pads[3]))
            make = lambda name: L.MatConvNetPooling(size, stride, padding, method, name=name, **kw)  # noqa: E731
        else:
            make = lambda name: keras.layers.AveragePooling2D(  # noqa: E731
                size, stride, padding="valid", name=name, **kw
            )
        return self.core(layer, make)(xs[0])

    def _lrn(self, layer: DagLayer, b: dict, xs: list) -> Any:
        p = np.asarray(b["param"], dtype=float).ravel()
        if p.size != 4:
            raise TranslationError(f"Expected param [N KAPPA ALPHA BETA]. Received param={p.tolist()}")
        make = lambda name: self.L.MatConvNetLRN(int(p[0]), p[1], p[2], p[3], name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(xs[0])

    def _dropout(self, layer: DagLayer, b: dict, xs: list) -> Any:
        rate = block_number(b.get("rate"), 0.5)
        return self.core(layer, lambda name: self.keras.layers.Dropout(rate, name=name, **self.kw))(xs[0])

    def _sum(self, layer: DagLayer, b: dict, xs: list) -> Any:
        if len(xs) == 1:
            return self.core(layer, lambda name: self.keras.layers.Identity(name=name, **self.kw))(xs[0])
        return self.core(layer, lambda name: self.keras.layers.Add(name=name, **self.kw))(list(xs))

    def _concat(self, layer: DagLayer, b: dict, xs: list) -> Any:
        dim = int(block_number(b.get("dim"), 3))
        if dim not in (1, 2, 3):
            raise TranslationError(
                "Expected dim 1, 2 or 3 (H, W, C; Keras cannot concatenate along the batch). "
                f"Received dim={dim}"
            )
        if len(xs) == 1:
            return self.core(layer, lambda name: self.keras.layers.Identity(name=name, **self.kw))(xs[0])
        make = lambda name: self.keras.layers.Concatenate(axis=dim, name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(list(xs))

    def _crop(self, layer: DagLayer, b: dict, xs: list) -> Any:
        if len(xs) != 2:
            raise TranslationError(f"Expected 2 inputs (data, size reference). Received {len(xs)}")
        crop = np.asarray(b["crop"], dtype=float).ravel()
        if crop.size != 2:
            raise TranslationError(f"Expected crop [Y X]. Received crop={crop.tolist()}")
        h1, w1, h2, w2 = xs[0].shape[1], xs[0].shape[2], xs[1].shape[1], xs[1].shape[2]
        if any(a is not None and c is not None and a < c for a, c in ((h1, h2), (w1, w2))):
            raise TranslationError(
                f"Expected the first input ({h1} x {w1}) to be at least as large as the second "
                f"({h2} x {w2}): dagnn.Crop cannot crop to a larger size"
            )
        c0, c1 = int(crop[0]), int(crop[1])
        return self.core(layer, lambda name: self.L.MatConvNetCrop((c0, c1), name=name, **self.kw))(list(xs))

    def _scale(self, layer: DagLayer, b: dict, xs: list) -> Any:
        has_bias = bool(b.get("has_bias", True))
        wanted = 3 if has_bias else 2
        if len(xs) + len(layer.params) < wanted:
            raise TranslationError(
                f"Expected {wanted} operands (inputs then params: data, scale"
                f"{', bias' if has_bias else ''}). Received inputs={layer.inputs}, params={layer.params}"
            )
        shapes = _scale_weight_shapes(self.net, layer)
        scale_shape, bias_shape = shapes.get(1), shapes.get(2)
        args = list(xs[:wanted])
        make = lambda name: self.L.MatConvNetScale(  # noqa: E731
            scale_shape, bias_shape, has_bias, name=name, **self.kw
        )
        return self.core(layer, make)(args if len(args) > 1 else args[0])


def scale_operands(layer: DagLayer) -> dict[int, str]:
    """dagnn.Scale's operands ``[inputs, params]`` held by params: operand index (1 scale,
    2 bias, the bias only with has_bias) -> param name."""
    wanted = (1, 2) if layer.block.get("has_bias", True) else (1,)
    return {len(layer.inputs) + j: p for j, p in enumerate(layer.params) if len(layer.inputs) + j in wanted}


def scale_weights(layer: DagLayer) -> list[str]:
    """The params a MatConvNetScale layer holds as weights, in its weight order."""
    return [p for _, p in sorted(scale_operands(layer).items())]


def _scale_weight_shapes(net: DagNet, layer: DagLayer) -> dict[int, tuple[int, ...]]:
    """Operand index (1 scale, 2 bias) -> the Keras shape of the param holding it."""
    out = {}
    for index, p in scale_operands(layer).items():
        value = net.param(p).value
        if is_empty(value):
            raise TranslationError(f"Expected a value for param '{p}'. Received an empty param")
        out[index] = to_nhwc(as_4d(value)).shape
    return out
