"""harness.mcn.train_dag: cnn_train_dag replayed against MatConvNet's own runs.

Family ``dagnn_train`` of fixtures/golden_dagnn (examples/cnn_train_dag.m run unmodified
in double precision: SGD with momentum, and adam; a BatchNorm whose moments are trained
by ``average``, a residual Sum, two Loss layers): the run is replayed one epoch at a time
from the previous epoch's net and solver state, and after every epoch every param value,
every solver state (momentum arrays; adam's m, v, t; 0 for the moments) and the epoch's
statistics (num, objective, top1err, training and validation) are compared.

Tolerance: 1e-10 normwise (``max|got - want| / max|want|``). The runs are float64, so
both sides carry float64 rounding only, in different summation orders (BLAS products,
MATLAB sums); measured worst 7.8e-16 over three epochs. The counts (num) and the error
rates (multiples of 1/N) are exact.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.mcn import McnError
from harness.mcn.dagnn import DagLayer, DagNet, Param
from harness.mcn.matfile import read_variables
from harness.mcn.train_dag import cnn_train_dag, cnn_train_dag_step, fresh_dag_state, split_batch
from harness.mcn.train_options import TrainOpts

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden_dagnn"
TOL = 1e-10


@cache
def _case(name: str) -> dict[str, Any]:
    return read_variables(GOLDEN / f"{name}.mat")


def _setup(name: str):
    v = _case(name)
    o, out = v["opts"], v["outputs"]
    net = DagNet.from_struct(v["net"], name)
    images = v["inputs"]["imdb"]["images"]
    data = {"input": images["data"], "label": images["labels"]}
    keys = ("batchSize", "numSubBatches", "learningRate", "momentum", "weightDecay", "nesterovUpdate")
    opts = TrainOpts.from_matconvnet({k: o[k] for k in keys} | {"solver": v["solver"] or None})
    calls = [np.ravel(b).astype(int) for b in out["batches"]]
    epochs = int(o["numEpochs"])
    per_epoch = len(calls) // epochs
    n_train = int(np.ceil(min(o["epochSize"], np.sum(images["set"] == 1)) / o["batchSize"]))
    train = [calls[e * per_epoch : e * per_epoch + n_train] for e in range(epochs)]
    val = [calls[e * per_epoch + n_train : (e + 1) * per_epoch] for e in range(epochs)]
    return v, net, data, opts, train, val


def _err(got: Any, want: Any) -> float:
    got, want = np.asarray(got, dtype=np.float64).ravel(), np.asarray(want, dtype=np.float64).ravel()
    assert got.size == want.size
    return float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-300)


@pytest.mark.parametrize("name", ["train_dag_sgd", "train_dag_adam"])
def test_cnn_train_dag_epoch_by_epoch(name):
    v, net, data, opts, train, val = _setup(name)
    out = v["outputs"]
    assert [p.name for p in net.params] == out["param_names"]
    assert [p.train_method for p in net.params] == v["param_trainMethod"]
    lrs = np.ravel(v["opts"]["learningRate"])
    state = None
    for e in range(len(train)):
        net, state, stats = cnn_train_dag(
            net, data, opts, [lrs[min(e, lrs.size - 1)]], [train[e]], val_batches=[val[e]], state=state
        )
        for p, want in zip(net.params, out["param_value"][e], strict=True):
            assert _err(p.value, want) <= TOL, f"epoch {e + 1}: param {p.name}"
        for p, s, want in zip(net.params, state["solverState"], out["solverState"][e], strict=True):
            if isinstance(want, dict):
                assert set(s) == set(want), p.name
                for k in want:
                    assert _err(s[k], want[k]) <= TOL, f"epoch {e + 1}: solver state {p.name}.{k}"
            elif np.size(want) == 1 and float(np.ravel(want)[0]) == 0:
                assert np.ndim(s) == 0 and s == 0, f"{p.name}: never updated by the solver"
            else:
                assert _err(s, want) <= TOL, f"epoch {e + 1}: momentum {p.name}"
        for split in ("train", "val"):
            got, want = stats[split][0], out[f"stats_{split}"][e]
            assert set(got) == set(want), split
            assert got["num"] == want["num"]
            assert got["top1err"] == want["top1err"]
            assert abs(got["objective"] - want["objective"]) <= TOL * abs(want["objective"])


def test_cnn_train_dag_whole_run_and_step():
    """All epochs in one call give the same as the epoch-by-epoch replay, and the first
    cnn_train_dag_step is the first batch of the loop; the inputs are not modified."""
    v, net, data, opts, train, val = _setup("train_dag_sgd")
    before = [p.value.copy() for p in net.params]
    lrs = v["opts"]["learningRate"]
    final, state, stats = cnn_train_dag(net, data, opts, lrs, train, val_batches=val)
    for p, want in zip(final.params, v["outputs"]["param_value"][-1], strict=True):
        assert _err(p.value, want) <= TOL
    assert [s["num"] for s in stats["train"]] == [8, 8, 8]
    for p, b in zip(net.params, before, strict=True):
        np.testing.assert_array_equal(p.value, b)
    idx = train[0][0]
    inputs = {"input": data["input"][..., idx - 1], "label": data["label"][:, idx - 1]}
    stepped, state1, stats1 = cnn_train_dag_step(net, None, inputs, learning_rate=0.05, opts=opts)
    looped, state2, _ = cnn_train_dag(net, data, opts, [0.05], [[idx]])
    for a, b in zip(stepped.params, looped.params, strict=True):
        np.testing.assert_array_equal(a.value, b.value)
    assert stats1["num"] == 4 and set(stats1) == {"num", "objective", "top1err", "der_objective"}
    # der_objective: the objective the step differentiated, i.e. the loss of the net BEFORE
    # the update on this batch (one sub-batch here), measured by a separate forward pass.
    assert opts.num_sub_batches == 1
    probe = net.copy()
    probe.eval(inputs, mode="normal")
    assert stats1["der_objective"] == float(np.asarray(probe.var("objective").value).ravel()[0])
    stepped.eval(inputs, mode="normal")  # after the update it differs
    assert stats1["der_objective"] != float(np.asarray(stepped.var("objective").value).ravel()[0])
    assert state1["solverState"][3] == 0  # bn1_m: trained by 'average', no solver state


def _plain_net() -> DagNet:
    r = np.random.RandomState(4)
    layers = [
        DagLayer("conv", "dagnn.Conv", ["input"], ["c"], ["f", "b"], {"size": [3, 3, 2, 3], "pad": 1}),
        DagLayer("relu", "dagnn.ReLU", ["c"], ["r"], []),
        DagLayer("fc", "dagnn.Conv", ["r"], ["prediction"], ["g", "h"], {"size": [5, 5, 3, 4]}),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], []),
    ]
    params = [
        Param("f", 0.3 * r.randn(3, 3, 2, 3)),
        Param("b", np.zeros((3, 1)), learning_rate=2.0, weight_decay=0.0),
        Param("g", 0.3 * r.randn(5, 5, 3, 4)),
        Param("h", np.zeros((4, 1))),
    ]
    return DagNet(layers, params)


def test_sub_batches_average_the_gradient():
    """numSubBatches 2: two interleaved halves, derivatives accumulated, divided by 2 - the
    same update as one batch for a net without BatchNorm (float64 rounding apart)."""
    r = np.random.RandomState(5)
    inputs = {"input": r.randn(5, 5, 2, 6), "label": r.randint(1, 5, size=(1, 6)).astype(float)}
    one, s1, _ = cnn_train_dag_step(_plain_net(), None, inputs, learning_rate=0.1, opts=TrainOpts())
    two, s2, stats = cnn_train_dag_step(
        _plain_net(), None, inputs, learning_rate=0.1, opts=TrainOpts(num_sub_batches=2)
    )
    assert stats["num"] == 6
    for a, b in zip(one.params, two.params, strict=True):
        np.testing.assert_allclose(a.value, b.value, rtol=1e-12, atol=1e-14)
    sub, n = split_batch(inputs, 1, 2)
    assert n == 3 and sub["input"].shape == (5, 5, 2, 3)
    np.testing.assert_array_equal(sub["label"], inputs["label"][:, 1::2])


def test_train_dag_errors():
    net = _plain_net()
    with pytest.raises(McnError, match="DagNet"):
        cnn_train_dag_step(object(), None, {}, opts=TrainOpts())  # type: ignore[arg-type]
    with pytest.raises(McnError, match="one entry per param"):
        cnn_train_dag_step(net, {"solverState": [0]}, {}, opts=TrainOpts())
    inputs = {"input": np.zeros((5, 5, 2, 2)), "label": np.ones((1, 3))}
    with pytest.raises(McnError, match="same number of images"):
        cnn_train_dag_step(net, None, inputs, opts=TrainOpts())
    inputs = {"input": np.zeros((5, 5, 2, 2)), "label": np.ones((1, 2))}
    with pytest.raises(McnError, match="param 'g': no derivative"):
        cnn_train_dag_step(net, None, inputs, opts=TrainOpts(), der_outputs={"c": np.zeros((5, 5, 3, 2))})
    assert fresh_dag_state(net) == {"solverState": [0, 0, 0, 0]}
