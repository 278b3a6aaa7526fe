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

The checks are tests/translate/dag_helpers.py, the small nets tests/translate/dag_nets.py;
weights, sizes and errors: tests/translate/test_dag_weights.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from harness.mcn import seed_net
from harness.mcn.dagnn import DagNet
from harness.translate import (
    TranslationError,
    dag_inputs,
    dag_keras_layers,
    dag_outputs,
    dag_params_from_keras,
    to_hwcn,
    to_keras,
    to_keras_dag,
    to_nhwc,
)

from ..golden_dagnn import case as _case
from ..golden_dagnn import manifest as _manifest
from ..golden_dagnn import net as _golden_net
from .dag_helpers import TOL, as_list, check, keras_call, reference, rel
from .dag_nets import (
    batch,
    blocks_net,
    fcn_net,
    inception_net,
    recursive_net,
    residual_net,
    scale_net,
    two_inputs_net,
)

GOLDEN_TOL = 2e-5


# --------------------------------------------------------------------------- equivalence

# the Keras layers the blocks of blocks_net become (its Conv: padding, strided dilation)
BLOCKS_NET_KERAS = {
    "dagnn.Conv": ("ZeroPadding2D", "Conv2D", "Subsample"),
    "dagnn.ReLU": ("MatConvNetLeakyReLU", "ReLU"),
    "dagnn.Pooling": ("MatConvNetPooling", "AveragePooling2D"),
    "dagnn.LRN": ("MatConvNetLRN",),
    "dagnn.DropOut": ("Dropout",),
    "dagnn.Sigmoid": ("Activation",),
    "dagnn.SoftMax": ("Softmax",),
}


@pytest.mark.parametrize("size", [(16, 14, 3), (None, None, 3)], ids=["static", "dynamic"])
def test_every_single_input_block(size):
    net = blocks_net()
    model = check(net, {"x": batch(np.random.RandomState(10), 16, 14, 3, 2)}, input_sizes={"x": size})
    kinds = {type(l).__name__ for l in model.layers}
    assert {kind for layers in BLOCKS_NET_KERAS.values() for kind in layers} <= kinds
    assert model.get_layer("conv_g").groups == 2 and not model.get_layer("conv_d").use_bias
    assert model.get_layer("drop").rate == pytest.approx(0.3)


@pytest.mark.parametrize("mode", ["test", "normal"])
def test_residual_sum_and_batchnorm(mode):
    """BatchNorm: moments in mode test (training=False; MatConvNet has no backward there),
    batch statistics in mode normal (training=True), forward and backward."""
    net = residual_net()
    bn = to_keras_dag(net).get_layer("bn1")
    x = batch(np.random.RandomState(11), 6, 6, 3, 4)
    check(net, {"input": x}, mode=mode, backward=mode == "normal")
    assert dag_inputs(net) == ["input"] and dag_outputs(net) == ["prediction"]
    assert bn.epsilon == pytest.approx(1e-4) and bn.momentum == pytest.approx(0.9)
    m = net.param("bn1m").value
    np.testing.assert_allclose(bn.moving_variance.numpy(), m[:, 1] ** 2 - 1e-4, rtol=1e-14)


def test_inception_concat_and_three_outputs():
    net = inception_net()
    model = check(net, {"x": batch(np.random.RandomState(12), 7, 7, 4, 2)}, input_sizes={"x": (7, 7, 4)})
    assert dag_outputs(net) == ["out1", "out2", "out3"]
    assert [tuple(s) for s in model.output_shape] == [(None, 7, 7, 3), (None, 14, 7, 2), (None, 7, 7, 2)]


@pytest.mark.parametrize("size", [(9, 11), (10, 12)])
def test_fcn_skip_with_unknown_input_size(size):
    """No input size anywhere: the model is fully convolutional, (None, None, 3) with the
    depth from conv1's filters; Crop reads the sizes when it runs (9 rows: the upsampled map
    has 10, top = min(1, 1) = 1; 10 rows: 12, top 1 and bottom 1)."""
    net = fcn_net()
    x = batch(np.random.RandomState(13), *size, 3, 2)
    model = check(net, {"input": x})
    assert model.input_shape == (None, None, None, 3)
    assert dag_inputs(net) == ["input"] and dag_outputs(net) == ["prediction", "upg", "ups"]
    kinds = {type(l).__name__ for l in model.layers}
    assert {"MatConvNetCrop", "Conv2DTranspose", "GroupedConv2DTranspose", "Cropping2D", "Add"} <= kinds


def test_fcn_skip_with_static_sizes_and_size_checks():
    net = fcn_net()
    model = check(
        net, {"input": batch(np.random.RandomState(14), 9, 11, 3, 1)}, input_sizes={"input": (9, 11, 3)}
    )
    assert model.get_layer("crop").output.shape == (None, 9, 11, 2)
    net.layer("crop").inputs = ["skip", "up"]  # crop to a larger size
    net.rebuild()
    with pytest.raises(TranslationError, match=r"layer 7 'crop' \(dagnn\.Crop\).*at least as large"):
        to_keras_dag(net, input_sizes={"input": (9, 11, 3)})


def test_shared_params_are_one_keras_layer():
    net = recursive_net()
    model = check(net, {"x": batch(np.random.RandomState(15), 8, 7, 1, 2)})
    names = dag_keras_layers(net)
    assert names["rec1"] == names["rec2"] == names["rec3"] == "rec1"
    assert len(model.weights) == len(net.params) == 6
    assert len(model.get_layer("rec1")._inbound_nodes) == 3
    assert model.get_layer("rec3_pad").padding == ((2, 0), (1, 1))
    # the shared params' derivative: summed over the three layers, as DagNN.eval does
    x = batch(np.random.RandomState(15), 8, 7, 1, 2)
    net.reset()
    net.eval({"x": x}, {"y": np.ones((8, 7, 1, 2))}, mode="test")
    layer = model.get_layer("rec1")
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(model(tf.constant(to_nhwc(x))))
    dk, db = tape.gradient(total, [layer.kernel, layer.bias])
    assert rel(dk.numpy(), net.param("shared_f").der) < TOL
    assert rel(db.numpy(), net.param("shared_b").der) < TOL
    # weights back: the shared params are read once, from the one Keras layer
    kernel = model.get_layer("rec1").kernel
    kernel.assign(kernel.numpy() * 2)
    back = dag_params_from_keras(net, model)
    np.testing.assert_array_equal(back.param("shared_f").value, 2 * net.param("shared_f").value)
    x = batch(np.random.RandomState(16), 8, 7, 1, 2)
    np.testing.assert_allclose(
        keras_call(back, model, {"x": x}, False)[0], reference(back, {"x": x}, "test")[0], rtol=1e-10
    )


def test_partly_shared_params_are_refused():
    net = recursive_net()
    net.layer("rec2").params = ["shared_f", "out_b"]
    net.rebuild()
    with pytest.raises(TranslationError, match=r"'rec2' \(dagnn\.Conv\): shares param\(s\) shared_f"):
        to_keras_dag(net)
    net = recursive_net()
    net.layer("rec2").block["stride"] = np.array([2.0, 2.0])
    with pytest.raises(TranslationError, match="not all its params and block properties"):
        to_keras_dag(net)


@pytest.mark.parametrize("size", [(5, 6, 4), (None, None, 4)], ids=["static", "dynamic"])
def test_scale_by_params_and_vars(size):
    net = scale_net()
    model = check(net, {"x": batch(np.random.RandomState(17), 5, 6, 4, 3)}, input_sizes={"x": size})
    assert model.get_layer("scale1").scale.shape == (1, 1, 1, 4)
    assert model.get_layer("scale3").scale.shape == (1, 5, 6, 1)
    assert not model.get_layer("scale4").weights
    assert [w.name for w in model.get_layer("scale2").weights] == ["bias"]


def test_two_inputs_labels_and_loss_outputs():
    net = two_inputs_net()
    r = np.random.RandomState(18)
    inputs = {"x1": batch(r, 6, 5, 2, 2), "x2": batch(r, 4, 3, 2, 2)}
    model = check(net, inputs)
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
    check(dag, {"x0": x})


# --------------------------------------------------------------------------- weights, sizes, errors


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
    got = keras_call(net, model, data, training)
    for v, g, w in zip(dag_outputs(net), got, reference(net, data, mode), strict=True):
        assert rel(g, w) < TOL, f"{v}: {rel(g, w):.3g} against the reference in float64"
        err = rel(g, out["var_value"][var[v]])
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
        ys = as_list(model(xs[0] if len(xs) == 1 else xs, training=training))
    seeds = [
        to_nhwc(np.asarray(out["var_der"][var[v]], np.float64).reshape(to_hwcn(y.numpy()).shape))
        for v, y in zip(dag_outputs(net), ys, strict=True)
    ]
    grads = tape.gradient(ys, xs, output_gradients=[tf.constant(s) for s in seeds])
    for v, g in zip(names, grads, strict=True):
        err = rel(to_hwcn(g.numpy()), out["var_der"][var[v]])
        assert err < GOLDEN_TOL, f"d/d{v}: {err:.3g} against MatConvNet"
