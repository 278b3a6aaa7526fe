"""Hypothesis properties of the translation and the comparison engine, on generated nets.

(a) ``to_keras(net)`` is equivalent to the reference -- every activation, every derivative,
    every parameter derivative -- for every generated net, in both modes and dialects.
    'test' mode has one documented difference (MatConvNet's vl_simplenn differentiates
    bnorm with batch statistics although its forward pass used the stored moments; Keras
    differentiates through the moments). The nets keep their bnorm layers and the
    property accepts exactly the rows that quirk explains, and nothing else: nets without
    bnorm must be fully equivalent; with bnorm, every forward row and every derivative
    from the loss down to the last bnorm's output must agree, only that bnorm's gain
    derivative and the derivatives below it may differ, the report must list the
    limitation and blame that bnorm layer, and it must say DIVERGENT whenever that
    bnorm receives a non-zero derivative.
(b) weight transfer round-trips: ``net_from_keras(to_keras(net), net) == net`` (bnorm
    sigma to rounding: it travels as ``sigma^2 - epsilon``).
(c) every bug of ``harness.testing.bugs`` that applies to a generated net, planted at a
    drawn site, is detected and blamed on the planted layer whenever the batch can show
    it (``bug.observable``: judged from the reference alone), and is never blamed on
    another layer; the unmodified translation is never flagged.

Examples come from the Hypothesis profile (``ci``: 100 per property, derandomised).
Nets are small (sides <= 12, channels <= 8, batch <= 3); a grouped conv costs an XLA
compilation per call in Keras' TensorFlow backend and dominates the run time.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

import harness
from harness.mcn import Layer, Net, vl_simplenn_tidy
from harness.testing.bugs import BUGS, CATALOGUE, reference
from harness.testing.strategies import net_inputs, simplenn_nets
from harness.translate import net_from_keras, to_keras

_built = [0]


def _model(net: Net, dtype: str = "float64"):
    """to_keras, clearing Keras' global state every 50 models so memory stays flat."""
    _built[0] += 1
    if _built[0] % 50 == 0:
        keras.backend.clear_session()
    return to_keras(net, dtype=dtype)


@st.composite
def cases(draw, **kwargs):
    """(net, x, labels): a generated net and a batch for it."""
    net = draw(simplenn_nets(**kwargs))
    x, labels = draw(net_inputs(net))
    return net, x, labels


def _tie_case():
    """A max pool meeting exact ties: a 1x1 conv padded by 1 writes its bias (5, above every
    real value) around the border, and the 2x2 window at the bottom-right corner holds it
    three times. MatConvNet's derivative goes to the first maximum in column-major order,
    stock MaxPooling2D's to the first in row-major order."""
    rng = np.random.default_rng(0)
    layers = [
        Layer("conv", "conv1", [np.ones((1, 1, 1, 1)), np.array([[5.0]])], pad=1.0),
        Layer("pool", "pool1", method="max", pool=2.0, stride=1.0),
        Layer("conv", "classifier", [rng.standard_normal((4, 4, 1, 2)), rng.standard_normal((1, 2))]),
        Layer("softmaxloss", "loss"),
    ]
    net = vl_simplenn_tidy(Net(layers, {"inputSize": np.array([[3.0, 3.0, 1.0]])}))
    x = rng.standard_normal((3, 3, 1, 2))
    x[2, 2] = -1.0  # the corner window's real cell below the bias: a three-way tie at 5
    return net, x, np.array([[1.0, 2.0]])


# ------------------------------------------------------------------------------ (a)


def _check_test_mode_bnorm(report, net: Net, x, labels, dialect: str) -> None:
    """The documented test-mode bnorm limitation, and nothing more: the rows it explains
    are marked with it (so the report stays EQUIVALENT), every row that differs lies in
    its reach -- a derivative below the last bnorm layer, or that layer's gain derivative
    -- and the rows do differ whenever that bnorm receives a non-zero derivative."""
    names = [l.name for l in net.layers]
    last = max(i for i, l in enumerate(net.layers) if l.type == "bnorm")
    assert report.ok, str(report)
    lim = next((lim for lim in report.limitations if lim.kind == "bnorm-test-mode-backward"), None)
    assert lim is not None and "bnorm" in lim.text and "test mode" in lim.text, str(report)
    text = lim.text
    order = {n: i for i, n in enumerate(names)}
    order["input"] = -1
    for row in report.rows:
        i = order[row.layer]
        reach = (row.tensor.startswith(("dzdx", "dzdw")) and i < last) or (
            i == last and row.tensor == "dzdw{1}"
        )
        assert row.ok or (row.limitation == text and reach), (
            f"row {row.layer}/{row.tensor} differs beyond the bnorm quirk\n{report}"
        )
    res = reference(net, x, labels, mode="test", dialect=dialect)
    scale = max(float(np.abs(r.dzdx).max()) for r in res[: len(net.layers)])
    if float(np.abs(res[last + 1].dzdx).max()) > 1e-6 * scale:
        assert any(not r.ok for r in report.rows), f"the bnorm quirk went unseen\n{report}"
        event("test mode: bnorm quirk rows marked known")


@settings(deadline=None)
@given(case=cases(), dialect=st.sampled_from(["master", "beta25"]))
@example(case=_tie_case(), dialect="master")
def test_translation_is_equivalent(case, dialect):
    net, x, labels = case
    model = _model(net)
    normal = harness.compare(net, model, x, labels, mode="normal", dialect=dialect)
    assert normal.ok, str(normal)
    test = harness.compare(net, model, x, labels, mode="test", dialect=dialect)
    if any(l.type == "bnorm" for l in net.layers):
        _check_test_mode_bnorm(test, net, x, labels, dialect)
    else:
        assert test.ok, str(test)


# ------------------------------------------------------------------------------ (b)


@settings(deadline=None)
@given(net=st.sampled_from([np.float64, np.float32]).flatmap(lambda dt: simplenn_nets(dtype=dt)))
def test_weight_transfer_round_trips(net):
    dtype = np.asarray(net.layers[-2].weights[0]).dtype
    back = net_from_keras(_model(net, dtype.name), net)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    for a, b in zip(net.layers, back.layers, strict=True):
        if a.type == "bnorm":  # sigma -> sigma^2 - eps -> sqrt(. + eps)
            np.testing.assert_allclose(b.weights[2][:, 1], a.weights[2][:, 1], rtol=rtol)
            b.weights[2][:, 1] = a.weights[2][:, 1]
    assert back == net


# ------------------------------------------------------------------------------ (c)


@settings(deadline=None)
@given(case=cases(), data=st.data())
def test_planted_bugs_are_detected_and_localised(case, data):
    net, x, labels = case
    model = _model(net)
    faithful = harness.compare(net, model, x, labels, mode="normal")
    assert faithful.ok, str(faithful)
    res = reference(net, x, labels, mode="normal")
    for bug in BUGS:
        sites = bug.sites(net)
        if not sites:
            continue
        index = data.draw(st.sampled_from(sites), label=f"{bug.name} site")
        buggy, planted = bug.plant(net, model, index)
        report = harness.compare(net, buggy, x, labels, mode="normal", weights=bug.weights)
        fd = report.first_divergence
        where = f"{bug.name} planted at '{planted}' (layer {index + 1})\n{report}"
        if bug.observable(net, res, index, labels, mode="normal"):
            event(f"{bug.name}: observable")
            assert not report.ok, f"not detected: {where}"
            assert fd is not None and fd["culprit"] == planted, f"not localised: {where}"
        else:
            event(f"{bug.name}: not observable on this batch")
        if fd is not None:
            assert fd["culprit"] == planted, f"blamed on another layer: {where}"


def test_catalogue_entries_say_how_to_compare():
    assert len(CATALOGUE) >= 12
    for bug in BUGS:
        assert bug.weights in ("net", "model") and set(bug.modes) <= {"normal", "test"} and bug.modes
        assert bug.description and bug.layer_types and bug.name in str(bug)
    assert {b.name for b in BUGS if b.weights == "model"} == {
        "flipped_kernel",
        "transposed_kernel",
        "flatten_order",
    }
    assert CATALOGUE["bnorm_epsilon"].modes == ("normal",)


def _net_with_every_site() -> Net:
    """One small net on which every catalogue bug has a site: a grouped, strided,
    asymmetrically padded conv with a non-square kernel, bnorm, ReLU, a padded avg pool,
    LRN, a fully-connected classifier and a softmaxloss."""
    rng = np.random.default_rng(3)
    layers = [
        Layer(
            "conv",
            "conv1",
            [rng.standard_normal((3, 2, 1, 4)), rng.standard_normal((1, 4))],
            pad=[1, 0, 2, 1],
            stride=[2, 1],
        ),
        Layer("bnorm", "bn1", [1 + 0.2 * rng.standard_normal((4, 1)), rng.standard_normal((4, 1))]),
        Layer("relu", "relu1"),
        Layer("pool", "pool1", method="avg", pool=[2, 3], pad=[1, 0, 0, 2], stride=[1, 2]),
        Layer("lrn", "lrn1", param=[3, 1, 0.5, 0.75]),
        Layer("conv", "classifier", [rng.standard_normal((3, 5, 4, 3)), rng.standard_normal((1, 3))]),
        Layer("softmaxloss", "loss"),
    ]
    return vl_simplenn_tidy(Net(layers, {"inputSize": np.array([[6.0, 7.0, 2.0]])}))


@pytest.fixture(scope="module")
def every_site():
    net = _net_with_every_site()
    rng = np.random.default_rng(4)
    x, labels = rng.standard_normal((6, 7, 2, 3)), np.array([[1.0, 3.0, 0.0]])
    return net, _model(net), x, labels, reference(net, x, labels, mode="normal")


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_bug_is_detected_on_a_net_with_every_site(every_site, name):
    net, model, x, labels, res = every_site
    bug = CATALOGUE[name]
    sites = bug.sites(net)
    assert sites, f"{name} has no site on the demo net"
    shown = [i for i in sites if bug.observable(net, res, i, labels, mode="normal")]
    assert shown, f"{name} cannot show on the demo batch"  # (an extra ReLU after a ReLU cannot)
    for index in shown:
        buggy, planted = bug.plant(net, model, index)
        report = harness.compare(net, buggy, x, labels, mode="normal", weights=bug.weights)
        assert not report.ok and report.first_divergence["culprit"] == planted, str(report)
    assert harness.compare(net, model, x, labels, mode="normal").ok  # the model was left alone


def _chain(types: list[str], size=(3, 3, 2)) -> Net:
    rng = np.random.default_rng(5)
    layers, c = [], size[2]
    for i, t in enumerate(types):
        if t == "conv":
            layers.append(
                Layer("conv", f"conv{i}", [rng.standard_normal((1, 1, c, 3)), rng.standard_normal((1, 3))])
            )
            c = 3
        elif t == "pool":
            layers.append(Layer("pool", f"pool{i}", method="max", pool=2.0, stride=1.0))
        elif t == "lrn":
            layers.append(Layer("lrn", f"lrn{i}", param=[3, 1, 0.5, 0.75]))
        else:
            layers.append(Layer(t, f"{t}{i}"))
    layers.append(Layer("conv", "classifier", [rng.standard_normal((1, 1, c, 2)), np.zeros((1, 2))]))
    layers.append(Layer("softmaxloss", "loss"))
    return vl_simplenn_tidy(Net(layers, {"inputSize": np.array([list(map(float, size))])}))


@pytest.mark.parametrize(
    "types, bug, index",
    [
        (["conv", "relu", "sigmoid", "relu"], "missing_relu", 1),  # Keras: conv, sigmoid, relu
        (["conv", "lrn", "relu", "lrn"], "missing_relu", 2),  # Keras: conv, lrn, lrn
        (["conv", "conv", "relu", "relu"], "extra_relu", 0),  # Keras: conv, ReLU, conv, relu, relu
        (["conv", "pool", "relu"], "extra_relu", 0),  # Keras: conv, ReLU, pool, relu
    ],
)
def test_alignment_tells_a_missing_layer_from_an_extra_one(types, bug, index):
    """Regressions found by the bug property: either reading (a Keras layer is extra, or the
    next MatConvNet layer is missing) fits the layer after the planted spot."""
    net = _chain(types)
    x = np.random.default_rng(6).standard_normal((3, 3, 2, 2)) - 0.3
    labels = np.array([[1.0, 2.0]])
    assert CATALOGUE[bug].observable(net, reference(net, x, labels), index, labels)
    buggy, planted = CATALOGUE[bug].plant(net, _model(net), index)
    report = harness.compare(net, buggy, x, labels)
    assert report.first_divergence is not None and report.first_divergence["culprit"] == planted, str(report)
    # the structural reading, told as a hint beside the divergence: the one missing or extra layer
    assert len(report.hints) == 1, str(report)
