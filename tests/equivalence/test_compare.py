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
