"""Catalogue ports of the bnorm seed network and the mixed network: subclassed in PyTorch
style, Sequential with Lambda-wrapped TensorFlow LRN, functional with ``keras.ops``, a Permute
head and Sequential float64 (see ports.py)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from .golden_nets import SEED_BNORM_TEST, SMALL_MIXED, load_net
from .user_code import (
    CountAvgPool2D,
    TracedModel,
    bnorm_params,
    conv_params,
    lrn_with_ops,
    tapped,
    taps_by_layer,
)

# ---------------------------------------------------------------------------------------------
# 4. subclassed, PyTorch style (declared in a different order than called) -- bnorm network
# ---------------------------------------------------------------------------------------------


class BnormSeedNet(TracedModel):
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

    def forward(self, x, taps=None):
        keep = self.keeper(taps)
        tr = True if self.bn_training else None
        for i, pool in enumerate((self.pool3, self.pool2, self.pool3, self.pool2s1), start=1):
            x = keep(f"conv{i}", getattr(self, f"conv{i}")(x))
            x = keep(f"bn_conv{i}", getattr(self, f"bn_conv{i}")(x, training=tr))
            x = keep(f"pool{i}", pool(x))
        x = keep("ip1", self.ip1(x))
        x = keep("bn_ip1", self.bn_ip1(x, training=tr))
        x = keep("relu1", self.relu(x))
        return keep("classifier", self.classifier(x))


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
    return tapped(model, taps_by_layer(model, MIXED_NAMES))


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
    return tapped(model, t)


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
    return tapped(model, t)


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
    return tapped(model, taps_by_layer(model, BNORM_NAMES))
