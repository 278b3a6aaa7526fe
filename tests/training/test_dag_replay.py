"""compare_training on DagNN nets: cnn_train_dag's steps against Keras training set-ups.

The golden cnn_train_dag runs (fixtures/golden_dagnn train_dag_sgd and train_dag_adam:
conv, BatchNorm with moments trained by ``average``, residual Sum, a softmaxlog and a
classerror Loss, params with learning-rate multipliers 0.5, 1, 2 and weight-decay
multipliers 0, 1, 2) are replayed for 3 of their logged batches at their per-epoch rates
[0.05 0.02 0.01] on ``to_keras``'s model; small nets built here cover a shared param, a
learning rate 0, sub-batches with a der_outputs weight, and shared BatchNorm params.

Measured (normwise max relative error, float64): cnn_train_dag's exact optimizer
(``matconvnet_optimizer``) agrees to 3e-15 on every param, state and objective, SGD
and adam alike (the BatchNorm mean to 3e-15; sigma is the known limitation, 0.48 after 3
steps from moments [0 0]). Keras SGD(momentum 0.9) parts at step 1: one learning rate for
every param (the BatchNorm gain, multiplier 2, steps half as far: 8.5e-2) and no coupled
weight decay.
"""

from __future__ import annotations

import re
from functools import cache

import keras
import numpy as np
import pytest

import harness
from harness import matconvnet_optimizer
from harness.mcn import McnError
from harness.mcn.dagnn import DagLayer, DagNet, Param
from harness.mcn.train_options import TrainOpts
from harness.training.dag_replay import SHARED_MOMENTS_LIMITATION, compare_training_dag
from harness.training.replay import TRAINING_TOLERANCES, TrainingReport
from harness.translate.dag_weights import dag_multipliers

from .. import golden_dagnn

TOL = TRAINING_TOLERANCES["float64"]
A = 2.0**-5  # rate and momentum exact in float32: Keras' SGD is then cnn_train_dag's
M = 0.875


@cache
def golden_run(name: str = "train_dag_sgd") -> tuple[DagNet, TrainOpts, list[dict]]:
    """A golden cnn_train_dag run's net, options and first 3 logged batches (epochs 1, 1, 2)."""
    case = golden_dagnn.case(name)
    o = case["opts"]
    keys = ("batchSize", "numSubBatches", "learningRate", "momentum", "weightDecay", "nesterovUpdate")
    solver = "adam" if case["solver"] == "adam" else None
    opts = TrainOpts.from_matconvnet({k: o[k] for k in keys} | {"solver": solver})
    images = case["inputs"]["imdb"]["images"]
    calls = [np.ravel(b).astype(int) - 1 for b in case["outputs"]["batches"][:3]]
    labels = np.reshape(images["labels"], (1, -1))
    batches = [{"input": images["data"][..., c], "label": labels[:, c]} for c in calls]
    return golden_dagnn.net(case), opts, batches


def golden_train(optimizer, name: str = "train_dag_sgd") -> TrainingReport:
    net, opts, batches = golden_run(name)
    return harness.compare_training(
        net, harness.to_keras(net), optimizer, batches, opts, epochs_of_steps=[1, 1, 2]
    )


def conv(name: str, x: str, y: str, params: list[str], size: list[int], pad: int = 0) -> DagLayer:
    return DagLayer(name, "dagnn.Conv", [x], [y], params, {"size": size, "pad": pad})


def small_net(*, shared: bool = False, lr0: str | None = None, bnorm: bool = False) -> DagNet:
    """input 6x6x2 -> conv 3x3 (pad 1) -> relu -> rec1 -> relu -> rec2 -> fc 6x6 -> 4
    scores -> softmaxlog; rec1 and rec2 (3x3x3x3, pad 1) share 'rf'/'rb' with ``shared``
    (MSLapSRN's recursion). ``lr0`` names a param with learning_rate 0. ``bnorm`` puts a
    BatchNorm after rec1 and after rec2, both with the params 'bg', 'bb', 'bm'."""
    r = np.random.RandomState(3)
    rec2 = ["rf", "rb"] if shared else ["rf2", "rb2"]
    norm = ["bg", "bb", "bm"]
    after1, after2 = ("n1", "n2") if bnorm else ("c1", "c2")
    layers = [
        conv("conv", "input", "c", ["f", "b"], [3, 3, 2, 3], pad=1),
        DagLayer("relu", "dagnn.ReLU", ["c"], ["r"], []),
        conv("rec1", "r", "c1", ["rf", "rb"], [3, 3, 3, 3], pad=1),
        DagLayer("relu1", "dagnn.ReLU", [after1], ["r1"], []),
        conv("rec2", "r1", "c2", rec2, [3, 3, 3, 3], pad=1),
        conv("fc", after2, "prediction", ["g", "h"], [6, 6, 3, 4]),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], []),
    ]
    params = [
        Param("f", 0.4 * r.randn(3, 3, 2, 3)),
        Param("rf", 0.4 * r.randn(3, 3, 3, 3)),
        Param("g", 0.4 * r.randn(6, 6, 3, 4)),
        *(Param(name, 0.1 * r.randn(1, k), learning_rate=2.0) for name, k in (("b", 3), ("rb", 3), ("h", 4))),
    ]
    if not shared:  # rec2's own params; its bias without weight decay
        params += [
            Param("rf2", 0.4 * r.randn(3, 3, 3, 3)),
            Param("rb2", 0.1 * r.randn(1, 3), weight_decay=0.0),
        ]
    if bnorm:
        layers[3:3] = [DagLayer("bn1", "dagnn.BatchNorm", ["c1"], ["n1"], norm)]
        layers[6:6] = [DagLayer("bn2", "dagnn.BatchNorm", ["c2"], ["n2"], norm)]
        moments = np.column_stack([0.1 * r.randn(3), 1 + 0.1 * r.rand(3)])
        params += [
            Param("bg", 1 + 0.1 * r.randn(3, 1)),
            Param("bb", 0.1 * r.randn(3, 1)),
            Param("bm", moments),
        ]
    for p in params:
        if p.name == lr0:
            p.learning_rate = 0.0
    net = DagNet(layers, params)
    net.meta["inputSize"] = [6, 6, 2]
    return net


def small_batches(steps: int = 3, n: int = 4) -> list[dict]:
    r = np.random.RandomState(8)
    return [
        {"input": r.randn(6, 6, 2, n), "label": r.randint(1, 5, size=(1, n)).astype(float)}
        for _ in range(steps)
    ]


def sgd_opts(wd: float = 0.0005, **kwargs) -> TrainOpts:
    return TrainOpts(learning_rate=[A], momentum=M, weight_decay=wd, **kwargs)


def note(report: TrainingReport, pattern: str) -> str:
    __tracebackhide__ = True
    hits = [n for n in report.notes if re.search(pattern, n)]
    assert hits, f"no note matching {pattern!r}: {report.notes}"
    return hits[0]


# ------------------------------------------------------------------------------ the golden run


@pytest.mark.parametrize("name", ["train_dag_sgd", "train_dag_adam"])
def test_the_exact_optimizer_replays_cnn_train_dag(name):
    net, opts, _ = golden_run(name)
    report = golden_train(matconvnet_optimizer(net, opts, steps_per_epoch=2), name)
    assert report.ok and report.first_divergence is None, str(report)
    assert report.max_rel() < 1e-13, str(report)
    assert [s["learning_rate"] for s in report.steps] == [0.05, 0.05, 0.02]
    assert [s["keras_learning_rate"] for s in report.steps] == pytest.approx([0.05, 0.05, 0.02], rel=1e-15)
    assert report.max_rel(kind="objective") < 1e-13
    for s in report.steps:
        assert abs(s["keras_objective"] - s["objective"]) <= TOL * abs(s["objective"])
    # every param of the net, and the state of every param trained by 'gradient'
    assert {r.layer for r in report.rows_at(3) if r.kind == "weight"} == {p.name for p in net.params}
    states = {r.layer for r in report.rows_at(3) if r.kind == "state"}
    assert states == {p.name for p in net.params if p.train_method == "gradient"}
    if opts.solver == "adam":  # solverState m, v and t
        assert {r.tensor for r in report.rows_at(3) if r.kind == "state"} == {
            f"solverState{{{j}}}.{k}" for j in (1, 2) for k in "mvt"
        }
    # BatchNorm moments: the mean follows cnn_train_dag's average, sigma is a known difference
    assert report.max_rel(tensor="w{3}.mu") < 1e-13
    sigma = report.worst(tensor="w{3}.sigma", known=True)
    assert sigma.layer == "bn1_m" and sigma.limitation and sigma.max_rel > 1e-3
    assert not report.alignment_problems


def test_keras_sgd_parts_at_the_first_step_and_says_why():
    net, opts, _ = golden_run()
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.05, 0.02])
    report = golden_train(keras.optimizers.SGD(schedule, momentum=0.9))
    fd = report.first_divergence
    assert fd is not None and fd["step"] in (1, 2), str(report)
    assert fd["layer"] in {p.name for p in net.params} and fd["tensor"].startswith("w{")
    assert report.max_rel(1, kind="objective") < 1e-13  # the same start: only the update differs
    note(report, r"no coupled weight decay")
    note(report, r"one learning rate to every variable.*bn1 w\{1\} x2")


# ------------------------------------------------------------------------------ small nets


def test_a_shared_param_gets_the_sum_of_its_derivatives():
    net = small_net(shared=True)
    assert dag_multipliers(net)["rec1/kernel"] == (1.0, 1.0) and "rec2/kernel" not in dag_multipliers(net)
    opts = sgd_opts()
    report = harness.compare_training(
        net, harness.to_keras(net), matconvnet_optimizer(net, opts), small_batches(), opts
    )
    assert report.ok and report.max_rel() < 1e-13, str(report)
    assert [r.keras for r in report.rows_at(1) if r.layer == "rf"] == ["rec1/kernel", "rec1/kernel"]
    # the shared filters move, and by what both layers contribute
    assert all(r.update_rel is not None and r.update_rel < 1e-12 for r in report.rows if r.layer == "rf")


def test_learning_rate_zero_keeps_the_param_and_a_stock_optimizer_moves_it():
    net = small_net(lr0="rf")
    opts = sgd_opts()
    exact = harness.compare_training(
        net, harness.to_keras(net), matconvnet_optimizer(net, opts), small_batches(), opts
    )
    assert exact.ok and exact.max_rel() < 1e-13, str(exact)
    frozen = [r for r in exact.rows if r.layer == "rf" and r.kind == "weight"]
    assert len(frozen) == 3 and all(r.max_abs == 0 for r in frozen)  # neither side moves it
    assert any(r.layer == "rf" and r.kind == "state" for r in exact.rows)  # decay: its momentum moves
    # Keras' SGD with cnn_train_dag's (float32-exact) constants and no decay: only the
    # learning rates differ - the frozen param, and the biases with multiplier 2
    opts = sgd_opts(wd=0.0)
    stock = harness.compare_training(
        net, harness.to_keras(net), keras.optimizers.SGD(A, momentum=M), small_batches(), opts
    )
    assert stock.first_divergence["step"] == 1, str(stock)
    bad = {r.layer for r in stock.rows_at(1) if not r.ok and r.kind == "weight"}
    assert bad == {"rf", "b", "rb", "h"}, str(stock)
    rf = next(r for r in stock.rows_at(1) if r.layer == "rf" and r.kind == "weight")
    assert rf.update_rel == 1.0  # cnn_train_dag does not move it at all
    note(stock, r"one learning rate to every variable.*rec1 w\{1\} x0")


def test_sub_batches_and_der_outputs():
    """numSubBatches 2 (equal halves, no BatchNorm): the mean of the sub-batch derivatives
    is the whole batch's; a der_outputs weight scales the objective on both sides."""
    net = small_net()
    opts = sgd_opts(num_sub_batches=2)
    report = compare_training_dag(
        net,
        harness.to_keras(net),
        matconvnet_optimizer(net, opts),
        small_batches(2),
        opts,
        der_outputs={"objective": 0.5},
    )
    assert report.ok and report.max_rel() < 1e-13, str(report)
    note(report, "numSubBatches 2")
    whole = harness.compare_training(
        net, harness.to_keras(net), matconvnet_optimizer(net, sgd_opts()), small_batches(2), sgd_opts()
    )
    assert report.steps[0]["objective"] == pytest.approx(0.5 * whole.steps[0]["objective"], rel=1e-14)


def test_shared_batchnorm_moments_are_a_known_difference():
    """Two BatchNorm layers with the same params: their gains and biases get the sum of
    both derivatives (exact), their moments one average per step in cnn_train_dag but one
    update per call in Keras (a known difference)."""
    net = small_net(bnorm=True)
    assert net.param("bm").fanout == 2 and net.param("bm").train_method == "average"
    opts = sgd_opts()
    report = harness.compare_training(
        net, harness.to_keras(net), matconvnet_optimizer(net, opts), small_batches(2), opts
    )
    assert report.ok, str(report)
    assert SHARED_MOMENTS_LIMITATION in report.limitations
    mu = report.worst(tensor="w{3}.mu", known=True)
    assert mu.layer == "bm" and mu.limitation == SHARED_MOMENTS_LIMITATION and mu.max_rel > 1e-6
    assert report.max_rel(kind="state") < 1e-13 and report.max_rel(kind="weight") < 1e-13


def test_bad_input_names_the_argument():
    net = small_net()
    model = harness.to_keras(net)
    opts = sgd_opts()
    batches = small_batches(1)
    with pytest.raises(McnError, match="loss"):
        harness.compare_training(net, model, keras.optimizers.SGD(A), batches, opts, loss="mse")
    with pytest.raises(McnError, match="der_outputs only with a DagNN"):
        harness.compare_training(harness.seed_net(), model, keras.optimizers.SGD(A), [], der_outputs={})
    with pytest.raises(McnError, match=r"batches\[0\] to be a dict"):
        harness.compare_training(net, model, keras.optimizers.SGD(A), [(1, 2)], opts)
    with pytest.raises(McnError, match="label"):
        harness.compare_training(net, model, keras.optimizers.SGD(A), [{"input": batches[0]["input"]}], opts)
    with pytest.raises(McnError, match="'c2' to be the output of a dagnn.Loss"):
        harness.compare_training(net, model, keras.optimizers.SGD(A), batches, opts, der_outputs={"c2": 1})
    with pytest.raises(McnError, match="dialect 'master'"):
        harness.compare_training(net, model, keras.optimizers.SGD(A), batches, TrainOpts(dialect="beta25"))
    dropout = small_net()
    dropout.add_layer("drop", "dagnn.DropOut", ["c2"], ["d"], [])
    with pytest.raises(McnError, match="drop"):
        harness.compare_training(dropout, model, keras.optimizers.SGD(A), batches, opts)
