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
their taps at build time (``user_code.tapped``); subclassed ports expose a ``trace`` method.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from . import ports_mixed
from .golden_nets import SEED_SMALL, load_net
from .user_code import CountAvgPool2D, TracedModel, conv_params, lrn_with_ops, tapped, taps_by_layer, trace

__all__ = ["CATALOGUE", "PORTS", "SUBTLE", "CountAvgPool2D", "Port", "lrn_with_ops", "trace"]


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
    return tapped(model, taps_by_layer(model, SEED_NAMES))


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
    return tapped(model, taps)


# ---------------------------------------------------------------------------------------------
# 3. subclassed keras.Model, logic in call(), ends in softmax -- seed network
# ---------------------------------------------------------------------------------------------


class SeedNet(TracedModel):
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

    def forward(self, x, taps=None):
        keep = self.keeper(taps)

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


# The faithful port of each style and its planted bugs: [bug key, description, culprit layer]
# per style, in variants.json ("catalogue"); a table of cases, kept as data.
_VARIANTS = json.loads((Path(__file__).parent / "variants.json").read_text(encoding="utf-8"))


def _builder(name: str) -> Callable:
    """A style's builder, by name: the seed ports here, the others in ports_mixed."""
    return globals().get(name) or getattr(ports_mixed, name)


def _table(section: str) -> list[Port]:
    """Every port of a section of variants.json, builders looked up by name in this module."""
    return [
        port
        for entry in _VARIANTS[section]
        for port in _variants(
            entry["style"],
            entry["case"],  # a golden case name (golden_nets)
            _builder(entry["builder"]),
            [tuple(bug) for bug in entry["bugs"]],
            **entry.get("options", {}),
        )
    ]


CATALOGUE: list[Port] = _table("catalogue")

# Planted bugs that are real (the culprit layer's output is clearly wrong) but all but vanish
# at the network output on these goldens: seed_small's tiny weights (scale 0.0125, no
# nonlinearity before relu1) make its scores bias-dominated, so early-layer data errors reach
# the scores at ~1e-4 relative; lrn1 in small_mixed has alpha = 2e-5, so the whole LRN changes
# its input by at most 3e-4 relative.  Only a layer-by-layer comparison can find these.  They
# are kept out of CATALOGUE (whose bug ports must differ by > 1e-3 at the output).
SUBTLE: list[Port] = [p for p in _table("subtle") if not p.faithful]

PORTS: dict[str, Port] = {p.name: p for p in CATALOGUE + SUBTLE}
