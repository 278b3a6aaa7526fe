"""Custom Keras layers for MatConvNet operations that no stock Keras layer computes exactly.

- ``MatConvNetPooling``: pooling with MatConvNet's clipped windows (padding is not a
  value: max never picks it, avg divides by the number of real cells) and, for max,
  MatConvNet's tie rule (the derivative goes to the first maximum in column-major order).
- ``MatConvNetLeakyReLU``: vl_nnrelu with a leak held in the data's precision.
- ``MatConvNetLRN``: vl_nnnormalize's cross-channel LRN (ALPHA not divided by N).
- ``GroupedConv2DTranspose``: vl_nnconvt with filter groups.
- ``Subsample``: take every stride-th pixel (strided dilated convolutions, which
  TensorFlow's Conv2D refuses, run as a dilated stride-1 Conv2D followed by this).
- ``AddBias``: vl_nnconv with empty filters (input + bias, subsampled).
- ``MatConvNetSoftmaxLoss``: softmaxloss/loss as a Keras loss honouring the dialect,
  1-based labels with 0 ignored, and per-location instance weights.

All serialise (``get_config`` returns the constructor arguments).
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = [
    "AddBias",
    "MatConvNetLRN",
    "MatConvNetPooling",
    "MatConvNetSoftmaxLoss",
    "Subsample",
    "CUSTOM_OBJECTS",
]


def _with_arguments(config: dict, layer, *names: str) -> dict:
    """A layer's base ``config`` and the constructor arguments ``names`` (held as its attributes)."""
    return {**config, **{name: getattr(layer, name) for name in names}}


@keras.saving.register_keras_serializable(package="mcn_harness")
class MatConvNetPooling(keras.layers.Layer):
    """vl_nnpool with padding ``((top, bottom), (left, right))`` as clipped windows; max
    pooling sends the derivative of a tied window to its first maximum in column-major
    order, as MatConvNet does (stock MaxPooling2D picks the first in row-major order)."""

    def __init__(self, pool_size, strides, padding, method="max", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = tuple(int(p) for p in pool_size)
        self.strides = tuple(int(s) for s in strides)
        self.padding = tuple(tuple(int(p) for p in side) for side in padding)
        if method not in ("max", "avg"):
            raise ValueError(f"Expected method 'max' or 'avg'. Received method={method!r}")
        self.method = method

    def call(self, x):
        (top, bottom), (left, right) = self.padding
        pads = [[0, 0], [top, bottom], [left, right], [0, 0]]
        if self.method == "max":
            # -inf padding: a window never picks a padded cell (the clipped window).
            xp = ops.pad(x, pads, constant_values=float("-inf"))
            # Ties: MatConvNet's derivative goes to the first maximum in column-major
            # order, TensorFlow's to the first in row-major order. Pooling the tensor with
            # H and W swapped makes TensorFlow's row-major scan MatConvNet's column-major one.
            xt = ops.transpose(xp, (0, 2, 1, 3))
            y = ops.max_pool(xt, self.pool_size[::-1], self.strides[::-1], padding="valid")
            return ops.transpose(y, (0, 2, 1, 3))
        xp = ops.pad(x, pads)
        area = float(self.pool_size[0] * self.pool_size[1])
        summed = ops.average_pool(xp, self.pool_size, self.strides, padding="valid") * area
        ones = ops.pad(ops.ones_like(x[..., :1]), pads)
        count = ops.average_pool(ones, self.pool_size, self.strides, padding="valid") * area
        return summed / count

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        (top, bottom), (left, right) = self.padding

        def out(size, p0, p1, k, s):
            return None if size is None else (size + p0 + p1 - k) // s + 1

        return (
            n,
            out(h, top, bottom, self.pool_size[0], self.strides[0]),
            out(w, left, right, self.pool_size[1], self.strides[1]),
            c,
        )

    def get_config(self):
        return _with_arguments(super().get_config(), self, "pool_size", "strides", "padding", "method")


@keras.saving.register_keras_serializable(package="mcn_harness")
class MatConvNetLRN(keras.layers.Layer):
    """vl_nnnormalize: ``y = x / (kappa + alpha * sum_window x^2)^beta`` over channels,
    window ``[k - floor((n-1)/2), k + ceil((n-1)/2)]`` (exact power)."""

    def __init__(self, depth, kappa, alpha, beta, **kwargs):
        super().__init__(**kwargs)
        self.depth, self.kappa, self.alpha, self.beta = int(depth), float(kappa), float(alpha), float(beta)

    def call(self, x):
        lo = (self.depth - 1) // 2
        hi = self.depth - 1 - lo
        sq = ops.pad(ops.square(x), [[0, 0], [0, 0], [0, 0], [lo, hi]])
        channels = x.shape[-1]
        window = sum(sq[..., k : k + channels] for k in range(self.depth))
        return x / ops.power(self.kappa + self.alpha * window, self.beta)

    def get_config(self):
        return _with_arguments(super().get_config(), self, "depth", "kappa", "alpha", "beta")


@keras.saving.register_keras_serializable(package="mcn_harness")
class MatConvNetLeakyReLU(keras.layers.Layer):
    """vl_nnrelu with a leak: ``x .* (leak + (1 - leak) * (x > 0))``. Keras' own
    ``negative_slope`` is applied as a float32 constant, which in float64 shows as a
    1.5e-8 relative difference: this layer casts the leak to the data's precision."""

    def __init__(self, leak, **kwargs):
        super().__init__(**kwargs)
        self.leak = float(leak)

    def call(self, x):
        # convert_to_tensor with the dtype given: ops.cast would round 0.1 through float32 first
        leak = ops.convert_to_tensor(self.leak, dtype=self.compute_dtype)
        return x * (leak + (1 - leak) * ops.cast(x > 0, x.dtype))

    def get_config(self):
        return {**super().get_config(), "leak": self.leak}


@keras.saving.register_keras_serializable(package="mcn_harness")
class GroupedConv2DTranspose(keras.layers.Layer):
    """vl_nnconvt with ``numGroups`` > 1 (Keras' Conv2DTranspose has no groups).

    The kernel is MatConvNet's ``FH x FW x K x D`` (Keras' transposed-convolution layout:
    outputs per group, then input channels); group g maps input channels
    ``g*D/G:(g+1)*D/G`` to outputs ``g*K:(g+1)*K``; ``padding='valid'`` (crop afterwards).
    """

    def __init__(self, filters, kernel_size, strides, groups, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)  # K, outputs per group
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.strides = tuple(int(s) for s in strides)
        self.groups = int(groups)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        depth = int(input_shape[-1])
        if depth % self.groups:
            raise ValueError(
                f"Expected groups to divide the input depth {depth}. Received groups={self.groups}"
            )
        self.kernel = self.add_weight(shape=(*self.kernel_size, self.filters, depth), name="kernel")
        if self.use_bias:
            self.bias = self.add_weight(shape=(self.filters * self.groups,), initializer="zeros", name="bias")

    def call(self, x):
        d = x.shape[-1] // self.groups
        outs = [
            ops.conv_transpose(
                x[..., g * d : (g + 1) * d], self.kernel[..., g * d : (g + 1) * d], self.strides
            )
            for g in range(self.groups)
        ]
        y = ops.concatenate(outs, axis=-1)
        return y + self.bias if self.use_bias else y

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape

        def out(size, k, s):  # what ops.conv_transpose 'valid' gives: size*s + max(k - s, 0)
            return None if size is None else size * s + max(k - s, 0)

        return (
            n,
            out(h, self.kernel_size[0], self.strides[0]),
            out(w, self.kernel_size[1], self.strides[1]),
            self.filters * self.groups,
        )

    def get_config(self):
        return _with_arguments(
            super().get_config(), self, "filters", "kernel_size", "strides", "groups", "use_bias"
        )


@keras.saving.register_keras_serializable(package="mcn_harness")
class Subsample(keras.layers.Layer):
    """Keep every ``strides``-th row and column, starting at the first."""

    def __init__(self, strides, **kwargs):
        super().__init__(**kwargs)
        self.strides = tuple(int(s) for s in strides)

    def call(self, x):
        return x[:, :: self.strides[0], :: self.strides[1], :]

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        sy, sx = self.strides
        return (n, None if h is None else -(-h // sy), None if w is None else -(-w // sx), c)

    def get_config(self):
        return {**super().get_config(), "strides": self.strides}


@keras.saving.register_keras_serializable(package="mcn_harness")
class AddBias(keras.layers.Layer):
    """vl_nnconv with empty filters: the (already subsampled) input plus a bias per channel."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x):
        return x + self.bias

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="mcn_harness")
class MatConvNetSoftmaxLoss(keras.losses.Loss):
    """vl_nnsoftmaxloss as a Keras loss on pre-softmax scores ``(N, H, W, K)`` or ``(N, K)``.

    ``y_true`` holds MatConvNet's 1-based labels, ``(N,)`` (one per image, applied at
    every pixel) or ``(N, H, W)``; label 0 is ignored; with ``(N, H, W, 2)`` the second
    channel is a per-location instance weight. Summed over pixels; dialect ``master``
    divides the batch sum by N (ignored images still count), ``beta25`` does not.
    """

    def __init__(self, dialect="master", name="matconvnet_softmaxloss", dtype="float64", **kwargs):
        # dtype: a Keras Loss computes in floatx() (float32) unless told, which would round a
        # float64 comparison to ~1e-8
        if dialect not in ("master", "beta25"):
            raise ValueError(f"Expected dialect 'master' or 'beta25'. Received dialect={dialect!r}")
        reduction = "sum_over_batch_size" if dialect == "master" else "sum"
        super().__init__(name=name, reduction=reduction, dtype=dtype, **kwargs)
        self.dialect = dialect

    def call(self, y_true, y_pred):
        scores = y_pred if len(y_pred.shape) == 4 else y_pred[:, None, None, :]
        labels = ops.cast(y_true, scores.dtype)
        n, h, w, k = (ops.shape(scores)[i] for i in range(4))
        if len(labels.shape) == 4 and labels.shape[-1] == 2:
            weights, labels = labels[..., 1], labels[..., 0]
        else:
            if len(labels.shape) <= 1 or (len(labels.shape) == 2 and labels.shape[-1] == 1):
                labels = ops.reshape(labels, (-1, 1, 1))
            labels = ops.broadcast_to(labels, (n, h, w))
            weights = ops.cast(labels > 0, scores.dtype)
        onehot = ops.one_hot(ops.cast(ops.maximum(labels, 1.0) - 1.0, "int32"), k, dtype=scores.dtype)
        logz = ops.logsumexp(scores, axis=-1)
        picked = ops.sum(scores * onehot, axis=-1)
        per_pixel = weights * (logz - picked)
        return ops.sum(ops.reshape(per_pixel, (n, -1)), axis=1)

    def get_config(self):
        return {"dialect": self.dialect, "name": self.name, "dtype": self.dtype}


CUSTOM_OBJECTS = {
    cls.__name__: cls
    for cls in (
        MatConvNetPooling,
        MatConvNetLRN,
        MatConvNetLeakyReLU,
        Subsample,
        AddBias,
        MatConvNetSoftmaxLoss,
        GroupedConv2DTranspose,
    )
}


# --------------------------------------------------------------------------- DagNN blocks


def _static_min(a, b):
    """``min(a, b)`` for Python ints, ``ops.minimum`` once either is a (dynamic) tensor."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return ops.minimum(a, b)


@keras.saving.register_keras_serializable(package="mcn_harness")
class MatConvNetCrop(keras.layers.Layer):
    """dagnn.Crop: ``call([x, ref])`` crops ``x`` to the spatial size ``(H2, W2)`` of
    ``ref`` with MatConvNet's split, ``top = min(crop[0], H1 - H2)`` rows off the top and
    the rest off the bottom, ``left = min(crop[1], W1 - W2)`` columns off the left and the
    rest off the right. Sizes are read when the layer runs (fully convolutional models
    with ``None`` spatial dimensions); ``ref`` gives only its size, so it gets no
    derivative, as in MatConvNet."""

    def __init__(self, crop=(0, 0), **kwargs):
        super().__init__(**kwargs)
        self.crop = tuple(int(c) for c in crop)

    def call(self, inputs):
        x, ref = inputs
        h1, w1 = x.shape[1], x.shape[2]
        h2, w2 = ref.shape[1], ref.shape[2]
        if None in (h1, w1, h2, w2):
            sx, sr = ops.shape(x), ops.shape(ref)
            h1, w1, h2, w2 = sx[1], sx[2], sr[1], sr[2]
        top = _static_min(self.crop[0], h1 - h2)
        left = _static_min(self.crop[1], w1 - w2)
        return x[:, top : top + h2, left : left + w2, :]

    def compute_output_shape(self, input_shape):
        xs, rs = input_shape
        return (xs[0], rs[1], rs[2], xs[3])

    def get_config(self):
        return {**super().get_config(), "crop": self.crop}


def _broadcast_shape(a, b):
    """NumPy broadcasting of two static shapes of equal rank (``None`` unknown)."""
    out = []
    for p, q in zip(a, b, strict=True):
        out.append(q if p == 1 else p if q == 1 else p if p is not None else q)
    return tuple(out)


@keras.saving.register_keras_serializable(package="mcn_harness")
class MatConvNetScale(keras.layers.Layer):
    """dagnn.Scale: ``y = x * scale (+ bias)`` with MATLAB's broadcasting (the same in
    Keras' ``N x H x W x C`` as in MatConvNet's ``H x W x C x N``).

    ``scale`` and ``bias`` are weights of ``scale_shape``/``bias_shape`` (Keras layout:
    a MatConvNet param of size ``H x W x C x N`` held as ``(N, H, W, C)``, 1 where it
    broadcasts), or, when their shape is None, further inputs: ``call([x, scale, bias])``
    as dagnn.Scale's ``[inputs, params]``. ``use_bias`` False: no bias at all."""

    def __init__(self, scale_shape=None, bias_shape=None, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.scale_shape = None if scale_shape is None else tuple(int(s) for s in scale_shape)
        self.bias_shape = None if bias_shape is None else tuple(int(s) for s in bias_shape)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        if self.scale_shape is not None:
            self.scale = self.add_weight(shape=self.scale_shape, initializer="ones", name="scale")
        if self.use_bias and self.bias_shape is not None:
            self.bias = self.add_weight(shape=self.bias_shape, initializer="zeros", name="bias")

    def _operands(self, inputs):
        items = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        x, rest = items[0], items[1:]
        scale = self.scale if self.scale_shape is not None else rest.pop(0)
        bias = None
        if self.use_bias:
            bias = self.bias if self.bias_shape is not None else rest.pop(0)
        return x, scale, bias

    def call(self, inputs):
        x, scale, bias = self._operands(inputs)
        y = x * ops.cast(scale, x.dtype)
        return y if bias is None else y + ops.cast(bias, x.dtype)

    def compute_output_shape(self, input_shape):
        shapes = list(input_shape) if isinstance(input_shape[0], list | tuple) else [input_shape]
        shape, rest = tuple(shapes[0]), shapes[1:]
        for own in (self.scale_shape, self.bias_shape if self.use_bias else ()):
            if own == ():
                continue
            other = own if own is not None else tuple(rest.pop(0))
            shape = _broadcast_shape(shape, other)
        return shape

    def get_config(self):
        return _with_arguments(super().get_config(), self, "scale_shape", "bias_shape", "use_bias")


CUSTOM_OBJECTS.update({cls.__name__: cls for cls in (MatConvNetCrop, MatConvNetScale)})
__all__ += ["MatConvNetCrop", "MatConvNetScale"]
