"""harness.compare on user models: the question's model, the corrected one, planted bugs."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import harness
from fixtures.seed import fixed_model, question_model
from harness.mcn import seed_net
from harness.translate import to_keras


@pytest.fixture(scope="module")
def seed():
    return seed_net(seed=0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(7)
    return rng.randn(28, 28, 1, 4), np.array([[1.0, 2.0, 2.0, 1.0]])


def test_question_model_flagged_first_at_ip1_for_groups(seed, batch):
    model = question_model.build_model()
    assert model.output_shape == (None, 2)
    assert model.get_layer("flatten_1").input.shape[1:] == (1, 1, 256)  # 1x1 spatial: 1x1x2 per image
    report = harness.compare(seed, model, *batch)
    assert not report.ok
    fd = report.first_divergence
    assert fd["culprit"] == "ip1" and fd["keras"] == "conv2d_5" and fd["tensor"] == "dzdw{1}*"
    assert any("2 filter groups" in n and "conv2d_5" in n for n in report.notes)
    # the block-diagonal embedding keeps the forward pass and every other gradient equal
    others = [r for r in report.rows if r.tensor != "dzdw{1}*"]
    assert all(r.ok for r in others), str(report)


def test_fixed_model_is_equivalent(seed, batch):
    model = fixed_model.build_model()
    assert model.get_layer("classifier").output.shape[1:] == (1, 1, 2)
    report = harness.assert_equivalent(seed, model, *batch)
    assert report.ok and not report.alignment_problems
    assert max(r.max_rel for r in report.rows) < 1e-12


def test_report_text_and_json(seed, batch):
    report = harness.compare(seed, question_model.build_model(), *batch, dialect="beta25")
    data = json.loads(report.to_json())
    assert data["schema"] == "mcn-harness/report/4" and data["ok"] is False
    assert data["first_divergence"]["culprit"] == "ip1"
    assert "summed over pixels and over the batch" in data["convention"]
    row = next(r for r in data["rows"] if r["tensor"] == "dzdw{1}*")
    assert row["mismatches"] > 0 and row["max_abs"] > 0
    text = str(report)
    assert "DIVERGENT" in text and "first divergence: layer 'ip1'" in text and "DIFF" in text
    assert report.to_json() == report.to_json()  # stable


def test_assert_equivalent_raises_with_the_table(seed, batch):
    with pytest.raises(AssertionError, match="first divergence: layer 'ip1'"):
        harness.assert_equivalent(seed, question_model.build_model(), *batch)


@pytest.mark.parametrize(
    "bug, culprit",
    [
        ("wrong_stride", "pool2"),
        ("missing_relu", "relu1"),
        ("extra_relu", "conv3"),
        ("softmax_twice", "loss"),
    ],
)
def test_planted_bugs_are_localised(seed, batch, bug, culprit):
    model = to_keras(seed)
    L = keras.layers
    x = inputs = keras.Input((28, 28, 1), dtype="float64")
    for layer in model.layers[1:]:
        if bug == "wrong_stride" and layer.name == "pool2":
            layer = L.MaxPooling2D(2, strides=1, name="pool2", dtype="float64")
        if bug == "missing_relu" and layer.name == "relu1":
            continue
        x = layer(x)
        if bug == "extra_relu" and layer.name == "conv3":
            x = L.ReLU(name="extra_relu", dtype="float64")(x)
    if bug == "softmax_twice":
        x = L.Softmax(name="prob", dtype="float64")(x)
        x = L.Softmax(name="prob_again", dtype="float64")(x)
    report = harness.compare(seed, keras.Model(inputs, x), *batch)
    assert not report.ok
    assert report.first_divergence["culprit"] == culprit, str(report)


def test_extra_relu_before_a_dilated_strided_conv_is_blamed_on_the_layer_before():
    """The Keras partner of a dilated, strided conv is ``Conv2D`` + ``Subsample``; with an
    extra ReLU before it, the conv's nearest Keras tensor has another shape, and the
    extra operation is still found by running MatConvNet's conv on the ReLU's output."""
    from harness.mcn import Layer, Net
    from harness.testing.bugs import CATALOGUE

    rng = np.random.default_rng(0)
    net = Net(
        [
            Layer("conv", "conv1", [np.array([[[[1.0]]]]), np.array([[0.0]])]),
            Layer(
                "conv",
                "conv2",
                [rng.standard_normal((1, 1, 1, 1)), np.zeros((1, 1))],
                pad=[0, 0, 0, 1],
                stride=[1, 2],
                dilate=[1, 2],
            ),
            Layer("conv", "classifier", [rng.standard_normal((1, 1, 1, 2)), np.zeros((1, 2))]),
            Layer("softmaxloss", "loss"),
        ],
        meta={"inputSize": [1, 1, 1]},
    )
    x = np.array([0.5, -0.5]).reshape(1, 1, 1, 2)
    labels = np.array([[1.0, 2.0]])
    model = to_keras(net)
    assert harness.compare(net, model, x, labels).ok
    buggy, planted = CATALOGUE["extra_relu"].plant(net, model, 0)
    report = harness.compare(net, buggy, x, labels)
    assert not report.ok
    assert planted == "conv1" and report.first_divergence["culprit"] == "conv1", str(report)


def test_a_batch_norms_own_output_is_preferred_to_its_mean_of_the_same_value():
    """On one image a bnorm's output is its bias; with two equal bnorms in a row the
    second's batch mean (a tensor inside it) equals its output, and a derivative taken
    there is not the layer's: the layer's own output is the match."""
    from harness.mcn import Layer, Net

    bn = [np.array([[1.07]]), np.array([[0.08]]), np.array([[0.17, 1.45]])]
    net = Net(
        [
            Layer("sigmoid", "sigmoid1"),
            Layer("bnorm", "bnorm1", [w.copy() for w in bn]),
            Layer("bnorm", "bnorm2", [w.copy() for w in bn]),
            Layer(
                "conv", "classifier", [np.array([0.18, -0.19]).reshape(1, 1, 1, 2), np.array([[0.06, 0.01]])]
            ),
            Layer("softmaxloss", "loss"),
        ],
        meta={"inputSize": [1, 1, 1]},
    )
    report = harness.compare(net, to_keras(net), np.full((1, 1, 1, 1), 0.13), np.array([[1.0]]))
    assert report.ok, str(report)
    assert all(r.keras == "bnorm2" for r in report.rows if r.layer == "bnorm2"), str(report)


def test_a_stride_the_next_pooling_undoes_is_unobservable_and_called_equivalent():
    """A stride-1 max pooling of a 1-pixel map (padded both sides) gives two copies of
    the pixel; a pooling with stride 3 after it keeps the first: the buggy model computes
    MatConvNet's function on every input of this size. The catalogue says the bug cannot
    show, and the harness finds every MatConvNet output reproduced."""
    from harness.mcn import Layer, Net
    from harness.testing.bugs import CATALOGUE
    from harness.testing.observability import reference

    rng = np.random.default_rng(1)
    net = Net(
        [
            Layer("conv", "conv1", [rng.standard_normal((3, 3, 2, 3)), np.zeros((1, 3))]),
            Layer("pool", "pool1", method="max", pool=[2, 1], pad=[1, 1, 0, 0], stride=[2, 1]),
            Layer("pool", "pool2", method="max", pool=[1, 1], stride=[3, 1]),
            Layer("conv", "classifier", [rng.standard_normal((1, 1, 3, 2)), np.zeros((1, 2))]),
            Layer("softmaxloss", "loss"),
        ],
        meta={"inputSize": [3, 3, 2]},
    )
    x, labels = rng.standard_normal((3, 3, 2, 2)), np.array([[1.0, 2.0]])
    bug = CATALOGUE["wrong_stride"]
    assert 1 in bug.sites(net)
    assert not bug.observable(net, reference(net, x, labels), 1, labels)
    buggy, _ = bug.plant(net, to_keras(net), 1)
    assert buggy.get_layer("pool1").output.shape[1] == 2  # the bug is planted
    assert harness.compare(net, buggy, x, labels).ok


def test_an_all_zero_output_is_looked_for_only_in_its_own_keras_layers():
    """A 1x1 conv whose stride samples only its padding outputs zeros; so does the next
    one. With the padding sides swapped in Keras' first conv, the zeros of the second conv
    must not pass for the first conv's output: the divergence is the first conv's."""
    from harness.mcn import Layer, Net
    from harness.testing.bugs import CATALOGUE

    rng = np.random.default_rng(4)
    strided = {"pad": [1, 1, 1, 0], "stride": [3, 3], "dilate": [2, 1]}
    net = Net(
        [
            Layer("conv", "conv1", [rng.standard_normal((1, 1, 2, 5)), np.zeros((0, 0))], **strided),
            Layer("bnorm", "bnorm1", [np.ones((5, 1)), np.zeros((5, 1)), np.ones((5, 2))]),
            Layer("conv", "conv2", [rng.standard_normal((1, 1, 5, 5)), np.zeros((0, 0))], **strided),
            Layer("bnorm", "bnorm2", [np.ones((5, 1)), np.zeros((5, 1)), np.ones((5, 2))]),
            Layer("conv", "classifier", [rng.standard_normal((1, 1, 5, 2)), np.zeros((1, 2))]),
            Layer("softmaxloss", "loss"),
        ],
        meta={"inputSize": [4, 1, 2]},
    )
    x, labels = rng.standard_normal((4, 1, 2, 3)), np.array([[2.0, 2.0, 1.0]])
    model = to_keras(net)
    assert harness.compare(net, model, x, labels).ok
    buggy, planted = CATALOGUE["wrong_padding_side"].plant(net, model, 0)
    report = harness.compare(net, buggy, x, labels)
    assert not report.ok and report.first_divergence["culprit"] == planted == "conv1", str(report)
