"""harness.equivalence.dag_run.compare_dag: a DagNN net against a Keras model, var by var.

Faithful translations (``to_keras_dag``) compare equivalent in modes normal and test;
planted bugs (a flipped kernel, an extra ReLU, a Sum made a Subtract) are found and blamed
on the DagNN layer they sit at.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from harness.equivalence.dag_run import compare_dag
from harness.equivalence.report import Divergence
from harness.mcn import seed_net
from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.options import McnError
from harness.translate.dag_build import to_keras_dag
from tests.translate.dag_nets import blocks_net, param, recursive_net, residual_net


def _residual_inputs(n: int = 3) -> dict[str, np.ndarray]:
    r = np.random.RandomState(5)
    return {"input": r.randn(6, 6, 3, n), "label": r.randint(1, 4, size=(1, 1, 1, n)).astype(float)}


def _assert_ok(report):
    assert report.ok, str(report)
    assert report.first_divergence is None


@pytest.mark.parametrize("mode", ["normal", "test"])
def test_residual_net_translation_is_equivalent(mode):
    net = residual_net()
    report = compare_dag(net, to_keras_dag(net), _residual_inputs(), mode=mode)
    _assert_ok(report)
    tensors = {(r.layer, r.tensor) for r in report.rows}
    assert ("s", "x") in tensors and ("objective", "loss") in tensors
    if mode == "normal":  # per var derivatives, per param derivatives, the input's
        assert {("s", "dzdx"), ("c2f", "dzdw{1}"), ("bn1g", "dzdw{1}"), ("input", "dzdx")} <= tensors
    else:  # MatConvNet's BatchNorm has no test-mode backward: forward only, said so
        assert not any(r.tensor.startswith("dz") for r in report.rows)
        assert any(l.kind == "bnorm-test-mode-backward" for l in report.limitations)


def test_net_is_not_changed():
    net = residual_net()
    before = [np.array(p.value, copy=True) for p in net.params]
    compare_dag(net, to_keras_dag(net), _residual_inputs())
    assert all(np.array_equal(a, p.value) for a, p in zip(before, net.params, strict=True))
    assert all(v.value is None for v in net.vars)


@pytest.mark.parametrize("mode", ["normal", "test"])
def test_shared_params_without_loss(mode):
    """Three layers share one conv's params: one Keras variable, whose gradient is the sum
    of MatConvNet's per-layer derivatives; no Loss: the derivative of the sum of the output."""
    net = recursive_net()
    x = np.random.RandomState(1).randn(7, 6, 1, 2)
    report = compare_dag(net, to_keras_dag(net, input_sizes={"x": (None, None, 1)}), {"x": x}, mode=mode)
    _assert_ok(report)
    shared = [r for r in report.rows if r.layer == "shared_f" and r.tensor == "dzdw{1}"]
    assert len(shared) == 1 and "derivatives summed" in shared[0].note


@pytest.mark.parametrize("mode", ["normal", "test"])
def test_blocks_net_with_dropout_and_lrn(mode):
    net = blocks_net()
    x = np.random.RandomState(2).randn(16, 14, 3, 2)
    model = to_keras_dag(net, input_sizes={"x": (16, 14, 3)})
    report = compare_dag(net, model, {"x": x}, mode=mode)
    _assert_ok(report)
    assert any(l.kind == "lrn-exact-power" for l in report.limitations)


@pytest.mark.parametrize("mode", ["normal", "test"])
def test_from_simplenn_seed_net(mode):
    net = DagNet.from_simplenn(seed_net(0))
    r = np.random.RandomState(7)
    inputs = {"x0": r.randn(28, 28, 1, 3), "label": np.array([[1.0, 2.0, 2.0]])}
    report = compare_dag(net, to_keras_dag(net), inputs, mode=mode)
    _assert_ok(report)
    text = str(report)
    for var in [f"x{k}" for k in range(1, 12)]:  # the text lists rows per var
        assert f"\n{var} " in text
    assert "x12" in text and "loss" in text


# ----------------------------------------------------------------------------- planted bugs


def test_flipped_kernel_blamed_on_its_layer():
    net = residual_net()
    model = to_keras_dag(net)
    k = model.get_layer("conv2")
    w, b = k.get_weights()
    k.set_weights([w[::-1, ::-1], b])
    report = compare_dag(net, model, _residual_inputs(), weights="model")
    assert not report.ok
    fd = report.first_divergence
    assert fd.culprit == "conv2", str(report)
    assert fd.layer == "c2f" and fd.tensor == "w{1}"
    bad = {r.layer for r in report.rows if r.tensor == "x" and not r.ok}
    assert "c2" in bad and "c1" not in bad and "p" not in bad


def _rebuilt_residual(net: DagNet, extra_relu: bool = False, subtract: bool = False) -> keras.Model:
    """The residual net's Keras model rebuilt from to_keras_dag's layers, with a planted bug."""
    base = to_keras_dag(net)
    L = base.get_layer
    x = keras.Input((6, 6, 3), dtype="float64", name="input")
    c1 = L("conv1")(L("conv1_pad")(x))
    r1 = L("relu1")(L("bn1")(c1))
    b2 = L("bn2")(L("conv2")(L("conv2_pad")(r1)))
    p = L("proj")(x)
    if extra_relu:
        p = keras.layers.ReLU(name="extra_relu", dtype="float64")(p)
    if subtract:
        s = keras.layers.Subtract(name="sum", dtype="float64")([b2, p])
    else:
        s = L("sum")([b2, p])
    y = L("fc")(L("pool")(L("relu2")(s)))
    return keras.Model(x, y)


def test_rebuilt_model_is_equivalent():
    net = residual_net()
    _assert_ok(compare_dag(net, _rebuilt_residual(net), _residual_inputs()))


# an extra ReLU is blamed on the layer it follows; a Sum made a Subtract on the Sum
EXTRA_RELU = Divergence(layer="p", keras="extra_relu", tensor="x+", culprit="proj")
SUBTRACT = Divergence(layer="s", keras="sum", tensor="x", culprit="sum")


@pytest.mark.parametrize(
    ("bug", "options", "blamed"),
    [
        ("extra_relu", {"mode": "normal"}, EXTRA_RELU),
        ("extra_relu", {"mode": "test"}, EXTRA_RELU),
        ("subtract", {"weights": "net"}, SUBTRACT),
        ("subtract", {"weights": "model"}, SUBTRACT),
    ],
)
def test_planted_bug_blamed_on_its_layer(bug, options, blamed):
    net = residual_net()
    report = compare_dag(net, _rebuilt_residual(net, **{bug: True}), _residual_inputs(), **options)
    assert not report.ok
    assert report.first_divergence == blamed, str(report)


# ----------------------------------------------------------------------------- errors


def test_other_loss_types_raise_naming_the_layer():
    net = residual_net()
    net.layer("loss").block["loss"] = "logistic"
    with pytest.raises(McnError, match="'loss'.*logistic"):
        compare_dag(net, to_keras_dag(net), _residual_inputs())


def test_classerror_is_a_metric():
    net = residual_net()
    net.add_layer("err", "dagnn.Loss", ["prediction", "label"], ["error"], [], {"loss": "classerror"})
    report = compare_dag(net, to_keras_dag(net), _residual_inputs())
    _assert_ok(report)
    assert any("'err'" in n and "metric" in n for n in report.notes)


def test_weights_net_needs_dag_layer_names():
    net = residual_net()
    model = _rebuilt_residual(net)
    renamed = keras.models.clone_model(
        model, clone_function=lambda l: l.__class__.from_config({**l.get_config(), "name": "k_" + l.name})
    )
    with pytest.raises(McnError, match="weights='model'"):
        compare_dag(net, renamed, _residual_inputs())


def test_missing_labels_and_unknown_inputs():
    net = residual_net()
    model = to_keras_dag(net)
    inputs = _residual_inputs()
    with pytest.raises(McnError, match="label"):
        compare_dag(net, model, {"input": inputs["input"]})
    with pytest.raises(McnError, match="nope"):
        compare_dag(net, model, {**inputs, "nope": inputs["input"]})


def test_simple_chain_built_with_the_dagnet_api():
    r = np.random.RandomState(3)
    net = DagNet(
        [
            DagLayer("c", "dagnn.Conv", ["data"], ["h"], ["f", "b"], {"pad": 1, "stride": 2}),
            DagLayer("r", "dagnn.ReLU", ["h"], ["hr"], []),
            DagLayer("d", "dagnn.Conv", ["hr"], ["score"], ["g", "gb"]),
            DagLayer("l", "dagnn.Loss", ["score", "lab"], ["obj"], [], {"loss": "softmaxlog"}),
        ],
        params=[
            param("f", r, 3, 3, 2, 4),
            param("b", r, 4, 1),
            param("g", r, 4, 4, 4, 3),
            param("gb", r, 3, 1),
        ],
    )
    inputs = {"data": r.randn(8, 8, 2, 2), "lab": np.array([[2.0, 3.0]])}
    model = to_keras_dag(net, input_sizes={"data": (8, 8, 2)})
    _assert_ok(compare_dag(net, model, inputs))
    _assert_ok(compare_dag(net, model, inputs, mode="test", dtype="float32"))
