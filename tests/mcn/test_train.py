"""cnn_train replay (harness.mcn.train): golden runs of MatConvNet's cnn_train, the
options and bad input. The update rules written out independently, the sub-batch split and
the dialects, on tiny nets: test_train_rules.py.

Golden tolerances (all training cases are double precision): weights and solver states
after every epoch agree normwise to ``RTOL = 1e-11`` relative (measured: at most 9.5e-13,
the bnorm case; 2e-14 or less for the others). Tensors whose golden values are pure
rounding noise of an exactly-zero derivative (norm below 1e-14: the betas of a bnorm layer
that feeds, through pool and conv, another bnorm layer) are compared with ``atol = 1e-15``
instead. The step's float64 objective agrees with cnn_train's float32 statistic to 1e-6
relative (float32 rounding); ``cnn_train``'s own float32 statistics to 1 ulp.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.mcn import McnError
from harness.mcn.train import (
    TrainOpts,
    cnn_train,
    cnn_train_step,
    prepare_net,
)
from tests.golden import case_names, case_net, load_case

from .test_train_rules import net_weights, tiny_batch, tiny_net

RTOL = 1e-11
NOISE_NORM = 1e-14
NOISE_ATOL = 1e-15

TRAIN_CASES = case_names(family="cnn_train")


# ------------------------------------------------------------------------------ golden


def _f(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel(order="F")


def _check_tensor(ours, full, sub, where: str) -> None:
    __tracebackhide__ = True
    o = _f(ours)
    if isinstance(sub, dict) and "index" in sub:
        assert o.size == int(sub["numel"]), f"{where}: numel {o.size} != {sub['numel']}"
        idx = _f(sub["index"]).astype(np.int64) - 1
        g = _f(sub["values"])
        o_sub = o[idx]
        assert np.linalg.norm(o_sub - g) <= RTOL * np.linalg.norm(g), f"{where}: subsample differs"
        assert abs(o.sum() - sub["sum"]) <= RTOL * np.abs(o).sum(), f"{where}: sum {o.sum()} != {sub['sum']}"
        assert abs(np.linalg.norm(o) - sub["l2"]) <= RTOL * sub["l2"], f"{where}: l2 differs"
        return
    g = _f(full)
    assert o.size == g.size, f"{where}: {o.size} elements, golden {g.size}"
    if o.size == 0:
        return
    err = np.linalg.norm(o - g)
    if np.linalg.norm(g) < NOISE_NORM:
        assert np.max(np.abs(o - g)) <= NOISE_ATOL, f"{where}: noise-level tensor differs by {err:.3g}"
    else:
        assert err <= RTOL * np.linalg.norm(g), f"{where}: normwise rel err {err / np.linalg.norm(g):.3g}"


def _check_state(ours, full, sub, where: str) -> None:
    __tracebackhide__ = True
    if isinstance(full, dict):
        assert isinstance(ours, dict) and list(ours) == list(full), (
            f"{where}: {ours!r} vs fields {list(full)}"
        )
        for k in full:
            if k == "t":
                assert float(ours[k]) == float(full[k]), f"{where}.t"
                continue
            _check_tensor(ours[k], full[k], sub.get(k) if isinstance(sub, dict) else None, f"{where}.{k}")
    elif np.ndim(full) == 0:  # 0: never updated
        assert np.ndim(ours) == 0 and float(ours) == float(full), f"{where}: {ours!r} != {full!r}"
    else:
        _check_tensor(ours, full, sub, where)


def _entry(cells, e: int, l: int, j: int):
    layer = cells[e][l]
    return layer[j] if isinstance(layer, list) and len(layer) > j else None


def _golden_setup(name: str):
    case = load_case(name)
    solver = case.raw.get("solver")
    opts = TrainOpts.from_matconvnet({**case.raw["opts"], "solver": solver}, dialect=case.dialect)
    images = case.inputs["imdb"]["images"]
    batches = [_f(b).astype(np.int64) for b in case.outputs["batches"]]
    return case, opts, np.asarray(images["data"]), np.asarray(images["labels"]), batches


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_golden_cnn_train_step_by_step(name):
    case, opts, data, labels, batches = _golden_setup(name)
    out = case.outputs
    net = case_net(case, "net")
    if bool(_f(out["failed"])[0]):
        # learningRate(3) of a bnorm layer with two entries: MatConvNet's index error.
        with pytest.raises(McnError, match="learning_rate") as info:
            cnn_train(net, data, labels, opts, None, batches)
        assert "bn_ip1" in str(info.value)  # the last bnorm layer: accumulateGradients runs l = end:-1:1
        return
    state = None
    lrs = opts.learning_rate
    objectives = []
    for e, batch in enumerate(batches):
        lr = lrs[min(e, lrs.size - 1)]
        net, state, objective = cnn_train_step(
            net, state, data[..., batch - 1], labels[:, batch - 1], learning_rate=lr, opts=opts
        )
        objectives.append(objective)
        for l, layer in enumerate(net.layers):
            for j, w in enumerate(layer.weights):
                where = f"epoch {e + 1} layer {l + 1} ({layer.name}) param {j + 1}"
                _check_tensor(w, _entry(out["weights"], e, l, j), _entry(out["weights_sub"], e, l, j), where)
                _check_state(
                    state["solverState"][l][j],
                    _entry(out["solverState"], e, l, j),
                    _entry(out["solverState_sub"], e, l, j),
                    "state " + where,
                )
    np.testing.assert_allclose(objectives, _f(out["objective"]), rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in TRAIN_CASES if "lr2" not in n])
def test_golden_cnn_train_stats(name):
    case, opts, data, labels, batches = _golden_setup(name)
    out = case.outputs
    net, state, stats = cnn_train(case_net(case, "net"), data, labels, opts, None, batches)
    assert stats["objective"].dtype == np.float32
    for key in ("objective", "top1err", "top5err"):
        np.testing.assert_allclose(stats[key], _f(out[key]), rtol=2**-23, atol=0, err_msg=key)
    np.testing.assert_array_equal(stats["num"], _f(out["num"]))
    last = len(batches) - 1
    for l, layer in enumerate(net.layers):
        for j, w in enumerate(layer.weights):
            _check_tensor(
                w, _entry(out["weights"], last, l, j), _entry(out["weights_sub"], last, l, j), f"{l}.{j}"
            )


def test_golden_prepare_net_matches_net_as_trained():
    case = load_case("train_seed_small_bnorm_master")
    net = prepare_net(case_net(case, "net"))
    trained = case.raw["net_as_trained"]["layers"]
    for layer, raw in zip(net.layers, trained, strict=True):
        np.testing.assert_array_equal(_f(layer.learning_rate), _f(raw["learningRate"]))
        np.testing.assert_array_equal(_f(layer.weight_decay), _f(raw["weightDecay"]))
        assert bool(layer.precious) == bool(np.asarray(raw["precious"]).any())


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"solver": "sgd"}, "solver"),
        ({"solver": "adamw"}, "solver"),
        ({"solver": 3}, "solver"),
        ({"momentum": float("nan")}, "momentum"),
        ({"weight_decay": "x"}, "weight_decay"),
        ({"nesterov_update": 2}, "nesterov_update"),
        ({"num_sub_batches": 0}, "num_sub_batches"),
        ({"num_sub_batches": 1.5}, "num_sub_batches"),
        ({"dialect": "beta24"}, "dialect"),
        ({"batch_size": -1}, "batch_size"),
        ({"learning_rate": []}, "learning_rate"),
        ({"error_function": "top1"}, "error_function"),
        ({"solver": "adam", "solver_opts": {"epsilon": 1e-8}}, "solver_opts"),  # adam's is 'eps'
        ({"solver_opts": {"eps": 1e-8}}, "solver_opts"),
    ],
)
def test_bad_options_name_the_field(kwargs, name):
    with pytest.raises(McnError, match=name):
        TrainOpts(**kwargs)


def test_from_matconvnet_reads_cnn_train_names():
    o = TrainOpts.from_matconvnet(
        {
            "batchSize": 4.0,
            "numSubBatches": 2.0,
            "learningRate": np.array([[0.1, 0.01]]),
            "weightDecay": 0.0,
            "momentum": 0.5,
            "nesterovUpdate": 1,
            "solver": "@solver.rmsprop",
            "solverOpts": {"rho": 0.5},
            "numEpochs": 2,
            "gpus": np.zeros((0, 0)),
            "expDir": "x",
        },
        dialect="beta25",
    )
    assert (o.batch_size, o.num_sub_batches, o.weight_decay, o.momentum) == (4, 2, 0.0, 0.5)
    assert o.nesterov_update and o.solver == "rmsprop" and o.dialect == "beta25"
    assert o.solver_options == {"epsilon": 1e-8, "rho": 0.5}
    np.testing.assert_array_equal(o.learning_rate, [0.1, 0.01])
    assert TrainOpts.from_matconvnet({"solver": np.zeros((0, 0))}).solver is None
    with pytest.raises(McnError, match="learningrate"):
        TrainOpts.from_matconvnet({"learningrate": 0.1})
    with pytest.raises(McnError, match="gpus"):
        TrainOpts.from_matconvnet({"gpus": [1, 2]})


def test_bad_step_input_names_the_argument():
    net0 = tiny_net(10)
    x, labels = tiny_batch(10, 3)
    with pytest.raises(McnError, match="labels"):
        cnn_train_step(net0, None, x, labels[:, :2], learning_rate=0.1)
    with pytest.raises(McnError, match="batch_size"):
        cnn_train_step(net0, None, x, labels, learning_rate=0.1, opts=TrainOpts(batch_size=2))
    with pytest.raises(McnError, match="learning_rate"):
        cnn_train_step(net0, None, x, labels, learning_rate=float("inf"))
    with pytest.raises(McnError, match="state"):
        cnn_train_step(net0, {"solverState": [[0]]}, x, labels, learning_rate=0.1)
    with pytest.raises(McnError, match="x"):
        cnn_train_step(net0, None, x.astype(np.int32), labels, learning_rate=0.1)
    short = net0.copy()
    short.layers[0].learning_rate = np.array([[1.0]])
    with pytest.raises(McnError, match="layer 1 'conv1'.*learning_rate"):
        cnn_train_step(short, None, x, labels, learning_rate=0.1)
    with pytest.raises(McnError, match="batches"):
        cnn_train(net0, x, labels, None, [0.1], [[[1, 4]]])
    with pytest.raises(McnError, match="adam state"):
        cnn_train_step(
            net0,
            {"solverState": [[np.ones((3, 3, 2, 3)), 0], [], [0, 0], []]},
            x,
            labels,
            learning_rate=0.1,
            opts=TrainOpts(solver="adam"),
        )


def test_state_arrays_take_their_weights_shape():
    """A checkpoint's state has MATLAB's shapes (e.g. 1 x K biases as 2-D); the weights may
    be 4-D: the same elements, never broadcast against each other."""
    net0 = tiny_net(11)
    x, labels = tiny_batch(11, 2)
    net, state, _ = cnn_train_step(net0, None, x, labels, learning_rate=0.1)
    as_saved = {
        "solverState": [[np.asarray(s).reshape(1, -1) for s in layer] for layer in state["solverState"]]
    }
    a, _, _ = cnn_train_step(net, state, x, labels, learning_rate=0.1)
    b, _, _ = cnn_train_step(net, as_saved, x, labels, learning_rate=0.1)
    for wa, wb in zip(net_weights(a), net_weights(b), strict=True):
        assert wa.shape == wb.shape
        np.testing.assert_array_equal(wa, wb)
    as_saved["solverState"][0][1] = np.zeros((1, 5))
    with pytest.raises(McnError, match=r"state\['solverState'\]\[0\]\[1\]"):
        cnn_train_step(net, as_saved, x, labels, learning_rate=0.1)
