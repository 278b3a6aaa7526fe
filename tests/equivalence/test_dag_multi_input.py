"""compare_dag on a DagNN net of two data inputs and two outputs (issue 13).

Two branches share one conv's params; each output is compared, derivatives flow from both
(one seed per output, or per Loss); the model's inputs are matched to the data vars by
name, else by order with the shapes checked, and a misfed model is never equivalent.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import harness
from harness.equivalence.dag_run import compare_dag
from harness.mcn.dagnn import DagLayer, DagNet, Param
from harness.mcn.options import McnError
from harness.translate.dag_build import to_keras_dag

SIZE = (6, 6, 2)


def two_branch_net(*, losses: bool = False) -> DagNet:
    """Data inputs 'left' and 'right' through one conv's params (``sf``, ``sb``), a ReLU
    each, summed; outputs 'yl' (a conv on the left branch) and 'ys' (a conv on the sum);
    with ``losses``, a softmaxlog Loss on each (labels 'label_l', 'label_s')."""
    r = np.random.RandomState(11)
    layers = [
        DagLayer("conv_l", "dagnn.Conv", ["left"], ["hl"], ["sf", "sb"], {"pad": 1}),
        DagLayer("conv_r", "dagnn.Conv", ["right"], ["hr"], ["sf", "sb"], {"pad": 1}),
        DagLayer("relu_l", "dagnn.ReLU", ["hl"], ["rl"], []),
        DagLayer("relu_r", "dagnn.ReLU", ["hr"], ["rr"], []),
        DagLayer("sum", "dagnn.Sum", ["rl", "rr"], ["s"], []),
        DagLayer("head_l", "dagnn.Conv", ["rl"], ["yl"], ["lf", "lb"]),
        DagLayer("head_s", "dagnn.Conv", ["s"], ["ys"], ["hf", "hb"]),
    ]
    if losses:
        layers += [
            DagLayer("loss_l", "dagnn.Loss", ["yl", "label_l"], ["obj_l"], []),
            DagLayer("loss_s", "dagnn.Loss", ["ys", "label_s"], ["obj_s"], []),
        ]
    shapes = {
        "sf": (3, 3, 2, 4),
        "sb": (4, 1),
        "lf": (1, 1, 4, 3),
        "lb": (3, 1),
        "hf": (3, 3, 4, 3),
        "hb": (3, 1),
    }
    return DagNet(layers, params=[Param(name, 0.5 * r.randn(*shape)) for name, shape in shapes.items()])


def batch(*, losses: bool = False, n: int = 2) -> dict[str, np.ndarray]:
    """A batch of ``n`` for ``two_branch_net``: both data inputs (6 x 6 x 2) and, with
    ``losses``, per-pixel labels of the two score maps (6 x 6 and 4 x 4, classes 1..3)."""
    r = np.random.RandomState(3)
    out = {"left": r.randn(*SIZE, n), "right": r.randn(*SIZE, n)}
    if losses:
        out["label_l"] = r.randint(1, 4, size=(6, 6, 1, n)).astype(float)
        out["label_s"] = r.randint(1, 4, size=(4, 4, 1, n)).astype(float)
    return out


def port(net: DagNet, dtype: str = "float64") -> keras.Model:
    return to_keras_dag(net, dtype, input_sizes={"left": SIZE, "right": SIZE})


def hand_written(net: DagNet, names=("left", "right"), *, swap=False, relu_r=True) -> keras.Model:
    """The user's model, written with the port's layers: inputs named ``names``, taken in
    the order (left, right), or (right, left) with ``swap``; ``relu_r=False`` leaves the
    right branch's ReLU out."""
    layer = port(net).get_layer
    first, second = (keras.Input(SIZE, dtype="float64", name=name) for name in names)
    left, right = (second, first) if swap else (first, second)
    rl = layer("relu_l")(layer("conv_l")(layer("conv_l_pad")(left)))
    rr = layer("conv_l")(layer("conv_r_pad")(right))  # one Keras layer holds the shared params
    if relu_r:
        rr = layer("relu_r")(rr)
    return keras.Model([first, second], [layer("head_l")(rl), layer("head_s")(layer("sum")([rl, rr]))])


# ----------------------------------------------------------------------------- faithful


@pytest.mark.parametrize("mode", ["normal", "test"])
@pytest.mark.parametrize("losses", [False, True])
def test_faithful_port_is_equivalent(mode, losses):
    net = two_branch_net(losses=losses)
    report = compare_dag(net, port(net), batch(losses=losses), mode=mode)
    assert report.ok and report.first_divergence is None, str(report)
    rows = {(r.layer, r.tensor): r for r in report.rows}
    # both inputs' derivatives (named after the model's inputs), both outputs
    assert rows["left", "dzdx"].keras == "left" and rows["right", "dzdx"].keras == "right"
    assert ("yl", "output") in rows and ("ys", "output") in rows
    assert "derivatives summed" in rows["sf", "dzdw{1}"].note  # shared by conv_l and conv_r
    if losses:
        assert rows["obj_l+obj_s", "loss"].ok
    assert any("fed to the model by name" in n for n in report.notes)


def test_float32_port_is_compared_through_its_float64_copy():
    net = two_branch_net(losses=True)
    report = compare_dag(net, port(net, "float32"), batch(losses=True))
    assert report.ok and report.dtype == "float64", str(report)


def test_derivatives_flow_from_every_output():
    """The right input reaches only the second output: its derivative is that output's."""
    net = two_branch_net()
    report = compare_dag(net, port(net), batch())
    right = next(r for r in report.rows if r.layer == "right" and r.tensor == "dzdx")
    assert right.ok and right.numel == np.prod(SIZE) * 2 and right.max_abs < 1e-12
    ref = net.copy()
    ref.eval(batch(), {"yl": np.ones((6, 6, 3, 2)), "ys": np.ones((4, 4, 3, 2))})
    assert np.abs(ref.var("right").der).max() > 0.1  # a real derivative, not zeros matching zeros


def test_check_probes_every_input():
    net = two_branch_net(losses=True)
    result = harness.check(net, port(net))
    assert result.ok, str(result)
    assert {"left", "right"} <= {r.layer for r in result.report.rows}


# ----------------------------------------------------------------------------- planted bugs


def test_changed_weight_in_one_branch_is_blamed_on_its_layer():
    net = two_branch_net()
    model = port(net)
    head = model.get_layer("head_l")
    w, b = head.get_weights()
    head.set_weights([w * 1.1, b])
    report = compare_dag(net, model, batch(), weights="model")
    assert not report.ok
    fd = report.first_divergence
    assert (fd.culprit, fd.layer, fd.tensor) == ("head_l", "lf", "w{1}"), str(report)
    x_ok = {r.layer: r.ok for r in report.rows if r.tensor == "x"}
    assert not x_ok["yl"] and x_ok["ys"] and x_ok["s"]  # the other branch agrees


def test_removed_relu_is_blamed_on_it():
    net = two_branch_net()
    report = compare_dag(net, hand_written(net, relu_r=False), batch())
    assert not report.ok
    fd = report.first_divergence
    assert (fd.culprit, fd.layer, fd.tensor) == ("relu_r", "rr", "x"), str(report)


# ----------------------------------------------------------------------------- feeding the inputs


def test_inputs_named_after_the_vars_are_fed_by_name_in_any_order():
    net = two_branch_net()
    report = compare_dag(net, hand_written(net, names=("right", "left"), swap=True), batch())
    assert report.ok, str(report)
    assert any("by name: 'right' -> 'right', 'left' -> 'left'" in n for n in report.notes)


def test_unnamed_inputs_in_another_order_are_not_equivalent():
    net = two_branch_net()
    report = compare_dag(net, hand_written(net, names=("in1", "in2"), swap=True), batch())
    assert not report.ok
    # the branches are alike up to the heads: the left head is the first to see the right data
    assert report.first_divergence.layer == "yl", str(report)
    assert not next(r for r in report.rows if r.layer == "left" and r.tensor == "dzdx").ok
    assert any("by order" in n and "'left' -> 'in1'" in n for n in report.notes)


def test_unnamed_inputs_in_the_nets_order_are_fed_by_order():
    net = two_branch_net()
    report = compare_dag(net, hand_written(net, names=("in1", "in2")), batch())
    assert report.ok, str(report)
    assert any("by order" in n for n in report.notes)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (("in1", "in2"), r"input 1 \('in1'\) takes 6 x 6 x 2.*'left', fed to it by order, is 7 x 7 x 2"),
        (("left", "right"), r"input 1 \('left'\) takes 6 x 6 x 2.*'left', fed to it by name, is 7 x 7 x 2"),
        (("right", "in2"), "named after some of the net's data vars"),
    ],
)
def test_inputs_that_do_not_fit_are_a_clear_error(names, match):
    net = two_branch_net()
    inputs = {v: np.zeros((7, 7, 2, 2)) for v in ("left", "right")}
    with pytest.raises(McnError, match=match):
        compare_dag(net, hand_written(net, names=names), inputs)


def test_a_model_of_one_input_or_output_is_a_clear_error():
    net = two_branch_net()
    model = port(net)
    one_input = keras.Model(model.inputs[0], model.outputs[0])
    with pytest.raises(McnError, match="taking the net's 2 data inputs"):
        compare_dag(net, one_input, batch())
    one_output = keras.Model(model.inputs, model.outputs[1])
    with pytest.raises(McnError, match="returning the net's 2 outputs"):
        compare_dag(net, one_output, batch())
