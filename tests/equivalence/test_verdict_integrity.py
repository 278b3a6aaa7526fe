"""Verdict integrity at the library level: NaN/Inf anywhere never gives EQUIVALENT, the
blame lands on the layer that went non-finite, and reports stay strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

import harness
from fixtures.seed import fixed_model
from harness.mcn import Layer, McnError, Net, seed_net, vl_simplenn_tidy
from harness.translate import to_keras


def _strict(text: str) -> dict:
    def refuse(token):
        raise AssertionError(f"invalid JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(7)
    return rng.randn(28, 28, 1, 4), np.array([[1.0, 2.0, 2.0, 1.0]])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_classifier_bias_is_divergent_at_the_classifier(batch, bad):
    net = seed_net(seed=0)
    net.layer("classifier").weights[1][0, 1] = bad
    report = harness.compare(net, fixed_model.build_model(), *batch)
    assert not report.ok
    assert any("classifier" in p and "weights{2}" in p for p in report.problems)
    assert report.first_divergence["culprit"] == "classifier"
    row = next(r for r in report.rows if r.layer == "classifier" and r.tensor == "x")
    assert not row.ok and row.nonfinite_ref > 0 and "not finite" in row.note
    data = _strict(report.to_json())
    assert data["ok"] is False and data["problems"]
    assert "EQUIVALENT" not in str(report).splitlines()[0]


def test_nonfinite_model_weight_with_weights_model_is_divergent(batch):
    net = seed_net(seed=0)
    model = to_keras(net)
    kernel, bias = model.get_layer("classifier").get_weights()
    bias[0] = np.nan
    model.get_layer("classifier").set_weights([kernel, bias])
    report = harness.compare(net, model, *batch, weights="model")
    assert not report.ok
    assert report.first_divergence["culprit"] == "classifier"
    assert any("Keras variable" in p for p in report.problems)
    _strict(report.to_json())


def test_nan_in_an_unused_bnorm_moment_still_refuses_equivalence():
    """Normal mode never reads the moments: the batch cannot reach the NaN, the verdict
    must still not be EQUIVALENT."""
    rng = np.random.RandomState(0)
    net = vl_simplenn_tidy(
        Net(
            [
                Layer("conv", "c1", [rng.randn(3, 3, 1, 2), np.zeros((1, 2))]),
                Layer("bnorm", "bn", [np.ones(2), np.zeros(2), np.array([[0.0, 1.0], [np.nan, 1.0]])]),
                Layer("conv", "c2", [rng.randn(6, 6, 2, 2), np.zeros((1, 2))]),
                Layer("softmaxloss", "loss"),
            ],
            {"inputSize": [8, 8, 1]},
        )
    )
    x = rng.randn(8, 8, 1, 3)
    report = harness.compare(net, to_keras(net), x, np.array([[1.0, 2.0, 1.0]]))
    assert not report.ok and report.problems
    assert all(r.ok for r in report.rows if not r.limitation), "the rows themselves agree"


def test_bnorm_epsilon_zero_on_a_dead_channel_blames_the_bnorm():
    rng = np.random.RandomState(0)
    f = rng.randn(3, 3, 1, 2)
    f[..., 1] = 0  # channel 2 is constant: its variance is exactly 0
    net = vl_simplenn_tidy(
        Net(
            [
                Layer("conv", "c1", [f, np.zeros((1, 2))]),
                Layer("bnorm", "bn", [np.ones(2), np.zeros(2)], epsilon=0.0),
                Layer("conv", "c2", [rng.randn(6, 6, 2, 2), np.zeros((1, 2))]),
                Layer("softmaxloss", "loss"),
            ],
            {"inputSize": [8, 8, 1]},
        )
    )
    report = harness.compare(net, to_keras(net), rng.randn(8, 8, 1, 3), np.array([[1.0, 2.0, 1.0]]))
    assert not report.ok
    assert report.first_divergence["culprit"] == "bn", report.first_divergence
    _strict(report.to_json())


def test_nonfinite_input_batch_is_an_error(batch):
    x, labels = batch
    x = x.copy()
    x[0, 0, 0, 1] = np.nan
    with pytest.raises(McnError, match=r"x \(the input batch\) holds 1 NaN"):
        harness.compare(seed_net(seed=0), fixed_model.build_model(), x, labels)


def test_report_names_are_sanitised_and_html_takes_any_name(batch):
    from harness.equivalence.report import to_html

    net = seed_net(seed=0)
    net.layer("classifier").name = "cls\x1b[2J\nmcn-harness report: EQUIVALENT\ud800<script>"
    model = fixed_model.build_model()
    report = harness.compare(net, model, *batch, mapping={net.layers[-2].name: ["classifier"]})
    text = str(report)
    assert "\x1b" not in text and "\ud800" not in text
    assert sum(line.startswith("mcn-harness report:") for line in text.splitlines()) == 1
    page = to_html(report)
    page.encode("utf-8")  # no lone surrogate survives
    assert "<script>" not in page and "&lt;script&gt;" in page
    _strict(report.to_json())
