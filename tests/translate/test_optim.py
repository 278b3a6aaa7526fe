"""harness.translate.optim: Keras optimizers performing cnn_train's update exactly.

Golden: the Keras model of each golden cnn_train net, trained by ``matconvnet_optimizer``
on the golden batches, reproduces MatConvNet's weights and solver states after every epoch
normwise (2-norm) to ``RTOL = 1e-11``. Measured worst over the 4 epochs, weights / states:
sgd 1.6e-17 / 1.5e-15, nesterov 1.5e-16 / 2.4e-15, adam 9.7e-15 / 6.5e-15, rmsprop
1.5e-13 / 9.0e-15, adagrad 2.8e-15 / 2.8e-15, adadelta 1.0e-16 / 1.6e-15, sgd_beta25
1.6e-17 / 1.5e-15; the bnorm net's gains, biases and moving means 7.9e-14 (sigma is the
documented difference). Property: for random nets, hyper-parameters, multipliers and
schedules, ``compare_training`` finds the Keras optimizer and the NumPy reference equal
after each of 5 steps to ``PROPERTY_RTOL = 1e-12`` (measured worst over the ci profile's
100 examples: 3.6e-14).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.mcn import McnError
from harness.mcn.net import Layer, Net
from harness.mcn.train import SOLVER_DEFAULTS, TrainOpts, cnn_train, cnn_train_step
from harness.training.replay import compare_training, keras_train_step
from harness.translate import net_from_keras, to_keras, to_nhwc
from harness.translate.layers import MatConvNetSoftmaxLoss
from harness.translate.optim import (
    OPTIMIZERS,
    MatConvNetAdam,
    MatConvNetSchedule,
    MatConvNetSGD,
    matconvnet_multipliers,
    matconvnet_optimizer,
)

from ..golden import case_net, load_case
from ..mcn.test_train import _check_tensor, _entry, _f

RTOL = 1e-11
PROPERTY_RTOL = 1e-12

GOLDEN = [
    "train_seed_small_sgd_master",
    "train_seed_small_nesterov_master",
    "train_seed_small_adam_master",
    "train_seed_small_rmsprop_master",
    "train_seed_small_adagrad_master",
    "train_seed_small_adadelta_master",
    "train_seed_small_sgd_beta25",
]


def _golden(name: str):
    case = load_case(name)
    opts = TrainOpts.from_matconvnet(
        {**case.raw["opts"], "solver": case.raw.get("solver")}, dialect=case.dialect
    )
    images = case.inputs["imdb"]["images"]
    data, labels = np.asarray(images["data"]), np.asarray(images["labels"])
    batches = [_f(b).astype(np.int64) for b in case.outputs["batches"]]
    return case, opts, data, labels, batches


def _check_golden_state(ours, full, sub, where: str) -> None:
    """Our state (Keras layout; SGD/rmsprop/adagrad an array, adam/adadelta a dict) against
    cnn_train's solverState entry."""
    __tracebackhide__ = True
    if isinstance(full, dict):
        assert isinstance(ours, dict) and list(ours) == list(full), f"{where}: fields {list(full)}"
        for k in full:
            if k == "t":
                assert float(ours[k]) == float(full[k]), f"{where}.t"
            else:
                _check_tensor(ours[k], full[k], sub.get(k) if isinstance(sub, dict) else None, f"{where}.{k}")
    elif np.ndim(full) == 0:  # never updated: cnn_train's 0
        assert not np.any(np.asarray(ours)), f"{where}: expected the initial state 0"
    else:
        _check_tensor(ours, full, sub, where)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_cnn_train_is_reproduced_by_the_keras_optimizer(name):
    case, opts, data, labels, batches = _golden(name)
    out = case.outputs
    net = case_net(case, "net")
    model = to_keras(net)
    optimizer = matconvnet_optimizer(net, opts, steps_per_epoch=1)
    assert type(optimizer) is OPTIMIZERS[opts.solver]
    variables = {v.path: v for v in model.trainable_variables}
    for e, batch in enumerate(batches):
        # the optimizer's schedule gives learningRate(min(epoch, end)) by itself
        assert float(optimizer.learning_rate) == opts.learning_rate[min(e, opts.learning_rate.size - 1)]
        keras_train_step(model, optimizer, data[..., batch - 1], labels[:, batch - 1], dialect=case.dialect)
        got = net_from_keras(model, net)
        for l, layer in enumerate(got.layers):
            for j, w in enumerate(layer.weights):
                where = f"epoch {e + 1} layer {l + 1} ({layer.name}) param {j + 1}"
                _check_tensor(w, _entry(out["weights"], e, l, j), _entry(out["weights_sub"], e, l, j), where)
                var = variables.get(f"{layer.name}/{('kernel', 'bias')[j]}")
                if var is not None:
                    _check_golden_state(
                        optimizer.matconvnet_state(var),
                        _entry(out["solverState"], e, l, j),
                        _entry(out["solverState_sub"], e, l, j),
                        "state " + where,
                    )


def test_golden_bnorm_net_gains_biases_and_means_are_reproduced():
    """The bnorm case: gains, biases and the moving means follow cnn_train; sigma is the
    documented difference (Keras averages the variance)."""
    case, opts, data, labels, batches = _golden("train_seed_small_bnorm_master")
    out = case.outputs
    net = case_net(case, "net")
    model = to_keras(net)
    optimizer = matconvnet_optimizer(net, opts)
    sigma_differs = False
    for e, batch in enumerate(batches):
        keras_train_step(model, optimizer, data[..., batch - 1], labels[:, batch - 1])
        got = net_from_keras(model, net)
        for l, layer in enumerate(got.layers):
            for j, w in enumerate(layer.weights):
                gold = _entry(out["weights"], e, l, j)
                where = f"epoch {e + 1} {layer.name} param {j + 1}"
                if layer.type == "bnorm" and j == 2:
                    ours, want = np.asarray(w).reshape(-1, 2), np.asarray(gold).reshape(-1, 2)
                    _check_tensor(ours[:, 0], want[:, 0], None, where + " mu")
                    sigma_differs |= not np.allclose(ours[:, 1], want[:, 1], rtol=1e-3)
                    continue
                _check_tensor(w, gold, _entry(out["weights_sub"], e, l, j), where)
    assert sigma_differs


def test_golden_bnorm_with_two_learning_rates_is_refused_like_cnn_train():
    case, opts, *_ = _golden("train_seed_small_bnorm_lr2_master")
    with pytest.raises(McnError, match="bn_ip1.*learning_rate"):
        matconvnet_optimizer(case_net(case, "net"), opts)


# ------------------------------------------------------------------------------ property


def _tiny_net(seed: int, bnorm: bool, mult: list[list[float]]) -> Net:
    """5x5x2 -> conv 3x3x2x3 [-> bnorm] -> relu -> conv 3x3x3x3 -> softmaxloss with the
    given multipliers: mult = [[lr1, lr2, wd1, wd2] per parameterised layer]. Before a
    bnorm, conv1 has no bias (as insertBnorm does): its derivative would be rounding noise
    of an exact zero, which adam/rmsprop/adagrad scale up to steps of ~lr*noise/eps."""
    r = np.random.RandomState(seed)
    bias = np.zeros((0, 0)) if bnorm else r.randn(1, 3) * 0.1
    layers = [Layer("conv", "conv1", [r.randn(3, 3, 2, 3) * 0.5, bias], pad=0, stride=1)]
    if bnorm:
        layers.append(Layer("bnorm", "bn1", [1 + 0.1 * r.randn(3, 1), 0.1 * r.randn(3, 1), np.zeros((3, 2))]))
    layers += [
        Layer("relu", "relu1"),
        Layer("conv", "fc", [r.randn(3, 3, 3, 3) * 0.5, r.randn(1, 3) * 0.1], pad=0, stride=1),
        Layer("softmaxloss", "loss"),
    ]
    params = [layer for layer in layers if layer.weights]
    for layer, m in zip(params, mult, strict=False):
        lr = [m[0], m[1]] + ([0.1] if layer.type == "bnorm" else [])
        layer.learning_rate = np.array([lr])
        layer.weight_decay = np.array([[m[2], m[3]]])
    net = Net(layers)
    net.meta["inputSize"] = [5, 5, 2]
    return net


_MODELS: dict[bool, keras.Model] = {}


def _model(net: Net, bnorm: bool) -> keras.Model:
    # one Keras model per architecture: compare_training loads the net's weights into it
    if bnorm not in _MODELS:
        _MODELS[bnorm] = to_keras(net)
    return _MODELS[bnorm]


multiplier = st.sampled_from([0.0, 0.5, 1.0, 2.0])
settings_st = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "bnorm": st.booleans(),
        "solver": st.sampled_from([None, *SOLVER_DEFAULTS]),
        "tweak": st.floats(0.5, 1.0),
        "momentum": st.floats(0.0, 0.99),
        "nesterov": st.booleans(),
        "wd": st.sampled_from([0.0, 5e-4, 0.01]),
        "mult": st.lists(st.lists(multiplier, min_size=4, max_size=4), min_size=3, max_size=3),
        "rates": st.lists(st.floats(1e-4, 0.2), min_size=1, max_size=3),
        "steps_per_epoch": st.integers(1, 3),
        "dialect": st.sampled_from(["master", "beta25"]),
        "n": st.integers(1, 4),
    }
)


@settings(deadline=None)
@given(settings_st)
def test_keras_optimizer_and_reference_agree_for_five_steps(p):
    """5 steps of compare_training (every weight, solver state and objective) to 1e-12
    normwise relative. 1-3 steps per epoch (schedule changes included); zero
    multipliers exercise cnn_train's skip rule (thisLR = thisDecay = 0: no update, state
    kept). Measured over the ci profile's 100 examples (16 s): worst 2.9e-14 (weights),
    3.6e-14 (states), 2.6e-15 (objective)."""
    net = _tiny_net(p["seed"], p["bnorm"], p["mult"])
    r = np.random.RandomState(p["seed"] + 1)
    batches = [(r.randn(5, 5, 2, p["n"]), r.randint(0, 4, size=(1, p["n"])).astype(float)) for _ in range(5)]
    solver = p["solver"]
    solver_opts = {} if solver is None else {k: v * p["tweak"] for k, v in SOLVER_DEFAULTS[solver].items()}
    opts = TrainOpts(
        momentum=p["momentum"],
        nesterov_update=p["nesterov"],
        weight_decay=p["wd"],
        solver=solver,
        solver_opts=solver_opts,
        learning_rate=p["rates"],
        dialect=p["dialect"],
    )
    optimizer = matconvnet_optimizer(net, opts, steps_per_epoch=p["steps_per_epoch"])
    # epochs_of_steps None: taken from the optimizer's MatConvNetSchedule
    report = compare_training(net, _model(net, p["bnorm"]), optimizer, batches, opts, tolerance=PROPERTY_RTOL)
    assert report.ok, str(report)
    assert len(report.steps) == 5 and all(
        s["learning_rate"] == s["keras_learning_rate"] for s in report.steps
    )


# ------------------------------------------------------------------------------ units


def test_schedule_maps_iterations_to_epochs():
    s = MatConvNetSchedule([0.1, 0.01, 0.001], steps_per_epoch=3)
    got = [float(s(k)) for k in range(12)]
    assert got == [0.1] * 3 + [0.01] * 3 + [0.001] * 6
    assert [s.epoch(k) for k in (0, 2, 3, 11)] == [1, 1, 2, 4]
    assert s(0).dtype == "float64" and s.rate(7) == 0.001
    with pytest.raises(ValueError, match="steps_per_epoch"):
        MatConvNetSchedule([0.1], steps_per_epoch=0)
    with pytest.raises(ValueError, match="learning_rate"):
        MatConvNetSchedule([])


def test_constants_are_exact_in_float64():
    """0.9 and 0.01 stay double: ops.cast would have made them 0.899999976 and 0.00999999978."""
    net = _tiny_net(0, False, [[1, 1, 1, 1]] * 2)
    model = to_keras(net)
    opt = MatConvNetSGD(
        learning_rate=0.01, momentum=0.9, coupled_weight_decay=0.0, multipliers=matconvnet_multipliers(net)
    )
    assert opt.learning_rate.dtype == "float64" and float(opt.learning_rate) == 0.01
    v = model.trainable_variables[0]
    w0 = v.numpy().copy()
    g = np.ones(v.shape)
    opt.apply(
        [g if u is v else np.zeros(u.shape) for u in model.trainable_variables], model.trainable_variables
    )
    opt.apply(
        [g if u is v else np.zeros(u.shape) for u in model.trainable_variables], model.trainable_variables
    )
    # mom = -1 then 0.9*(-1) - 1; w = w0 - 0.01 - 0.01*1.9, all in double
    np.testing.assert_array_equal(opt.matconvnet_state(v), np.full(v.shape, 0.9 * -1.0 - 1.0))
    np.testing.assert_array_equal(v.numpy(), (w0 + 0.01 * -1.0) + 0.01 * (0.9 * -1.0 - 1.0))


@pytest.mark.parametrize("solver", [None, *SOLVER_DEFAULTS])
def test_config_round_trips(solver):
    net = _tiny_net(1, True, [[1, 2, 1, 0]] * 3)
    opts = TrainOpts(solver=solver, learning_rate=[0.1, 0.01], nesterov_update=True)
    opt = matconvnet_optimizer(net, opts, steps_per_epoch=4)
    config = opt.get_config()
    assert config["multipliers"]["fc/bias"] == [2.0, 0.0] and "conv1/bias" not in config["multipliers"]
    again = type(opt).from_config(config)
    assert again.get_config() == config
    revived = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(revived) is type(opt) and revived.get_config() == config
    assert isinstance(revived._learning_rate, MatConvNetSchedule)
    assert revived._learning_rate.steps_per_epoch == 4


def test_fit_in_graph_mode_follows_cnn_train(tmp_path):
    """model.compile + fit (tf.function, the schedule by iterations) equals the reference,
    and the compiled model saves and loads with its optimizer. The data go in as a
    tf.data.Dataset: fit casts float64 NumPy arrays to floatx() (float32), which alone
    moves the weights by ~1e-8 relative after a step."""
    import tensorflow as tf

    net = _tiny_net(2, True, [[1, 2, 1, 0], [1, 1, 0, 0], [1, 2, 1, 0]])
    r = np.random.RandomState(3)
    images, labels = r.randn(5, 5, 2, 8), r.randint(1, 4, size=(1, 8)).astype(float)
    opts = TrainOpts(learning_rate=[0.05, 0.005], momentum=0.9, weight_decay=0.01)
    model = to_keras(net)
    model.compile(
        optimizer=matconvnet_optimizer(net, opts, steps_per_epoch=2),
        loss=MatConvNetSoftmaxLoss("master", dtype="float64"),
    )
    data = tf.data.Dataset.from_tensor_slices((to_nhwc(images), labels.ravel())).batch(4)
    model.fit(data, epochs=3, shuffle=False, verbose=0)
    ref, _, _ = cnn_train(net, images, labels, opts, None, [[[1, 2, 3, 4], [5, 6, 7, 8]]] * 3)
    got = net_from_keras(model, ref)
    for a, b in zip(got.layers, ref.layers, strict=True):
        for j, (wa, wb) in enumerate(zip(a.weights, b.weights, strict=True)):
            if a.type == "bnorm" and j == 2:
                np.testing.assert_allclose(wa[:, 0], wb[:, 0], rtol=1e-12, atol=1e-15)
                continue
            np.testing.assert_allclose(wa, wb, rtol=1e-11, atol=1e-14, err_msg=f"{a.name} {j}")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is MatConvNetSGD
    assert loaded.optimizer.get_config() == model.optimizer.get_config()


def test_unknown_variables_are_named_and_defaults_are_explicit():
    net = _tiny_net(4, False, [[1, 2, 1, 1]] * 2)
    model = to_keras(net)
    opt = MatConvNetAdam(learning_rate=0.01, multipliers={"conv1/kernel": (1, 1)})
    with pytest.raises(McnError, match="fc/kernel"):
        opt.build(model.trainable_variables)
    opt = MatConvNetAdam(learning_rate=0.01, multipliers={"conv1/kernel": (1, 1)}, default_multipliers=(1, 1))
    opt.build(model.trainable_variables)
    other = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3, name="first")])
    renamed = matconvnet_optimizer(net, TrainOpts(), mapping={"conv1": "first"})
    assert renamed.multipliers["first/bias"] == (2.0, 1.0)
    with pytest.raises(McnError, match="nope"):
        matconvnet_optimizer(net, TrainOpts(), mapping={"nope": "first"})
    assert other.trainable_variables[0].path.endswith("first/kernel")


def test_zero_rate_and_zero_decay_skip_the_parameter():
    """cnn_train skips a parameter when thisLR = thisDecay = 0 (the schedule's rate 0): its
    weight AND its momentum stay as they were, where a plain rule would decay the momentum."""
    net = _tiny_net(5, False, [[1, 1, 0, 0], [1, 1, 0, 0]])
    r = np.random.RandomState(5)
    batches = [(r.randn(5, 5, 2, 3), r.randint(1, 4, size=(1, 3)).astype(float)) for _ in range(3)]
    opts = TrainOpts(learning_rate=[0.1, 0.0], weight_decay=0.0)
    opt = matconvnet_optimizer(net, opts, steps_per_epoch=1)
    report = compare_training(net, to_keras(net), opt, batches, opts, tolerance=PROPERTY_RTOL)
    assert report.ok, str(report)
    net1, s1, _ = cnn_train_step(net, None, *batches[0], learning_rate=0.1, opts=opts)
    _, s2, _ = cnn_train_step(net1, s1, *batches[1], learning_rate=0.0, opts=opts)
    np.testing.assert_array_equal(s2["solverState"][0][0], s1["solverState"][0][0])
