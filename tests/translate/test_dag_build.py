"""harness.translate.dag_build: DagNN nets as functional Keras models, checked against the
reference ``DagNet.eval`` and MatConvNet's own DagNN evals (fixtures/golden_dagnn).

Tolerances (normwise: ``max|keras - want| <= tol * max|want|``):

- against the reference in float64: 1e-10, forward (mode test: ``training=False``; mode
  normal: ``training=True``, BatchNorm on batch statistics) and backward (the derivative of
  the sum of every model output with respect to every model input). LRN runs with
  ``lrn_exact=True`` in the reference: Keras has no fast_pow.
- against the golden cases (MatConvNet in float32, the Keras model in float64): 2e-5, the
  figure of tests/mcn/test_dagnn.py for the reference against the same cases. Measured
  worst: 1.35e-5, the output of dag_fromsimplenn_bnorm_normal (three BatchNorms on batch
  statistics amplify MatConvNet's float32 rounding: the reference run in float64 is as far
  from it, and 3e-16 from the Keras model); every other value and input derivative within
  7e-7. LRN's fast_pow (up to 3.3e-3 off the exact power) stays below float32 rounding in
  these cases (alpha is small); each case is also checked against the reference in float64
  with the exact power, at 1e-10.

The reference's derivative of the sum of the outputs is the sum, over the outputs, of one
backward pass seeded with ones on that output alone: a seed on a var that other layers read
is overwritten by their derivative in DagNN.eval (a derOutput is meant for a var nothing
reads), so one pass seeding every output would not be that derivative.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from harness.mcn import seed_net
from harness.mcn.dagnn import DagLayer, DagNet, Param
from harness.translate import TranslationError, to_hwcn, to_keras, to_nhwc
from harness.translate.dag_build import (
    dag_inputs,
    dag_keras_layers,
    dag_outputs,
    dag_params_from_keras,
    dag_weights_to_keras,
    to_keras_dag,
)
from harness.translate.layers import CUSTOM_OBJECTS, MatConvNetCrop, MatConvNetScale

from ..golden_dagnn import case as _case
from ..golden_dagnn import manifest as _manifest
from ..golden_dagnn import net as _golden_net

TOL = 1e-10
GOLDEN_TOL = 2e-5


# --------------------------------------------------------------------------- helpers


def _rel(got: Any, want: Any) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.size == want.size, f"{got.shape} vs {want.shape}"
    want4 = want.reshape(want.shape + (1,) * (4 - want.ndim))
    got4 = got.reshape(want4.shape)
    return float(np.max(np.abs(got4 - want4)) / max(float(np.max(np.abs(want4))), 1e-300))


def _as_list(y: Any) -> list:
    return list(y) if isinstance(y, list | tuple) else [y]


def _keras_call(net: DagNet, model, inputs: dict[str, np.ndarray], training: bool) -> list[np.ndarray]:
    xs = [to_nhwc(inputs[v].reshape(inputs[v].shape + (1,) * (4 - inputs[v].ndim))) for v in dag_inputs(net)]
    ys = model(xs[0] if len(xs) == 1 else xs, training=training)
    return [to_hwcn(np.asarray(y)) for y in _as_list(ys)]


def _keras_grads(net: DagNet, model, inputs: dict[str, np.ndarray], training: bool) -> dict[str, Any]:
    """d(sum of every model output)/d(every model input), MatConvNet layout (None: no path)."""
    names = dag_inputs(net)
    xs = [tf.constant(to_nhwc(inputs[v])) for v in names]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        ys = _as_list(model(xs[0] if len(xs) == 1 else xs, training=training))
        total = tf.add_n([tf.reduce_sum(y) for y in ys])
    grads = tape.gradient(total, xs)
    return {v: None if g is None else to_hwcn(g.numpy()) for v, g in zip(names, grads, strict=True)}


def _reference(net: DagNet, inputs: dict[str, np.ndarray], mode: str) -> list[np.ndarray]:
    net.reset()
    net.eval(inputs, mode=mode, lrn_exact=True)
    return [net.var(v).value for v in dag_outputs(net)]


def _reference_grads(net: DagNet, inputs: dict[str, np.ndarray], mode: str) -> dict[str, Any]:
    """The sum over the outputs of a backward pass seeded with ones on that output alone."""
    total: dict[str, Any] = {v: None for v in dag_inputs(net)}
    for out in dag_outputs(net):
        net.reset()
        net.eval(inputs, mode=mode, lrn_exact=True)
        seed = np.ones_like(net.var(out).value)
        net.reset()
        net.eval(inputs, {out: seed}, mode=mode, lrn_exact=True)
        for v in total:
            d = net.var(v).der
            if d is not None:
                total[v] = d if total[v] is None else total[v] + d
    return total


def _check(net: DagNet, inputs: dict[str, np.ndarray], *, mode: str = "test", backward: bool = True, **kw):
    """The Keras model of ``net`` against ``DagNet.eval``: every output, and the input derivatives."""
    model = to_keras_dag(net, **kw)
    training = mode == "normal"
    got = _keras_call(net, model, inputs, training)
    want = _reference(net, inputs, mode)
    assert len(got) == len(want) == len(dag_outputs(net))
    for static, g in zip(
        _as_list(model.output_shape) if len(got) > 1 else [model.output_shape], got, strict=True
    ):
        actual = to_nhwc(g).shape
        assert all(s is None or s == a for s, a in zip(static[1:], actual[1:], strict=True)), (static, actual)
    for name, g, w in zip(dag_outputs(net), got, want, strict=True):
        assert _rel(g, w) < TOL, f"output {name}: {_rel(g, w):.3g}"
    if backward:
        got_d = _keras_grads(net, model, inputs, training)
        want_d = _reference_grads(net, inputs, mode)
        for name in dag_inputs(net):
            if want_d[name] is None:
                assert got_d[name] is None or not np.any(got_d[name]), name
                continue
            assert _rel(got_d[name], want_d[name]) < TOL, f"d/d{name}: {_rel(got_d[name], want_d[name]):.3g}"
    return model


def _p(name: str, r: np.random.RandomState, *shape: int, scale: float = 0.5) -> Param:
    return Param(name, scale * r.randn(*shape))


def _moments(name: str, r: np.random.RandomState, c: int) -> Param:
    return Param(name, np.stack([0.3 * r.randn(c), 0.5 + r.rand(c)], axis=1), learning_rate=0.1)


# --------------------------------------------------------------------------- small nets


def _blocks_net() -> DagNet:
    """A chain through every single-input block: Conv with asymmetric padding and stride,
    a strided dilated conv without bias, a grouped 1x1 conv, leaky and plain ReLU, max
    pooling with padding, LRN, DropOut, avg pooling with and without padding, Sigmoid,
    SoftMax (followed by a conv: the sum of a softmax has no derivative)."""
    r = np.random.RandomState(0)
    layers = [
        DagLayer("conv_a", "dagnn.Conv", ["x"], ["a"], ["fa", "ba"], {"pad": [1, 0, 2, 1], "stride": [2, 1]}),
        DagLayer("relu_a", "dagnn.ReLU", ["a"], ["ar"], [], {"leak": 0.1}),
        DagLayer(
            "conv_d",
            "dagnn.Conv",
            ["ar"],
            ["d"],
            ["fd"],
            {"pad": 2, "stride": 2, "dilate": 2, "has_bias": False},
        ),
        DagLayer("conv_g", "dagnn.Conv", ["d"], ["g"], ["fg", "bg"]),
        DagLayer("relu_g", "dagnn.ReLU", ["g"], ["gr"], []),
        DagLayer(
            "pool_m",
            "dagnn.Pooling",
            ["gr"],
            ["pm"],
            [],
            {"method": "max", "pool_size": 3, "pad": [1, 1, 0, 1], "stride": 2},
        ),
        DagLayer("lrn", "dagnn.LRN", ["pm"], ["l"], [], {"param": [5, 1, 0.1, 0.75]}),
        DagLayer("drop", "dagnn.DropOut", ["l"], ["dr"], [], {"rate": 0.3}),
        DagLayer(
            "pool_a",
            "dagnn.Pooling",
            ["dr"],
            ["pa"],
            [],
            {"method": "avg", "pool_size": 2, "pad": [0, 1, 1, 0]},
        ),
        DagLayer("pool_b", "dagnn.Pooling", ["pa"], ["pb"], [], {"method": "avg", "pool_size": [2, 1]}),
        DagLayer("sig", "dagnn.Sigmoid", ["pb"], ["s"], []),
        DagLayer("soft", "dagnn.SoftMax", ["s"], ["h"], []),
        DagLayer("conv_h", "dagnn.Conv", ["h"], ["y"], ["fh", "bh"]),
    ]
    params = [
        _p("fa", r, 3, 3, 3, 4),
        _p("ba", r, 4, 1),
        _p("fd", r, 3, 3, 4, 6),
        _p("fg", r, 1, 1, 3, 6),  # 2 groups of 3 channels
        _p("bg", r, 6, 1),
        _p("fh", r, 1, 1, 6, 5, scale=2.0),
        _p("bh", r, 5, 1),
    ]
    return DagNet(layers, params=params)


def _residual_net() -> DagNet:
    """conv-bn-relu-conv-bn plus a projection, Sum, ReLU, global avg pool, fc, softmaxlog."""
    r = np.random.RandomState(1)
    layers = [
        DagLayer("conv1", "dagnn.Conv", ["input"], ["c1"], ["c1f", "c1b"], {"pad": 1}),
        DagLayer("bn1", "dagnn.BatchNorm", ["c1"], ["b1"], ["bn1g", "bn1b", "bn1m"], {"epsilon": 1e-4}),
        DagLayer("relu1", "dagnn.ReLU", ["b1"], ["r1"], []),
        DagLayer("conv2", "dagnn.Conv", ["r1"], ["c2"], ["c2f", "c2b"], {"pad": 1}),
        DagLayer("bn2", "dagnn.BatchNorm", ["c2"], ["b2"], ["bn2g", "bn2b", "bn2m"]),
        DagLayer("proj", "dagnn.Conv", ["input"], ["p"], ["pf", "pb"]),
        DagLayer("sum", "dagnn.Sum", ["b2", "p"], ["s"], []),
        DagLayer("relu2", "dagnn.ReLU", ["s"], ["r2"], []),
        DagLayer("pool", "dagnn.Pooling", ["r2"], ["gp"], [], {"method": "avg", "pool_size": 6}),
        DagLayer("fc", "dagnn.Conv", ["gp"], ["prediction"], ["fcf", "fcb"]),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], [], {"loss": "softmaxlog"}),
    ]
    params = [
        _p("c1f", r, 3, 3, 3, 4),
        _p("c1b", r, 4, 1),
        Param("bn1g", 1 + 0.2 * r.randn(4, 1)),
        _p("bn1b", r, 4, 1),
        _moments("bn1m", r, 4),
        _p("c2f", r, 3, 3, 4, 4),
        _p("c2b", r, 4, 1),
        Param("bn2g", 1 + 0.2 * r.randn(4, 1)),
        _p("bn2b", r, 4, 1),
        _moments("bn2m", r, 4),
        _p("pf", r, 1, 1, 3, 4),
        _p("pb", r, 4, 1),
        _p("fcf", r, 1, 1, 4, 3),
        _p("fcb", r, 3, 1),
    ]
    return DagNet(layers, params=params)


def _inception_net() -> DagNet:
    """Four branches joined by Concat over channels; a Concat over H; a three-input Sum
    reading one var twice; three outputs."""
    r = np.random.RandomState(2)
    layers = [
        DagLayer("b1", "dagnn.Conv", ["x"], ["o1"], ["b1f", "b1b"]),
        DagLayer("b2a", "dagnn.Conv", ["x"], ["o2a"], ["b2af", "b2ab"]),
        DagLayer("b2r", "dagnn.ReLU", ["o2a"], ["o2r"], []),
        DagLayer("b2b", "dagnn.Conv", ["o2r"], ["o2"], ["b2bf", "b2bb"], {"pad": 1}),
        DagLayer("b3", "dagnn.Conv", ["x"], ["o3"], ["b3f", "b3b"], {"pad": 2}),
        DagLayer("b4p", "dagnn.Pooling", ["x"], ["o4p"], [], {"pool_size": 3, "pad": 1}),
        DagLayer("b4", "dagnn.Conv", ["o4p"], ["o4"], ["b4f", "b4b"]),
        DagLayer("cat", "dagnn.Concat", ["o1", "o2", "o3", "o4"], ["cat"], [], {"dim": 3}),
        DagLayer("head", "dagnn.Conv", ["cat"], ["out1"], ["hf", "hb"]),
        DagLayer("cat_h", "dagnn.Concat", ["o1", "o3"], ["out2"], [], {"dim": 1}),
        DagLayer("sum3", "dagnn.Sum", ["o1", "o4", "o1"], ["out3"], []),
    ]
    params = [
        _p("b1f", r, 1, 1, 4, 2),
        _p("b1b", r, 2, 1),
        _p("b2af", r, 1, 1, 4, 3),
        _p("b2ab", r, 3, 1),
        _p("b2bf", r, 3, 3, 3, 2),
        _p("b2bb", r, 2, 1),
        _p("b3f", r, 5, 5, 4, 2),
        _p("b3b", r, 2, 1),
        _p("b4f", r, 1, 1, 4, 2),
        _p("b4b", r, 2, 1),
        _p("hf", r, 1, 1, 8, 3),
        _p("hb", r, 3, 1),
    ]
    return DagNet(layers, params=params)


def _fcn_net() -> DagNet:
    """FCN-style skip: a stride-2 branch upsampled by ConvTranspose, cropped by Crop to the
    skip score's size and summed; a grouped ConvTranspose with crop; a ConvTranspose whose
    filters are smaller than its upsampling; a per-pixel softmaxlog Loss."""
    r = np.random.RandomState(3)
    layers = [
        DagLayer("conv1", "dagnn.Conv", ["input"], ["c1"], ["c1f", "c1b"], {"pad": 1}),
        DagLayer("relu1", "dagnn.ReLU", ["c1"], ["r1"], []),
        DagLayer("score_skip", "dagnn.Conv", ["r1"], ["skip"], ["sf", "sb"]),
        DagLayer("pool", "dagnn.Pooling", ["r1"], ["p"], [], {"pool_size": 2, "stride": 2}),
        DagLayer("score_low", "dagnn.Conv", ["p"], ["low"], ["lf", "lb"], {"pad": 1}),
        DagLayer("up", "dagnn.ConvTranspose", ["low"], ["up"], ["uf", "ub"], {"upsample": 2, "crop": 0}),
        DagLayer("crop", "dagnn.Crop", ["up", "skip"], ["upc"], [], {"crop": [1, 1]}),
        DagLayer("fuse", "dagnn.Sum", ["upc", "skip"], ["prediction"], []),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], [], {"loss": "softmaxlog"}),
        DagLayer(
            "up_g",
            "dagnn.ConvTranspose",
            ["low"],
            ["upg"],
            ["gf", "gb"],
            {"upsample": 2, "crop": [0, 1, 1, 0], "num_groups": 2},
        ),
        DagLayer(
            "up_s", "dagnn.ConvTranspose", ["low"], ["ups"], ["nf"], {"upsample": [2, 3], "has_bias": False}
        ),
    ]
    params = [
        _p("c1f", r, 3, 3, 3, 4),
        _p("c1b", r, 4, 1),
        _p("sf", r, 1, 1, 4, 2),
        _p("sb", r, 2, 1),
        _p("lf", r, 3, 3, 4, 2),
        _p("lb", r, 2, 1),
        _p("uf", r, 4, 4, 2, 2),
        _p("ub", r, 2, 1),
        _p("gf", r, 3, 3, 3, 2),  # 2 groups: 3 outputs each from 1 input channel
        _p("gb", r, 6, 1),
        _p("nf", r, 1, 2, 2, 2),
    ]
    return DagNet(layers, params=params)


def _recursive_net() -> DagNet:
    """One conv's params used by three layers (recursive block, as LapSRN; the third with
    its own padding, a helper layer of its own), a skip Sum."""
    r = np.random.RandomState(4)
    rec = {"pad": 1}
    layers = [
        DagLayer("in_conv", "dagnn.Conv", ["x"], ["c0"], ["in_f", "in_b"], {"pad": 1}),
        DagLayer("relu0", "dagnn.ReLU", ["c0"], ["r0"], [], {"leak": 0.2}),
        DagLayer("rec1", "dagnn.Conv", ["r0"], ["c1"], ["shared_f", "shared_b"], rec),
        DagLayer("relu1", "dagnn.ReLU", ["c1"], ["r1"], [], {"leak": 0.2}),
        DagLayer("rec2", "dagnn.Conv", ["r1"], ["c2"], ["shared_f", "shared_b"], rec),
        DagLayer("relu2", "dagnn.ReLU", ["c2"], ["r2"], [], {"leak": 0.2}),
        DagLayer("rec3", "dagnn.Conv", ["r2"], ["c3"], ["shared_f", "shared_b"], {"pad": [2, 0, 1, 1]}),
        DagLayer("skip", "dagnn.Sum", ["c3", "r0"], ["s"], []),
        DagLayer("out_conv", "dagnn.Conv", ["s"], ["res"], ["out_f", "out_b"], {"pad": 1}),
        DagLayer("out", "dagnn.Sum", ["res", "x"], ["y"], []),
    ]
    params = [
        _p("in_f", r, 3, 3, 1, 4),
        _p("in_b", r, 4, 1),
        _p("shared_f", r, 3, 3, 4, 4, scale=0.3),
        _p("shared_b", r, 1, 4),
        _p("out_f", r, 3, 3, 4, 1),
        _p("out_b", r, 1, 1),
    ]
    return DagNet(layers, params=params)


def _scale_net() -> DagNet:
    """Scale by params (scale and bias), by a var with a bias param, by a spatial map without
    bias, by a var without bias, and by a var with a bias var."""
    r = np.random.RandomState(5)
    layers = [
        DagLayer("scale1", "dagnn.Scale", ["x"], ["s1"], ["w1", "b1"], {"size": [1, 1, 4]}),
        DagLayer("sig", "dagnn.Sigmoid", ["s1"], ["g"], []),
        DagLayer("scale2", "dagnn.Scale", ["s1", "g"], ["s2"], ["b2"]),
        DagLayer("scale3", "dagnn.Scale", ["s2"], ["s3"], ["w3"], {"has_bias": False}),
        DagLayer("gpool", "dagnn.Pooling", ["g"], ["gp"], [], {"method": "avg", "pool_size": [5, 6]}),
        DagLayer("scale4", "dagnn.Scale", ["s3", "gp"], ["s4"], [], {"has_bias": False}),
        DagLayer("scale5", "dagnn.Scale", ["s4", "gp", "gp"], ["y"], []),
    ]
    params = [
        _p("w1", r, 1, 1, 4, scale=1.0),
        _p("b1", r, 1, 1, 4),
        _p("b2", r, 1, 1, 4),
        _p("w3", r, 5, 6, scale=1.0),
    ]
    return DagNet(layers, params=params)


def _two_inputs_net() -> DagNet:
    """Two data inputs, labels, two Loss types on one score var, a second score read from
    the first: outputs [prediction, aux]."""
    r = np.random.RandomState(6)
    layers = [
        DagLayer("ca", "dagnn.Conv", ["x1"], ["a"], ["af", "ab"]),
        DagLayer("cb", "dagnn.Conv", ["x2"], ["b"], ["bf", "bb"], {"pad": [1, 1, 0, 0]}),
        DagLayer("sum", "dagnn.Sum", ["a", "b"], ["prediction"], []),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], []),
        DagLayer("err", "dagnn.Loss", ["prediction", "label"], ["top1err"], [], {"loss": "classerror"}),
        DagLayer("aux", "dagnn.Conv", ["prediction"], ["aux"], ["xf", "xb"]),
        DagLayer("aux_loss", "dagnn.Loss", ["aux", "binlabel"], ["aux_objective"], [], {"loss": "hinge"}),
    ]
    params = [
        _p("af", r, 3, 3, 2, 3),
        _p("ab", r, 3, 1),
        _p("bf", r, 3, 1, 2, 3),
        _p("bb", r, 3, 1),
        _p("xf", r, 1, 1, 3, 1),
        _p("xb", r, 1, 1),
    ]
    return DagNet(layers, params=params)


def _x(r: np.random.RandomState, *shape: int) -> np.ndarray:
    return r.randn(*shape)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("size", [(16, 14, 3), (None, None, 3)], ids=["static", "dynamic"])
def test_every_single_input_block(size):
    net = _blocks_net()
    model = _check(net, {"x": _x(np.random.RandomState(10), 16, 14, 3, 2)}, input_sizes={"x": size})
    kinds = {type(l).__name__ for l in model.layers}
    assert {
        "ZeroPadding2D",
        "Conv2D",
        "Subsample",
        "MatConvNetLeakyReLU",
        "ReLU",
        "MatConvNetPooling",
        "MatConvNetLRN",
        "Dropout",
        "AveragePooling2D",
        "Activation",
        "Softmax",
    } <= kinds
    assert model.get_layer("conv_g").groups == 2 and not model.get_layer("conv_d").use_bias
    assert model.get_layer("drop").rate == pytest.approx(0.3)


@pytest.mark.parametrize("mode", ["test", "normal"])
def test_residual_sum_and_batchnorm(mode):
    """BatchNorm: moments in mode test (training=False; MatConvNet has no backward there),
    batch statistics in mode normal (training=True), forward and backward."""
    net = _residual_net()
    bn = to_keras_dag(net).get_layer("bn1")
    x = _x(np.random.RandomState(11), 6, 6, 3, 4)
    _check(net, {"input": x}, mode=mode, backward=mode == "normal")
    assert dag_inputs(net) == ["input"] and dag_outputs(net) == ["prediction"]
    assert bn.epsilon == pytest.approx(1e-4) and bn.momentum == pytest.approx(0.9)
    m = net.param("bn1m").value
    np.testing.assert_allclose(bn.moving_variance.numpy(), m[:, 1] ** 2 - 1e-4, rtol=1e-14)


def test_inception_concat_and_three_outputs():
    net = _inception_net()
    model = _check(net, {"x": _x(np.random.RandomState(12), 7, 7, 4, 2)}, input_sizes={"x": (7, 7, 4)})
    assert dag_outputs(net) == ["out1", "out2", "out3"]
    assert [tuple(s) for s in model.output_shape] == [(None, 7, 7, 3), (None, 14, 7, 2), (None, 7, 7, 2)]


@pytest.mark.parametrize("size", [(9, 11), (10, 12)])
def test_fcn_skip_with_unknown_input_size(size):
    """No input size anywhere: the model is fully convolutional, (None, None, 3) with the
    depth from conv1's filters; Crop reads the sizes when it runs (9 rows: the upsampled map
    has 10, top = min(1, 1) = 1; 10 rows: 12, top 1 and bottom 1)."""
    net = _fcn_net()
    x = _x(np.random.RandomState(13), *size, 3, 2)
    model = _check(net, {"input": x})
    assert model.input_shape == (None, None, None, 3)
    assert dag_inputs(net) == ["input"] and dag_outputs(net) == ["prediction", "upg", "ups"]
    kinds = {type(l).__name__ for l in model.layers}
    assert {"MatConvNetCrop", "Conv2DTranspose", "GroupedConv2DTranspose", "Cropping2D", "Add"} <= kinds


def test_fcn_skip_with_static_sizes_and_size_checks():
    net = _fcn_net()
    model = _check(
        net, {"input": _x(np.random.RandomState(14), 9, 11, 3, 1)}, input_sizes={"input": (9, 11, 3)}
    )
    assert model.get_layer("crop").output.shape == (None, 9, 11, 2)
    net.layer("crop").inputs = ["skip", "up"]  # crop to a larger size
    net.rebuild()
    with pytest.raises(TranslationError, match=r"layer 7 'crop' \(dagnn\.Crop\).*at least as large"):
        to_keras_dag(net, input_sizes={"input": (9, 11, 3)})


def test_shared_params_are_one_keras_layer():
    net = _recursive_net()
    model = _check(net, {"x": _x(np.random.RandomState(15), 8, 7, 1, 2)})
    names = dag_keras_layers(net)
    assert names["rec1"] == names["rec2"] == names["rec3"] == "rec1"
    assert len(model.weights) == len(net.params) == 6
    assert len(model.get_layer("rec1")._inbound_nodes) == 3
    assert model.get_layer("rec3_pad").padding == ((2, 0), (1, 1))
    # the shared params' derivative: summed over the three layers, as DagNN.eval does
    x = _x(np.random.RandomState(15), 8, 7, 1, 2)
    net.reset()
    net.eval({"x": x}, {"y": np.ones((8, 7, 1, 2))}, mode="test")
    layer = model.get_layer("rec1")
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(model(tf.constant(to_nhwc(x))))
    dk, db = tape.gradient(total, [layer.kernel, layer.bias])
    assert _rel(dk.numpy(), net.param("shared_f").der) < TOL
    assert _rel(db.numpy(), net.param("shared_b").der) < TOL
    # weights back: the shared params are read once, from the one Keras layer
    kernel = model.get_layer("rec1").kernel
    kernel.assign(kernel.numpy() * 2)
    back = dag_params_from_keras(net, model)
    np.testing.assert_array_equal(back.param("shared_f").value, 2 * net.param("shared_f").value)
    x = _x(np.random.RandomState(16), 8, 7, 1, 2)
    np.testing.assert_allclose(
        _keras_call(back, model, {"x": x}, False)[0], _reference(back, {"x": x}, "test")[0], rtol=1e-10
    )


def test_partly_shared_params_are_refused():
    net = _recursive_net()
    net.layer("rec2").params = ["shared_f", "out_b"]
    net.rebuild()
    with pytest.raises(TranslationError, match=r"'rec2' \(dagnn\.Conv\): shares param\(s\) shared_f"):
        to_keras_dag(net)
    net = _recursive_net()
    net.layer("rec2").block["stride"] = np.array([2.0, 2.0])
    with pytest.raises(TranslationError, match="not all its params and block properties"):
        to_keras_dag(net)


@pytest.mark.parametrize("size", [(5, 6, 4), (None, None, 4)], ids=["static", "dynamic"])
def test_scale_by_params_and_vars(size):
    net = _scale_net()
    model = _check(net, {"x": _x(np.random.RandomState(17), 5, 6, 4, 3)}, input_sizes={"x": size})
    assert model.get_layer("scale1").scale.shape == (1, 1, 1, 4)
    assert model.get_layer("scale3").scale.shape == (1, 5, 6, 1)
    assert not model.get_layer("scale4").weights
    assert [w.name for w in model.get_layer("scale2").weights] == ["bias"]


def test_two_inputs_labels_and_loss_outputs():
    net = _two_inputs_net()
    r = np.random.RandomState(18)
    inputs = {"x1": _x(r, 6, 5, 2, 2), "x2": _x(r, 4, 3, 2, 2)}
    model = _check(net, inputs)
    assert dag_inputs(net) == ["x1", "x2"] and dag_outputs(net) == ["prediction", "aux"]
    assert [t.name for t in model.inputs] == ["x1", "x2"]


def test_seed_net_from_simplenn_equals_to_keras():
    net = seed_net(seed=0)
    dag = DagNet.from_simplenn(net)
    model = to_keras_dag(dag)
    assert dag_inputs(dag) == ["x0"] and model.input_shape == (None, 28, 28, 1)  # meta.inputSize
    x = np.random.RandomState(19).randn(28, 28, 1, 3)
    got = model(to_nhwc(x)).numpy()
    np.testing.assert_array_equal(got, to_keras(net)(to_nhwc(x)).numpy())
    _check(dag, {"x0": x})


# --------------------------------------------------------------------------- weights, sizes, errors


def test_weights_round_trip_in_float32():
    for net in (_residual_net(), _fcn_net(), _scale_net(), _blocks_net()):
        for p in net.params:
            p.value = p.value.astype(np.float32)
        depth = 4 if net.layers[0].type == "dagnn.Scale" else None
        model = to_keras_dag(net, "float32", input_sizes={v: (16, 14, depth) for v in dag_inputs(net)})
        back = dag_params_from_keras(net, model)
        for a, b in zip(net.params, back.params, strict=True):
            assert a.name == b.name and a.value.shape == b.value.shape and b.value.dtype == np.float32
            if a.train_method == "average":  # sigma -> sigma^2 - eps -> sqrt(. + eps)
                np.testing.assert_allclose(b.value, a.value, rtol=1e-6)
            else:
                np.testing.assert_array_equal(b.value, a.value)
        assert back.param(net.params[0].name).value is not net.params[0].value


def test_weights_move_into_another_model():
    net = _inception_net()
    model = to_keras_dag(net)
    other = _inception_net()
    for p in other.params:
        p.value = p.value + 1
    dag_weights_to_keras(other, model)
    x = _x(np.random.RandomState(20), 7, 7, 4, 1)
    for got, want in zip(
        _keras_call(other, model, {"x": x}, False), _reference(other, {"x": x}, "test"), strict=True
    ):
        assert _rel(got, want) < TOL
    with pytest.raises(TranslationError, match=r"\(dagnn\.Conv\): no Keras layer 'b\w+' in the model"):
        dag_weights_to_keras(other, to_keras_dag(_residual_net()))


def test_input_sizes_from_meta():
    net = _fcn_net()
    net.meta = {"inputs": [{"name": "input", "size": np.array([[12.0, 10.0, 3.0, 8.0]])}]}
    assert to_keras_dag(net).input_shape == (None, 12, 10, 3)
    net.meta = {"inputSize": np.array([[9.0, 9.0, 3.0]])}
    assert to_keras_dag(net).input_shape == (None, 9, 9, 3)
    assert to_keras_dag(net, input_sizes={"input": (None, 7, 3)}).input_shape == (None, None, 7, 3)
    with pytest.raises(TranslationError, match="Expected input_sizes to name input vars"):
        to_keras_dag(net, input_sizes={"label": (1, 1, 1)})


def test_float32_model():
    net = _inception_net()
    model = to_keras_dag(net, "float32")
    assert model.input.dtype == "float32" and all(w.dtype == "float32" for w in model.weights)
    x = _x(np.random.RandomState(23), 7, 7, 4, 2)
    got = _keras_call(net, model, {"x": x.astype(np.float32)}, False)
    for g, w in zip(got, _reference(net, {"x": x}, "test"), strict=True):
        assert g.dtype == np.float32 and _rel(g, w) < 1e-5


def test_an_input_read_only_for_its_size():
    """A var read only as a Crop's size input: a Keras input of unknown depth, no derivative."""
    r = np.random.RandomState(24)
    net = DagNet(
        [
            DagLayer("conv", "dagnn.Conv", ["x"], ["c"], ["f", "b"], {"pad": 2}),
            DagLayer("crop", "dagnn.Crop", ["c", "ref"], ["y"], [], {"crop": [3, 0]}),
        ],
        params=[_p("f", r, 3, 3, 2, 3), _p("b", r, 3, 1)],
    )
    model = _check(net, {"x": _x(r, 6, 7, 2, 2), "ref": np.zeros((4, 5, 1, 2))})
    assert dag_inputs(net) == ["x", "ref"] and model.input_shape[1] == (None, None, None, None)


def test_empty_params_are_errors():
    net = _residual_net()
    net.param("bn2m").value = None
    with pytest.raises(TranslationError, match=r"'bn2' \(dagnn\.BatchNorm\).*param 'bn2m' \(moments\)"):
        to_keras_dag(net)
    net = _residual_net()
    net.layer("fc").block["has_bias"] = True
    net.layer("fc").params = ["fcf"]
    net.rebuild()
    with pytest.raises(TranslationError, match=r"'fc' \(dagnn\.Conv\).*at least 2 params \(biases\)"):
        to_keras_dag(net)


def test_grouped_convt_with_filters_smaller_than_upsampling_is_refused():
    net = DagNet(
        [
            DagLayer(
                "up",
                "dagnn.ConvTranspose",
                ["x"],
                ["y"],
                ["f"],
                {"upsample": 3, "num_groups": 2, "has_bias": False},
            )
        ],
        params=[Param("f", np.ones((1, 1, 2, 4)))],
    )
    with pytest.raises(TranslationError, match=r"'up' \(dagnn\.ConvTranspose\).*at least the upsampling"):
        to_keras_dag(net)


def test_depth_unknown_is_an_error():
    net = DagNet([DagLayer("relu", "dagnn.ReLU", ["x"], ["y"], [])])
    with pytest.raises(TranslationError, match=r"input var 'x'.*input_sizes=\{'x': \(H, W, C\)\}"):
        to_keras_dag(net)
    model = _check(net, {"x": _x(np.random.RandomState(21), 3, 4, 2, 1)}, input_sizes={"x": (None, None, 2)})
    assert model.input_shape == (None, None, None, 2)


def test_unsupported_blocks_name_the_layer():
    net = _two_inputs_net()
    net.add_layer("custom", "dagnn.vllab_dag_loss", ["aux", "binlabel"], ["l1"], [], {"loss_type": "L1"})
    with pytest.raises(TranslationError, match=r"layer 8 'custom' \(dagnn\.vllab_dag_loss\).*remove_layer"):
        to_keras_dag(net)
    net.remove_layer("custom")
    assert dag_outputs(net) == ["prediction", "aux"]
    net.add_layer("pdist", "dagnn.PDist", ["aux", "x1"], ["d"], [])
    with pytest.raises(TranslationError, match=r"'pdist' \(dagnn\.PDist\)"):
        to_keras_dag(net)
    net = _two_inputs_net()
    net.add_layer("after", "dagnn.ReLU", ["objective"], ["r"], [])
    with pytest.raises(TranslationError, match="'after'.*output of Loss layer 'loss'"):
        to_keras_dag(net)
    with pytest.raises(TranslationError, match="Expected a DagNN network"):
        to_keras_dag(seed_net())
    with pytest.raises(TranslationError, match="Expected dtype"):
        to_keras_dag(_two_inputs_net(), "float16")
    net = _blocks_net()
    net.layer("conv_a").block["opts"] = ["NoSuchOption", 1]
    with pytest.raises(TranslationError, match=r"layer 1 'conv_a' \(dagnn\.Conv\).*NoSuchOption"):
        to_keras_dag(net)


def test_names_are_made_safe_and_unique():
    net = DagNet(
        [
            DagLayer("a/b", "dagnn.Conv", ["x y"], ["a_b"], ["f"], {"pad": 1, "has_bias": False}),
            DagLayer("a_b", "dagnn.ReLU", ["a_b"], ["out"], []),
        ],
        params=[Param("f", np.ones((3, 3, 2, 2)))],
    )
    model = to_keras_dag(net)
    assert dag_keras_layers(net) == {"a/b": "a_b", "a_b": "a_b_"}
    assert {l.name for l in model.layers} == {"x_y", "a_b_pad", "a_b", "a_b_"}


def test_custom_layers_serialise(tmp_path):
    for make in (_fcn_net, _scale_net):
        net = make()
        depth = 4 if make is _scale_net else None
        model = to_keras_dag(net, input_sizes={v: (5, 6, depth) for v in dag_inputs(net)})
        path = tmp_path / f"{make.__name__}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        x = np.random.RandomState(22).randn(2, 5, 6, 4 if make is _scale_net else 3)
        for a, b in zip(_as_list(loaded(x)), _as_list(model(x)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for layer in (MatConvNetCrop((1, 2)), MatConvNetScale((1, 1, 1, 3), None, True)):
        cfg = layer.get_config()
        assert type(layer).from_config(cfg).get_config() == cfg
        assert CUSTOM_OBJECTS[type(layer).__name__] is type(layer)


# --------------------------------------------------------------------------- golden cases


GOLDEN_CASES = [c["name"] for c in _manifest() if c["family"] == "dagnn"]


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_case(name):
    """Forward: the model outputs against MatConvNet's var values, and against the reference
    run in float64 on the same net and inputs. Backward (where MatConvNet ran it): the
    model's vector-Jacobian product with MatConvNet's derivative of each output var against
    MatConvNet's derivative of each input var."""
    case = _case(name)
    net = _golden_net(case)
    out = case["outputs"]
    var = dict(zip(out["var_names"], range(len(out["var_names"])), strict=True))
    inputs = {k: np.asarray(case["inputs"][k]) for k in case["input_names"]}
    mode = case["opts"]["mode"]
    training = mode == "normal"
    model = to_keras_dag(net, input_sizes={v: inputs[v].shape[:3] for v in dag_inputs(net)})
    data = {k: v.astype(np.float64) for k, v in inputs.items()}
    got = _keras_call(net, model, data, training)
    for v, g, w in zip(dag_outputs(net), got, _reference(net, data, mode), strict=True):
        assert _rel(g, w) < TOL, f"{v}: {_rel(g, w):.3g} against the reference in float64"
        err = _rel(g, out["var_value"][var[v]])
        assert err < GOLDEN_TOL, f"{v}: {err:.3g} against MatConvNet"
    if case["backward_error"]:
        return
    # every output var is read by Loss layers only (or by nothing): its MatConvNet
    # derivative is the whole seed of that output
    assert not {v for l in net.layers if l.type != "dagnn.Loss" for v in l.inputs} & set(dag_outputs(net))
    names = dag_inputs(net)
    xs = [tf.constant(to_nhwc(data[v])) for v in names]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        ys = _as_list(model(xs[0] if len(xs) == 1 else xs, training=training))
    seeds = [
        to_nhwc(np.asarray(out["var_der"][var[v]], np.float64).reshape(to_hwcn(y.numpy()).shape))
        for v, y in zip(dag_outputs(net), ys, strict=True)
    ]
    grads = tape.gradient(ys, xs, output_gradients=[tf.constant(s) for s in seeds])
    for v, g in zip(names, grads, strict=True):
        err = _rel(to_hwcn(g.numpy()), out["var_der"][var[v]])
        assert err < GOLDEN_TOL, f"d/d{v}: {err:.3g} against MatConvNet"
