"""A catalogue of hand-written Keras 3 ports of the golden MatConvNet networks.

Every port is written the way a user would write it (Sequential, functional with
``keras.ops``, subclassed models, Lambda-wrapped TensorFlow ops, Permute heads, float64,
fused activations) and moves MatConvNet's weights by hand (``set_weights`` / ``assign``).
Each style has one faithful port and several planted-bug variants of the same code, one bug
each, selected with the ``bug`` argument of the style's builder.

A port maps the NHWC input to the output of the last MatConvNet layer before the loss (class
scores), or to the softmax probabilities when ``ends_in_softmax`` is set.  ``culprit`` is the
first MatConvNet layer whose output differs because of the bug.

``trace(model, x)`` returns the port's intermediate results, keyed by MatConvNet layer name,
so the culprit claims can be checked layer by layer.  Sequential and functional ports record
their taps at build time (``_tapped``); subclassed ports expose a ``trace`` method.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from .golden_nets import SEED_BNORM_TEST, SEED_SMALL, SMALL_MIXED, load_net


@dataclass(frozen=True)
class Port:
    name: str
    style: str
    case: str  # golden file stem
    build: Callable[[], keras.Model]  # built model, weights already transferred
    faithful: bool
    bug: str | None = None
    culprit: str | None = None  # first MatConvNet layer whose output differs
    dtype: str = "float32"
    ends_in_softmax: bool = False


# ---------------------------------------------------------------------------------------------
# Intermediate outputs ("taps"), keyed by MatConvNet layer name
# ---------------------------------------------------------------------------------------------

_TAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tapped(model: keras.Model, taps: dict) -> keras.Model:
    """Remember which symbolic tensors of a Sequential/functional model are MatConvNet outputs."""
    _TAPS[model] = taps
    return model


def trace(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``model`` on ``x`` and return its MatConvNet-layer outputs that it can observe."""
    if hasattr(model, "trace"):
        return model.trace(x)
    taps = _TAPS[model]
    probe = keras.Model(model.inputs[0], list(taps.values()))
    outs = probe(x)
    outs = outs if isinstance(outs, list | tuple) else [outs]
    return {k: keras.ops.convert_to_numpy(v) for k, v in zip(taps, outs, strict=True)}


def _taps_by_layer(model: keras.Model, names: list[str]) -> dict:
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

SEED_NAMES = ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "conv4", "pool4", "ip1", "relu1"]
SEED_NAMES += ["classifier"]


def build_seq_seed(bug: str | None = None) -> keras.Model:
    net = load_net(SEED_SMALL)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(8, 3, name="conv1"),
            layers.MaxPooling2D(3, strides=1, name="pool1"),
            layers.Conv2D(16, 5, name="conv2"),
            layers.MaxPooling2D(2, strides=2, name="pool2"),
            layers.Conv2D(32, 3, name="conv3"),
            layers.MaxPooling2D(3, strides=1, name="pool3"),
            layers.Conv2D(64, 5, name="conv4"),
            layers.MaxPooling2D(2, strides=1, name="pool4"),
            # 1x1x32x32 filters on 64 channels: two implicit filter groups
            layers.Conv2D(32, 1, groups=1 if bug == "groups_tiled" else 2, name="ip1"),
            *([] if bug == "no_relu" else [layers.ReLU(name="relu1")]),
            layers.Conv2D(2, 1, activation="relu" if bug == "relu_logits" else None, name="classifier"),
            *([layers.Softmax(name="prob")] if bug == "extra_softmax" else []),
        ],
        name="seq_seed",
    )
    for layer in model.layers:
        if not layer.weights:
            continue
        kernel, bias = conv_params(net, layer.name, bug)
        if bug == "groups_tiled" and layer.name == "ip1":
            kernel = np.concatenate([kernel, kernel], axis=2)  # "make the filter depth fit"
        if bug == "no_bias":
            layer.kernel.assign(kernel)  # bias stays at its zero initialisation
        else:
            layer.set_weights([kernel, bias])
    return _tapped(model, _taps_by_layer(model, SEED_NAMES))


# ---------------------------------------------------------------------------------------------
# 2. functional API with fused activations -- seed network
# ---------------------------------------------------------------------------------------------


def build_fused_seed(bug: str | None = None) -> keras.Model:
    net = load_net(SEED_SMALL)
    act = "relu" if bug == "relu_everywhere" else None  # "every conv has a ReLU"
    inp = keras.Input((28, 28, 1), name="image")
    c1 = layers.Conv2D(8, 3, activation=act, name="conv1")(inp)
    p1 = layers.MaxPooling2D(3, strides=1)(c1)
    c2 = layers.Conv2D(16, 5, activation=act, name="conv2")(p1)
    p2 = layers.MaxPooling2D(2)(c2)
    c3 = layers.Conv2D(32, 3, activation=act, name="conv3")(p2)
    p3 = layers.MaxPooling2D(3, strides=1)(c3)
    c4 = layers.Conv2D(64, 5, activation=act, name="conv4")(p3)
    p4 = layers.MaxPooling2D(2, strides=1)(c4)
    groups = 1 if bug == "groups_zero_filled" else 2
    r1 = layers.Conv2D(32, 1, groups=groups, activation="relu", name="ip1_relu1")(p4)  # ip1 + relu1
    logits = layers.Conv2D(2, 1, activation="relu" if bug == "relu_classifier" else None, name="classifier")
    out = logits(r1)
    model = keras.Model(inp, out, name="fused_seed")

    for keras_name, mcn_name in [(n, n) for n in ("conv1", "conv2", "conv3", "conv4", "classifier")] + [
        ("ip1_relu1", "ip1")
    ]:
        kernel, bias = conv_params(net, mcn_name)
        if bug == "groups_zero_filled" and mcn_name == "ip1":
            full = np.zeros((1, 1, 64, 32), np.float32)
            full[:, :, :32, :] = kernel  # zero-fill the "missing" input channels
            kernel = full
        model.get_layer(keras_name).set_weights([kernel, bias])
    taps = {"conv1": c1, "pool1": p1, "conv2": c2, "pool2": p2, "conv3": c3, "pool3": p3}
    taps |= {"conv4": c4, "pool4": p4, "relu1": r1, "classifier": out}
    return _tapped(model, taps)


# ---------------------------------------------------------------------------------------------
# 3. subclassed keras.Model, logic in call(), ends in softmax -- seed network
# ---------------------------------------------------------------------------------------------


class SeedNet(keras.Model):
    """Convolutions are layers; pooling, ReLU, flatten and softmax are done inline in call().
    ip1 (a grouped 1x1 conv on a 1x1 map) becomes a Dense layer with a block-diagonal kernel."""

    def __init__(self, bug: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.bug = bug
        self.conv1 = layers.Conv2D(8, 3)
        self.conv2 = layers.Conv2D(16, 5)
        self.conv3 = layers.Conv2D(32, 3)
        self.conv4 = layers.Conv2D(64, 5)
        self.ip1 = layers.Dense(32)
        self.classifier = layers.Dense(2)

    def call(self, x):
        return self.forward(x)

    def forward(self, x, taps=None):
        def keep(name, t):
            if taps is not None:
                taps[name] = t
            return t

        x = keep("conv1", self.conv1(x))
        x = keep("pool1", ops.max_pool(x, 3, strides=1))
        x = keep("conv2", self.conv2(x))
        x = keep("pool2", ops.max_pool(x, 2, strides=2))
        x = keep("conv3", self.conv3(x))
        x = keep("pool3", ops.max_pool(x, 3, strides=1))
        x = keep("conv4", self.conv4(x))
        x = keep("pool4", ops.max_pool(x, 2, strides=1))
        x = ops.reshape(x, (-1, 64))  # the map is 1 x 1 here
        x = keep("ip1", self.ip1(x))
        if self.bug != "no_relu":
            x = ops.relu(x)
        x = keep("relu1", x)
        x = self.classifier(x)
        if self.bug == "relu_logits":
            x = ops.relu(x)
        x = keep("classifier", x)
        if self.bug == "log_softmax":
            return ops.log_softmax(x, axis=-1)
        p = ops.softmax(x, axis=0 if self.bug == "softmax_batch_axis" else -1)
        if self.bug == "double_softmax":
            p = ops.softmax(p, axis=-1)
        return p

    def trace(self, x):
        taps: dict = {}
        self.forward(ops.convert_to_tensor(x), taps)
        return {k: ops.convert_to_numpy(v) for k, v in taps.items()}


def build_subclass_seed(bug: str | None = None) -> keras.Model:
    net = load_net(SEED_SMALL)
    model = SeedNet(bug, name="subclass_seed")
    model(np.zeros((2, 28, 28, 1), np.float32))
    for name in ("conv1", "conv2", "conv3", "conv4"):
        getattr(model, name).set_weights(conv_params(net, name))
    f, b = net["ip1"].filters[0, 0], net["ip1"].bias  # (32 in/group, 32 out), G = 2
    w = np.zeros((64, 32), np.float32)
    if bug == "groups_zero_filled":
        w[:32, :] = f
    else:
        w[:32, :16], w[32:, 16:] = f[:, :16], f[:, 16:]  # group g: inputs block g -> outputs block g
    if bug == "ip1_no_bias":
        model.ip1.kernel.assign(w)
    else:
        model.ip1.set_weights([w, b])
    f, b = net["classifier"].filters[0, 0], net["classifier"].bias
    if bug == "classifier_no_bias":
        model.classifier.kernel.assign(f)
    else:
        model.classifier.set_weights([f, b])
    return model


# ---------------------------------------------------------------------------------------------
# 4. subclassed, PyTorch style (declared in a different order than called) -- bnorm network
# ---------------------------------------------------------------------------------------------


class BnormSeedNet(keras.Model):
    def __init__(self, bn_epsilon=1e-5, bn_training=False, **kwargs):
        super().__init__(**kwargs)
        self.bn_training = bn_training
        # parametric layers, head first
        self.classifier = layers.Conv2D(2, 1)
        self.ip1 = layers.Conv2D(32, 1, groups=2, use_bias=False)
        self.bn_ip1 = layers.BatchNormalization(epsilon=bn_epsilon)
        self.conv4 = layers.Conv2D(64, 5, use_bias=False)
        self.bn_conv4 = layers.BatchNormalization(epsilon=bn_epsilon)
        self.conv3 = layers.Conv2D(32, 3, use_bias=False)
        self.bn_conv3 = layers.BatchNormalization(epsilon=bn_epsilon)
        self.conv2 = layers.Conv2D(16, 5, use_bias=False)
        self.bn_conv2 = layers.BatchNormalization(epsilon=bn_epsilon)
        self.conv1 = layers.Conv2D(8, 3, use_bias=False)
        self.bn_conv1 = layers.BatchNormalization(epsilon=bn_epsilon)
        # stateless layers last, reused
        self.relu = layers.ReLU()
        self.pool3 = layers.MaxPooling2D(3, strides=1)
        self.pool2 = layers.MaxPooling2D(2, strides=2)
        self.pool2s1 = layers.MaxPooling2D(2, strides=1)

    def call(self, x):
        return self.forward(x)

    def forward(self, x, taps=None):
        def keep(name, t):
            if taps is not None:
                taps[name] = t
            return t

        tr = True if self.bn_training else None
        x = keep("conv1", self.conv1(x))
        x = keep("bn_conv1", self.bn_conv1(x, training=tr))
        x = keep("pool1", self.pool3(x))
        x = keep("conv2", self.conv2(x))
        x = keep("bn_conv2", self.bn_conv2(x, training=tr))
        x = keep("pool2", self.pool2(x))
        x = keep("conv3", self.conv3(x))
        x = keep("bn_conv3", self.bn_conv3(x, training=tr))
        x = keep("pool3", self.pool3(x))
        x = keep("conv4", self.conv4(x))
        x = keep("bn_conv4", self.bn_conv4(x, training=tr))
        x = keep("pool4", self.pool2s1(x))
        x = keep("ip1", self.ip1(x))
        x = keep("bn_ip1", self.bn_ip1(x, training=tr))
        x = keep("relu1", self.relu(x))
        return keep("classifier", self.classifier(x))

    def trace(self, x):
        taps: dict = {}
        self.forward(ops.convert_to_tensor(x), taps)
        return {k: ops.convert_to_numpy(v) for k, v in taps.items()}


def build_torch_bnorm(bug: str | None = None) -> keras.Model:
    net = load_net(SEED_BNORM_TEST)
    model = BnormSeedNet(
        bn_epsilon=1e-3 if bug == "bn_default_epsilon" else 1e-5,  # 1e-3 is Keras' default
        bn_training=bug == "bn_training_mode",
        name="torch_bnorm",
    )
    model(np.zeros((1, 28, 28, 1), np.float32))
    for layer in net.layers:
        if layer.type == "conv":
            params = conv_params(net, layer.name, bug)
            if bug == "recipe_fortran_order" and layer.name in net.omitted_filters:
                entry = net.recipe_entry(layer.name)
                rs = np.random.RandomState(entry["seed"])
                flat = rs.randn(int(np.prod(entry["shape"]))).astype(np.float32) * np.float32(entry["scale"])
                params[0] = flat.reshape(entry["shape"], order="F")  # "MATLAB fills column-major"
            getattr(model, layer.name).set_weights(params)
        elif layer.type == "bnorm":
            getattr(model, layer.name).set_weights(bnorm_params(net, layer.name, bug))
    return model


# ---------------------------------------------------------------------------------------------
# 5. Sequential with Lambda-wrapped TensorFlow LRN -- mixed network
# ---------------------------------------------------------------------------------------------

MIXED_NAMES = ["conv1", "relu1", "lrn1", "pool1", "conv2", "relu2", "pool2", "drop1", "fc"]


def _tf_lrn_layer(param, bug: str | None) -> layers.Layer:
    n, kappa, alpha, beta = param
    if bug == "lrn_tf_defaults":
        fn = tf.nn.local_response_normalization
    elif bug == "lrn_positional_mcn_order":  # lrn(x, N, kappa, alpha, beta): N lands in depth_radius

        def fn(t):
            return tf.nn.local_response_normalization(t, int(n), kappa, alpha, beta)

    elif bug == "lrn_bias_alpha_swapped":  # positional (depth_radius, bias, alpha, beta) misremembered

        def fn(t):
            return tf.nn.local_response_normalization(t, int(n - 1) // 2, alpha, kappa, beta)
    else:
        # TF sums x^2 over 2*depth_radius+1 channels and multiplies by alpha, like MatConvNet
        a = alpha / n if bug == "lrn_alpha_over_n" else alpha

        def fn(t):
            return tf.nn.local_response_normalization(
                t, depth_radius=int(n - 1) // 2, bias=kappa, alpha=a, beta=beta
            )

    return layers.Lambda(fn, name="lrn1")


def build_lambda_lrn_mixed(bug: str | None = None) -> keras.Model:
    net = load_net(SMALL_MIXED)
    pool1 = net["pool1"]
    if bug == "avg_zero_pad":
        pool = [layers.ZeroPadding2D(1), layers.AveragePooling2D(3, strides=2, name="pool1")]
    else:
        pool = [CountAvgPool2D(pool1.pool, pool1.stride, pool1.pad, name="pool1")]
    slope = None if bug == "leaky_default_slope" else net["relu1"].leak
    if bug == "conv2_same":
        conv2 = [layers.Conv2D(12, 3, strides=2, padding="same", name="conv2")]
    else:  # pad [top bottom left right] = [0 1 1 0]
        conv2 = [layers.ZeroPadding2D(((0, 1), (1, 0))), layers.Conv2D(12, 3, strides=2, name="conv2")]
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(8, 3, padding="same", name="conv1"),  # 3x3, pad 1 on every side
            layers.LeakyReLU(name="relu1") if slope is None else layers.LeakyReLU(slope, name="relu1"),
            _tf_lrn_layer(net["lrn1"].param, bug),
            *pool,
            *conv2,
            layers.ReLU(name="relu2"),
            layers.ZeroPadding2D(((0, 1), (1, 0))),  # zeros are harmless for max after a ReLU
            layers.MaxPooling2D(2, name="pool2"),
            layers.Dropout(0.5, name="drop1"),
            layers.Conv2D(4, 2, name="fc"),
        ],
        name="lambda_lrn_mixed",
    )
    for name in ("conv1", "conv2", "fc"):
        model.get_layer(name).set_weights(conv_params(net, name, bug))
    return _tapped(model, _taps_by_layer(model, MIXED_NAMES))


# ---------------------------------------------------------------------------------------------
# 6. functional API with keras.ops between layers -- mixed network
# ---------------------------------------------------------------------------------------------


def build_func_ops_mixed(bug: str | None = None) -> keras.Model:
    net = load_net(SMALL_MIXED)
    conv1 = layers.Conv2D(8, 3, name="conv1")
    conv2 = layers.Conv2D(12, 3, strides=2, name="conv2")
    fc = layers.Dense(4, name="fc")
    t: dict = {}

    inp = keras.Input((16, 16, 3))
    x = t["conv1"] = conv1(ops.pad(inp, [[0, 0], [1, 1], [1, 1], [0, 0]]))
    if bug == "leaky_default_slope":
        x = t["relu1"] = ops.leaky_relu(x)  # keras.ops default negative_slope is 0.2
    else:
        x = t["relu1"] = ops.leaky_relu(x, negative_slope=net["relu1"].leak)
    x = t["lrn1"] = lrn_with_ops(x, *net["lrn1"].param)
    if bug == "avg_same":
        x = ops.average_pool(x, 3, 2, padding="same")
    elif bug == "avg_zero_pad":
        x = ops.average_pool(ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 2, padding="valid")
    else:
        spec = [[0, 0], [1, 1], [1, 1], [0, 0]]
        total = ops.average_pool(ops.pad(x, spec), 3, 2, padding="valid")
        x = total / ops.average_pool(ops.pad(ops.ones_like(x), spec), 3, 2, padding="valid")
    t["pool1"] = x
    top, bottom, left, right = net["conv2"].pad
    if bug == "pad_order_swapped":  # read [0 1 1 0] as [left right top bottom]
        left, right, top, bottom = net["conv2"].pad
    x = t["conv2"] = conv2(ops.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]]))
    x = t["relu2"] = ops.relu(x)
    if bug == "maxpool_same":
        x = ops.max_pool(x, 2, 2, padding="same")
    else:
        top, bottom, left, right = net["pool2"].pad
        spec = [[0, 0], [top, bottom], [left, right], [0, 0]]
        x = ops.max_pool(ops.pad(x, spec, constant_values=-np.inf), 2, 2)
    t["pool2"] = t["drop1"] = x  # dropout is the identity in test mode
    x = ops.reshape(x, (-1, 2 * 2 * 12))
    out = t["fc"] = fc(x)
    model = keras.Model(inp, out, name="func_ops_mixed")

    conv1.set_weights(conv_params(net, "conv1"))
    conv2.set_weights(conv_params(net, "conv2"))
    f, b = conv_params(net, "fc")
    order = "F" if bug == "flatten_col_major" else "C"  # NHWC row-major flatten needs C order
    fc.set_weights([f.reshape(-1, f.shape[-1], order=order), b])
    return _tapped(model, t)


# ---------------------------------------------------------------------------------------------
# 7. functional API with a Permute + Flatten + Dense head (MATLAB column-major kernel)
# ---------------------------------------------------------------------------------------------


def build_permute_mixed(bug: str | None = None) -> keras.Model:
    net = load_net(SMALL_MIXED)
    n, kappa, alpha, beta = net["lrn1"].param
    t: dict = {}
    inp = keras.Input((16, 16, 3))
    x = layers.ZeroPadding2D(1)(inp)
    x = t["conv1"] = layers.Conv2D(8, 3, name="conv1")(x)
    x = t["relu1"] = layers.LeakyReLU(negative_slope=0.1, name="relu1")(x)
    x = t["lrn1"] = layers.Lambda(lambda a: lrn_with_ops(a, n, kappa, alpha, beta), name="lrn1")(x)
    x = t["pool1"] = CountAvgPool2D((3, 3), (2, 2), (1, 1, 1, 1), name="pool1")(x)
    x = layers.ZeroPadding2D(((0, 1), (1, 0)))(x)
    x = t["conv2"] = layers.Conv2D(12, 3, strides=2, name="conv2")(x)
    x = t["relu2"] = layers.ReLU(name="relu2")(x)
    x = layers.ZeroPadding2D(((0, 1), (1, 0)))(x)
    x = t["pool2"] = layers.MaxPooling2D(2, name="pool2")(x)
    if bug == "dropout_scaled":  # "MatConvNet-style" test-time dropout scaling
        x = t["drop1"] = layers.Lambda(lambda a: a * 0.5, name="drop1")(x)
    else:
        x = t["drop1"] = layers.Dropout(0.5, name="drop1")(x)
    if bug != "no_permute":
        # (H, W, C) -> (C, W, H): flattening then walks H fastest, like MATLAB's F(:)
        x = layers.Permute((3, 1, 2) if bug == "wrong_permute" else (3, 2, 1))(x)
    x = layers.Flatten()(x)
    out = t["fc"] = layers.Dense(4, activation="relu" if bug == "dense_relu" else None, name="fc")(x)
    model = keras.Model(inp, out, name="permute_mixed")

    for name in ("conv1", "conv2"):
        model.get_layer(name).set_weights(conv_params(net, name))
    f, b = conv_params(net, "fc")
    order = "C" if bug == "c_order_kernel" else "F"
    model.get_layer("fc").set_weights([f.reshape(-1, f.shape[-1], order=order), b])
    return _tapped(model, t)


# ---------------------------------------------------------------------------------------------
# 8. Sequential built under float64 -- bnorm network
# ---------------------------------------------------------------------------------------------

BNORM_NAMES = [
    "conv1", "bn_conv1", "pool1", "conv2", "bn_conv2", "pool2", "conv3", "bn_conv3", "pool3",
    "conv4", "bn_conv4", "pool4", "ip1", "bn_ip1", "relu1", "classifier",
]  # fmt: skip


def build_seq_bnorm_f64(bug: str | None = None) -> keras.Model:
    net = load_net(SEED_BNORM_TEST)
    prev_floatx, prev_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:

        def bn(name):
            return layers.BatchNormalization(epsilon=net[name].epsilon, name=name)

        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                layers.Conv2D(8, 3, use_bias=False, name="conv1"),
                bn("bn_conv1"),
                layers.MaxPooling2D(3, strides=1, name="pool1"),
                layers.Conv2D(16, 5, use_bias=False, name="conv2"),
                bn("bn_conv2"),
                layers.MaxPooling2D(2, name="pool2"),
                layers.Conv2D(32, 3, use_bias=False, name="conv3"),
                bn("bn_conv3"),
                layers.MaxPooling2D(3, strides=1, name="pool3"),
                layers.Conv2D(64, 5, use_bias=False, name="conv4"),
                bn("bn_conv4"),
                layers.MaxPooling2D(2, strides=1, name="pool4"),
                layers.Conv2D(32, 1, groups=1 if bug == "groups_tiled" else 2, use_bias=False, name="ip1"),
                bn("bn_ip1"),
                layers.ReLU(name="relu1"),
                layers.Conv2D(2, 1, name="classifier"),
            ],
            name="seq_bnorm_f64",
        )
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.set_weights(bnorm_params(net, layer.name, bug))
            elif layer.weights:
                params = conv_params(net, layer.name, bug)
                if bug == "groups_tiled" and layer.name == "ip1":
                    params[0] = np.concatenate([params[0]] * 2, axis=2)
                layer.set_weights(params)
    finally:
        keras.config.set_floatx(prev_floatx)
        keras.config.set_dtype_policy(prev_policy)
    return _tapped(model, _taps_by_layer(model, BNORM_NAMES))


# ---------------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------------


def _variants(style, case, builder, bugs, **common) -> list[Port]:
    """The faithful port of a style plus its planted-bug variants (bug key, description, culprit)."""
    base = builder.__name__.removeprefix("build_")
    ports = [Port(base, style, case, builder, faithful=True, **common)]
    for key, description, culprit in bugs:
        ports.append(
            Port(
                f"{base}__{key}",
                style,
                case,
                functools.partial(builder, key),
                faithful=False,
                bug=description,
                culprit=culprit,
                **common,
            )
        )
    return ports


CATALOGUE: list[Port] = [
    *_variants(
        "sequential",
        SEED_SMALL,
        build_seq_seed,
        [
            ("relu_logits", "ReLU applied to the class scores (classifier activation='relu')", "classifier"),
            ("groups_tiled", "ip1 without groups, filter depth tiled to 64", "ip1"),
            ("no_bias", "only kernels assigned, biases left at zero", "conv1"),
            ("no_relu", "relu1 left out", "relu1"),
            ("extra_softmax", "a Softmax layer appended to a port meant to return scores", "loss"),
        ],
    ),
    *_variants(
        "functional+fused-activation",
        SEED_SMALL,
        build_fused_seed,
        [
            ("relu_everywhere", "activation='relu' on conv1..conv4 too", "conv1"),
            ("groups_zero_filled", "ip1 without groups, filter zero-filled to depth 64", "ip1"),
            ("relu_classifier", "activation='relu' copied onto the classifier", "classifier"),
        ],
    ),
    *_variants(
        "subclass-call-logic",
        SEED_SMALL,
        build_subclass_seed,
        [
            ("double_softmax", "softmax applied twice", "loss"),
            ("softmax_batch_axis", "softmax over the batch axis (axis=0)", "loss"),
            ("log_softmax", "log_softmax returned instead of softmax", "loss"),
            ("relu_logits", "ReLU on the class scores before the softmax", "classifier"),
            ("classifier_no_bias", "classifier bias not transferred", "classifier"),
        ],
        ends_in_softmax=True,
    ),
    *_variants(
        "subclass-pytorch-order",
        SEED_BNORM_TEST,
        build_torch_bnorm,
        [
            ("bn_var_is_sigma", "moving_variance = sigma instead of sigma^2 - eps", "bn_conv1"),
            ("bn_default_epsilon", "BatchNormalization() default epsilon 1e-3 instead of 1e-5", "bn_conv1"),
            ("bn_training_mode", "BatchNormalization called with training=True", "bn_conv1"),
            ("recipe_fortran_order", "conv4 recipe filter filled column-major", "conv4"),
            ("kernel_flip", "filters flipped spatially (f[::-1, ::-1])", "conv1"),
            ("kernel_hw_transposed", "filter H and W axes swapped", "conv1"),
        ],
    ),
    *_variants(
        "sequential+lambda-tf-lrn",
        SMALL_MIXED,
        build_lambda_lrn_mixed,
        [
            ("lrn_tf_defaults", "tf.nn.local_response_normalization with its default parameters", "lrn1"),
            ("lrn_bias_alpha_swapped", "LRN bias and alpha swapped", "lrn1"),
            ("kernel_hw_transposed", "filter H and W axes swapped", "conv1"),
            ("conv2_same", "conv2 padding='same' instead of pad [0 1 1 0]", "conv2"),
            ("leaky_default_slope", "LeakyReLU() default slope 0.3 instead of 0.1", "relu1"),
            ("avg_zero_pad", "ZeroPadding2D + AveragePooling2D (pads counted in the mean)", "pool1"),
        ],
    ),
    *_variants(
        "functional+keras.ops",
        SMALL_MIXED,
        build_func_ops_mixed,
        [
            ("leaky_default_slope", "keras.ops.leaky_relu default slope 0.2", "relu1"),
            ("avg_same", "average_pool(padding='same') instead of MatConvNet's pad 1", "pool1"),
            ("avg_zero_pad", "zero padding + average_pool (pads counted in the mean)", "pool1"),
            ("pad_order_swapped", "conv2 pad read as [left right top bottom]", "conv2"),
            ("maxpool_same", "max_pool(padding='same') instead of pad [0 1 1 0]", "pool2"),
            ("flatten_col_major", "row-major flatten with the column-major F(:) kernel", "fc"),
        ],
    ),
    *_variants(
        "functional+permute-head",
        SMALL_MIXED,
        build_permute_mixed,
        [
            ("no_permute", "Flatten without Permute, column-major kernel", "fc"),
            ("wrong_permute", "Permute((3, 1, 2)) instead of (3, 2, 1)", "fc"),
            ("c_order_kernel", "Permute((3, 2, 1)) but a row-major kernel", "fc"),
            ("dropout_scaled", "test-time dropout replaced by scaling with 1 - rate", "drop1"),
            ("dense_relu", "Dense(activation='relu') on the scores", "fc"),
        ],
    ),
    *_variants(
        "sequential-float64",
        SEED_BNORM_TEST,
        build_seq_bnorm_f64,
        [
            ("kernel_flip", "filters flipped spatially", "conv1"),
            ("groups_tiled", "ip1 without groups, filter depth tiled to 64", "ip1"),
            ("bn_gamma_beta_swapped", "bnorm gains and biases swapped", "bn_conv1"),
        ],
        dtype="float64",
    ),
]

# Planted bugs that are real (the culprit layer's output is clearly wrong) but all but vanish
# at the network output on these goldens: seed_small's tiny weights (scale 0.0125, no
# nonlinearity before relu1) make its scores bias-dominated, so early-layer data errors reach
# the scores at ~1e-4 relative; lrn1 in small_mixed has alpha = 2e-5, so the whole LRN changes
# its input by at most 3e-4 relative.  Only a layer-by-layer comparison can find these.  They
# are kept out of CATALOGUE (whose bug ports must differ by > 1e-3 at the output).
SUBTLE: list[Port] = [
    p
    for p in [
        *_variants(
            "sequential",
            SEED_SMALL,
            build_seq_seed,
            [
                ("kernel_flip", "filters flipped spatially (f[::-1, ::-1])", "conv1"),
                ("kernel_hw_transposed", "filter H and W axes swapped", "conv1"),
            ],
        ),
        *_variants(
            "subclass-call-logic",
            SEED_SMALL,
            build_subclass_seed,
            [
                ("ip1_no_bias", "ip1 bias not transferred", "ip1"),
                ("groups_zero_filled", "ip1 as dense, filter on the first 32 inputs only", "ip1"),
                ("no_relu", "inline ReLU forgotten", "relu1"),
            ],
            ends_in_softmax=True,
        ),
        *_variants(
            "sequential+lambda-tf-lrn",
            SMALL_MIXED,
            build_lambda_lrn_mixed,
            [
                ("lrn_alpha_over_n", "LRN alpha divided by N (Caffe convention)", "lrn1"),
                ("lrn_positional_mcn_order", "LRN params passed positionally in MatConvNet order", "lrn1"),
            ],
        ),
    ]
    if not p.faithful
]

PORTS: dict[str, Port] = {p.name: p for p in CATALOGUE + SUBTLE}
