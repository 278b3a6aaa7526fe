"""compare_training: cnn_train against ordinary Keras training set-ups, step by step.

Each diagnosis trains a small net (8x8x1 -> conv 3x3x4 -> relu -> max pool 2 -> conv
3x3x3 -> softmaxloss) for 4 steps of 4 images, epochs [1, 1, 2, 2]: cnn_train's
learningRate schedule [a, a/8] changes at step 3, and the Keras optimizer gets the same
schedule (PiecewiseConstantDecay) unless the schedule is the diagnosis. Constants are
binary fractions (a = 2^-7 or 2^-10, momentum 0.875, wd 2^-6) so that float32 rounding
inside Keras stays out of the picture where it is not the point. Measured sizes (normwise
max relative error of the weights, ``report.max_rel(step, kind="weight")``; "state" is the
optimizer state mapped to cnn_train's; "update" the error of the step itself,
``update_rel``), after step 1 and after the schedule change (step 3):

=======================================  ==========================  ===================
set-up                                   after step 1                after the change
=======================================  ==========================  ===================
Keras SGD(momentum), exact constants     1e-17 (exact)               2.9e-2 (update 0.91)
Keras SGD(0.9, lr 0.01): float32 consts  4.5e-10 (update 2.2e-8)     4.0e-2
Keras SGD weight_decay (decoupled)       weights 1e-16, state 8.3e-3 2.9e-2 (step 2: 1.1e-4)
L2(wd/2) on kernels only                 2.2e-5 (biases)             2.9e-2
L2(wd/2) on kernels and biases           7e-17 (exact)               2.9e-2 (the fold)
bias learningRate [1 2] ignored          6.8e-3 (update 0.5)         2.9e-2
RMSprop defaults (rho 0.9, eps 1e-7)     9.2e-3 (state 0.90)         1.9e-2
RMSprop rho 0.99, eps 1e-8 inside sqrt   8.3e-5 (update 6.4e-3)      8.3e-5
Adam default epsilon 1e-7                4.2e-7                      4.3e-7
Adam epsilon 1e-8 (betas via float32)   9.1e-9                      1.9e-8
Adagrad defaults (accumulator 0.1)       1.3e-3 (state 4.9e-2)       1.6e-3
Adagrad accumulator 0, eps 1e-10 inside  8.1e-10                     8.1e-10
Adadelta learning_rate = a               4.4e-3 (update 0.99)        1.7e-2
Keras 2 decay -> InverseTimeDecay        1e-17 (step 2: 1.4e-5)      2.8e-2
Keras 2 decay= argument (ignored)        1e-17 (exact)               2.8e-2
question set-up (seed net, RMSprop)      4.5e-3 (update 0.98)        5.5e-3 (update 1.0)
=======================================  ==========================  ===================

The fixes (harness.matconvnet_optimizer; L2 on biases too with matconvnet's SGD for the
fold; Adadelta(learning_rate=1.0); Adam with binary betas and eps 1e-8) agree to 1e-14 or
better. The question's set-up runs on the full seed net (28x28, 64..512 channels) for two
steps of two images, epochs 10 and 11 (its 0.01 -> 0.001 change).
"""

from __future__ import annotations

import json
import re
import warnings

import keras
import numpy as np
import pytest

import harness
from harness.mcn import McnError
from harness.mcn.net import Layer, Net
from harness.mcn.train import TrainOpts
from harness.training.replay import TRAINING_TOLERANCES, TrainingReport, compare_training
from harness.translate import to_keras
from harness.translate.optim import matconvnet_optimizer

from ..helpers import bnorm_layer

A = 2.0**-7  # SGD/adadelta rate; exact in float32 (0.01 is not)
B = 2.0**-10  # adaptive solvers' rate
M = 0.875  # momentum, exact in float32 (0.9 is not)
WD = 2.0**-6
EPOCHS = [1, 1, 2, 2]  # the schedule changes at step 3
TOL = TRAINING_TOLERANCES["float64"]


def small_net(lr=(1.0, 1.0), wd=(1.0, 1.0), seed: int = 0) -> Net:
    r = np.random.RandomState(seed)

    def conv(name, shape):
        return Layer(
            "conv",
            name,
            [r.randn(*shape) * 0.3, r.randn(1, shape[3]) * 0.1],
            pad=0,
            stride=1,
            learning_rate=np.array([lr], float),
            weight_decay=np.array([wd], float),
        )

    layers = [
        conv("conv1", (3, 3, 1, 4)),
        Layer("relu", "relu1"),
        Layer("pool", "pool1", method="max", pool=np.array([[2.0, 2.0]]), stride=2.0, pad=0.0),
        conv("conv2", (3, 3, 4, 3)),
        Layer("softmaxloss", "loss"),
    ]
    net = Net(layers)
    net.meta["inputSize"] = [8, 8, 1]
    return net


def batches(steps: int = 4, n: int = 4, seed: int = 1) -> list:
    r = np.random.RandomState(seed)
    return [(r.randn(8, 8, 1, n), r.randint(1, 4, size=(1, n)).astype(float)) for _ in range(steps)]


def user_model(l2_kernel: float | None = None, l2_bias: float | None = None) -> keras.Model:
    """The small net written by hand in Keras, with optional L2 regularisers."""

    def reg(v):
        return None if v is None else keras.regularizers.L2(v)

    kw = {"kernel_regularizer": reg(l2_kernel), "bias_regularizer": reg(l2_bias), "dtype": "float64"}
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1), dtype="float64"),
            L.Conv2D(4, 3, name="conv1", **kw),
            L.ReLU(name="relu1", dtype="float64"),
            L.MaxPooling2D(2, 2, name="pool1", dtype="float64"),
            L.Conv2D(3, 3, name="conv2", **kw),
        ]
    )


def piecewise(a: float) -> keras.optimizers.schedules.LearningRateSchedule:
    """cnn_train's [a, a/8] at 2 steps per epoch: iterations 0, 1 -> a; 2, 3 -> a/8."""
    return keras.optimizers.schedules.PiecewiseConstantDecay([1], [a, a / 8])


def train(net, opts, optimizer, model=None, **kwargs) -> TrainingReport:
    model = to_keras(net) if model is None else model
    return compare_training(net, model, optimizer, batches(), opts, epochs_of_steps=EPOCHS, **kwargs)


def sgd_opts(wd: float = 0.0, lr: float = A) -> TrainOpts:
    return TrainOpts(learning_rate=[lr, lr / 8], momentum=M, weight_decay=wd)


def solver_opts(solver: str, lr: float = B, **solver_options) -> TrainOpts:
    return TrainOpts(learning_rate=[lr, lr / 8], weight_decay=0.0, solver=solver, solver_opts=solver_options)


def assert_within(value: float, lo: float, hi: float, what: str) -> None:
    __tracebackhide__ = True
    assert lo <= value <= hi, f"{what}: measured {value:.3g}, expected within [{lo:.1g}, {hi:.1g}]"


def assert_exact_until(report: TrainingReport, step: int) -> None:
    """Steps before ``step`` agree to rounding; ``step`` is the first divergent one."""
    __tracebackhide__ = True
    for s in range(1, step):
        assert report.max_rel(s) <= 1e-14, f"step {s}: {report.max_rel(s):.3g}\n{report}"
    assert report.first_divergence is not None and report.first_divergence["step"] == step, str(report)


def note(report: TrainingReport, pattern: str) -> str:
    __tracebackhide__ = True
    hits = [n for n in report.notes if re.search(pattern, n)]
    assert hits, f"no note matching {pattern!r}: {report.notes}"
    return hits[0]


def max_update(report: TrainingReport, step: int, kind: str = "weight") -> float:
    return max((r.update_rel or 0.0) for r in report.rows_at(step) if r.kind == kind and not r.limitation)


def train_keras_default(
    net: Net, opts: TrainOpts, optimizer: type[keras.optimizers.Optimizer], step1, step3, state1=None
) -> TrainingReport:
    """A Keras solver with its defaults, at cnn_train's schedule: it parts at step 1, with
    the weights' error (lo, hi) ranges ``step1`` after step 1 and ``step3`` after the
    change, and the state's ``state1`` after step 1 (when given)."""
    __tracebackhide__ = True
    report = train(net, opts, optimizer(piecewise(B)))
    assert report.first_divergence["step"] == 1
    assert_within(report.max_rel(1, kind="weight"), *step1, "step 1")
    if state1 is not None:
        assert_within(report.max_rel(1, kind="state"), *state1, "g_sqr at step 1")
    assert_within(report.max_rel(3, kind="weight"), *step3, "after the change")
    return report


# ------------------------------------------------------------------------------ SGD


def test_keras_sgd_momentum_is_exact_at_constant_rate_and_parts_at_the_change():
    net = small_net()
    report = train(net, sgd_opts(), keras.optimizers.SGD(piecewise(A), momentum=M))
    assert_exact_until(report, 3)
    fd = report.first_divergence
    assert fd["weight"] is not None and fd["state"] is not None  # weights and lr*mom part together
    assert_within(report.max_rel(3, kind="weight"), 1e-2, 1e-1, "weights after the change")  # 2.9e-2
    assert_within(report.max_rel(3, kind="state"), 0.5, 1.0, "state after the change")  # 0.91
    note(report, "folds the learning rate")
    note(report, "SGD's momentum buffer is lr \\* mom")
    fixed = train(net, sgd_opts(), matconvnet_optimizer(net, sgd_opts(), steps_per_epoch=2))
    assert fixed.ok and fixed.max_rel() < 1e-14, str(fixed)


def test_keras_sgd_rounds_momentum_and_rate_to_float32():
    net = small_net()
    opts = TrainOpts(learning_rate=[0.01, 0.001], momentum=0.9, weight_decay=0.0)
    sgd = keras.optimizers.SGD(
        keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.01, 0.001]), momentum=0.9
    )
    report = train(net, opts, sgd)
    assert report.first_divergence["step"] == 1
    assert_within(report.max_rel(1, kind="weight"), 1e-10, 3e-9, "step 1")  # 4.5e-10
    assert_within(max_update(report, 1), 5e-9, 1e-7, "step 1 update")  # 2.2e-8
    assert_within(report.max_rel(3, kind="weight"), 1e-2, 1e-1, "after the change")  # 4.0e-2
    text = note(report, "float32")
    assert "momentum 0.9 -> 0.89999997" in text and "learning rate in float32" in text


def test_decoupled_weight_decay_parts_through_the_momentum():
    """Keras' weight_decay shrinks w beside the update: step 1 is the same weight (the
    decay term enters once either way) but cnn_train's momentum already holds wd*w."""
    net = small_net()
    opts = sgd_opts(wd=WD)
    report = train(net, opts, keras.optimizers.SGD(piecewise(A), momentum=M, weight_decay=WD))
    fd = report.first_divergence
    assert fd["step"] == 1 and fd["weight"] is None and fd["tensor"].startswith("solverState")
    assert report.max_rel(1, kind="weight") < 1e-14
    assert_within(report.max_rel(1, kind="state"), 1e-3, 3e-2, "state at step 1")  # 8.3e-3
    assert_within(report.max_rel(2, kind="weight"), 3e-5, 3e-4, "weights at step 2")  # 1.1e-4
    assert_within(report.max_rel(3, kind="weight"), 1e-2, 1e-1, "after the change")  # 2.9e-2
    note(report, "decoupled")


def test_l2_regularisation_is_coupled_decay_except_for_undecayed_biases():
    net = small_net()
    opts = sgd_opts(wd=WD)
    kernels = train(net, opts, keras.optimizers.SGD(piecewise(A), momentum=M), user_model(WD / 2))
    fd = kernels.first_divergence
    assert (fd["step"], fd["tensor"]) == (1, "w{2}"), str(kernels)
    assert kernels.max_rel(1, tensor="w{1}") < 1e-14  # kernels decay exactly as in cnn_train
    assert_within(kernels.max_rel(1, kind="weight"), 5e-6, 1e-4, "biases at step 1")  # 2.2e-5
    assert_within(kernels.max_rel(3, kind="weight"), 1e-2, 1e-1, "after the change")  # 2.9e-2
    assert "conv1 w{2}: 0 instead of 0.015625" in note(kernels, "coupled weight decay differs")
    both = train(net, opts, keras.optimizers.SGD(piecewise(A), momentum=M), user_model(WD / 2, WD / 2))
    assert_exact_until(both, 3)  # then the momentum fold, as above
    exact = train(
        net, opts, matconvnet_optimizer(net, sgd_opts(wd=0.0), steps_per_epoch=2), user_model(WD / 2, WD / 2)
    )
    assert exact.ok and exact.max_rel() < 1e-14, str(exact)


def test_missing_bias_learning_rate_multiplier():
    net = small_net(lr=(1.0, 2.0))
    report = train(net, sgd_opts(), keras.optimizers.SGD(piecewise(A), momentum=M))
    fd = report.first_divergence
    assert (fd["step"], fd["layer"], fd["tensor"]) == (1, "conv1", "w{2}"), str(report)
    assert report.max_rel(1, tensor="w{1}") < 1e-14
    bias = report.worst(1, layer="conv1", tensor="w{2}")
    assert bias.update_rel == pytest.approx(0.5, abs=1e-12)  # Keras steps half as far
    assert_within(bias.max_rel, 1e-3, 3e-2, "bias at step 1")  # 6.8e-3
    assert report.max_rel(1, kind="state") < 1e-14  # the same gradients accumulate
    assert_within(report.max_rel(3, kind="weight"), 1e-2, 1e-1, "after the change")  # 2.9e-2
    assert "conv1 w{2} x2" in note(report, "learningRate\\(j\\)")
    fixed = train(net, sgd_opts(), matconvnet_optimizer(net, sgd_opts(), steps_per_epoch=2))
    assert fixed.ok, str(fixed)


def test_keras_2_decay_is_an_inverse_time_learning_rate_decay():
    net = small_net()
    itd = keras.optimizers.schedules.InverseTimeDecay(A, decay_steps=1, decay_rate=0.0005)
    report = train(net, sgd_opts(), keras.optimizers.SGD(itd, momentum=M))
    assert_exact_until(report, 2)  # lr/(1 + 0.0005*t): the same rate at t = 0 only
    assert_within(report.max_rel(2, kind="weight"), 3e-6, 1e-4, "step 2")  # 1.4e-5
    assert_within(report.max_rel(3, kind="weight"), 1e-2, 1e-1, "after the change")  # 2.8e-2
    assert "from step 2" in note(report, "learning rate differs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignored = keras.optimizers.SGD(A, momentum=M, decay=0.0005)  # Keras 3 drops it
    assert any("decay" in str(w.message) for w in caught)
    report = train(net, sgd_opts(), ignored)
    assert_exact_until(report, 3)  # a constant rate: only the schedule change parts them
    assert_within(report.max_rel(3, kind="weight"), 1e-2, 1e-1, "after the change")  # 2.8e-2
    assert "from step 3" in note(report, "learning rate differs")


# ------------------------------------------------------------------------------ solvers


def test_rmsprop_rho_and_epsilon_placement():
    net = small_net()
    opts = solver_opts("rmsprop")
    keras_default = train_keras_default(
        net, opts, keras.optimizers.RMSprop, step1=(3e-3, 3e-2), state1=(0.5, 1.0), step3=(5e-3, 5e-2)
    )  # 9.2e-3, g_sqr 0.90 (rho), 1.9e-2
    assert "INSIDE" in note(keras_default, "rho 0.9 \\(cnn_train 0.99\\)")
    matched = train(net, opts, keras.optimizers.RMSprop(piecewise(B), rho=0.99, epsilon=1e-8))
    assert matched.first_divergence["step"] == 1
    assert matched.max_rel(1, kind="state") < 1e-14  # same g_sqr: only where epsilon sits
    assert_within(matched.max_rel(1, kind="weight"), 2e-5, 3e-4, "step 1, eps inside")  # 8.3e-5
    assert_within(matched.max_rel(3, kind="weight"), 2e-5, 3e-4, "after the change")  # 8.3e-5
    fixed = train(net, opts, matconvnet_optimizer(net, opts, steps_per_epoch=2))
    assert fixed.ok and fixed.max_rel() < 1e-13, str(fixed)


def test_adam_epsilon():
    net = small_net()
    opts = solver_opts("adam")
    keras_default = train_keras_default(
        net, opts, keras.optimizers.Adam, step1=(1e-7, 2e-6), step3=(1e-7, 2e-6)
    )  # 4.2e-7, 4.3e-7
    note(keras_default, "epsilon 1e-07 \\(cnn_train: 0.9, 0.999, 1e-08\\)")
    eps = train(net, opts, keras.optimizers.Adam(piecewise(B), epsilon=1e-8))
    # what remains is Keras casting beta_1/beta_2 to float32 for the bias correction
    assert_within(eps.max_rel(1, kind="weight"), 2e-9, 5e-8, "step 1, eps 1e-8")  # 9.1e-9
    assert "beta_1 0.9 -> 0.89999997" in note(eps, "float32")
    binary = solver_opts("adam", beta1=0.875, beta2=1 - 2.0**-10)
    exact = train(
        net, binary, keras.optimizers.Adam(piecewise(B), beta_1=0.875, beta_2=1 - 2.0**-10, epsilon=1e-8)
    )
    assert exact.ok and exact.max_rel() < 1e-14, str(exact)


def test_adagrad_initial_accumulator():
    net = small_net()
    opts = solver_opts("adagrad")
    keras_default = train_keras_default(
        net, opts, keras.optimizers.Adagrad, step1=(3e-4, 5e-3), state1=(1e-2, 0.2), step3=(3e-4, 5e-3)
    )  # 1.3e-3, g_sqr 4.9e-2, 1.6e-3
    note(keras_default, "accumulator at 0.1")
    zero = train(
        net, opts, keras.optimizers.Adagrad(piecewise(B), initial_accumulator_value=0.0, epsilon=1e-10)
    )
    assert zero.max_rel(1, kind="state") < 1e-14
    assert_within(zero.max_rel(1, kind="weight"), 2e-10, 3e-9, "step 1, eps inside")  # 8.1e-10
    assert_within(zero.max_rel(3, kind="weight"), 2e-10, 3e-9, "after the change")  # 8.1e-10


def test_adadelta_ignores_the_learning_rate():
    net = small_net()
    opts = solver_opts("adadelta", lr=A)
    scaled = train(net, opts, keras.optimizers.Adadelta(piecewise(A), rho=0.9, epsilon=1e-6))
    assert scaled.first_divergence["step"] == 1
    assert scaled.max_rel(1, kind="state") < 1e-13  # g_sqr does not see the rate
    assert_within(max_update(scaled, 1), 1 - A - 1e-3, 1 - A + 1e-3, "step 1 update")  # 1 - lr
    assert_within(scaled.max_rel(1, kind="weight"), 1e-3, 2e-2, "step 1")  # 4.4e-3
    assert_within(scaled.max_rel(3, kind="weight"), 5e-3, 5e-2, "after the change")  # 1.7e-2
    note(scaled, "ignores it \\(fix: learning_rate=1.0\\)")
    fixed = train(net, opts, keras.optimizers.Adadelta(1.0, rho=0.9, epsilon=1e-6))
    assert fixed.ok and fixed.max_rel() < 1e-13, str(fixed)


def test_the_questions_rmsprop_set_up():
    """The question's Keras model and optimizer (RMSprop, lr 1e-4 with Keras 2's decay as an
    InverseTimeDecay, categorical cross-entropy) against the seed net's cnn_train (SGD
    0.9, weightDecay 5e-4, bias rate x2, lr 0.01 -> 0.001 between epochs 10 and 11)."""
    from fixtures.seed.question_model import build_model

    net = harness.seed_net(seed=0)
    opts = TrainOpts.from_matconvnet(net.meta["trainOpts"])
    r = np.random.RandomState(0)
    data = [(r.rand(28, 28, 1, 2), r.randint(1, 3, size=(1, 2)).astype(float)) for _ in range(2)]
    model = build_model("float64")
    report = compare_training(
        net, model, model.optimizer, data, opts, epochs_of_steps=[10, 11], loss=model.loss
    )
    fd = report.first_divergence
    assert fd["step"] == 1
    assert report.max_rel(1, kind="objective") < 1e-14  # same start, same loss value
    assert_within(report.max_rel(1, kind="weight"), 1e-3, 2e-2, "step 1")  # 4.5e-3
    assert_within(max_update(report, 1), 0.5, 1.5, "step 1 update")  # 0.98: different steps
    assert_within(report.max_rel(2, kind="weight"), 1e-3, 2e-2, "after the change")  # 5.5e-3
    assert any(r.tensor == "w{1}*" and not r.ok for r in report.rows_at(1))  # ip1's missing groups
    for pattern in (
        "groups=2",
        "Keras RMSprop where cnn_train runs SGD",
        "learningRate\\(j\\)",
        "no coupled weight decay",
        "from step 1 on \\(0.0001 vs 0.01",
        "states not compared",
    ):
        note(report, pattern)


# ------------------------------------------------------------------------------ report


def test_report_text_and_json_are_stable():
    net = small_net(lr=(1.0, 2.0))
    a = train(net, sgd_opts(), keras.optimizers.SGD(piecewise(A), momentum=M))
    b = train(net, sgd_opts(), keras.optimizers.SGD(piecewise(A), momentum=M))
    assert a.to_json() == b.to_json()
    d = json.loads(a.to_json())
    assert d["schema"] == "mcn-harness/training-report/2" and d["ok"] is False
    assert d["first_divergence"]["step"] == 1 and d["first_divergence"]["tensor"] == "w{2}"
    assert [s["epoch"] for s in d["steps"]] == EPOCHS
    row = next(r for r in d["rows"] if r["step"] == 1 and r["tensor"] == "w{2}" and r["layer"] == "conv1")
    assert row["worst_index_keras"] == [row["worst_index_mcn"][1]]  # bias (1, K) in MatConvNet, (K,) in Keras
    assert set(row) >= {"step", "epoch", "kind", "update_rel", "mismatches", "max_abs", "max_rel"}
    text = str(a)
    assert "DIVERGENT" in text and "first divergence: step 1 (epoch 1): layer 'conv1' w{2}" in text
    assert "tensors after step 1:" in text and "solverState{2}" in text


def test_bnorm_sigma_is_a_known_difference_and_beta25_divides_by_the_batch():
    r = np.random.RandomState(7)
    net = small_net()
    net.layers.insert(1, bnorm_layer(r, 4))
    net.layers[0].weights[1] = np.zeros((0, 0))  # no bias before a bnorm (insertBnorm)
    for dialect in ("master", "beta25"):
        opts = TrainOpts(learning_rate=[A, A / 8], momentum=M, weight_decay=WD, dialect=dialect)
        report = train(net, opts, matconvnet_optimizer(net, opts, steps_per_epoch=2))
        assert report.ok and report.max_rel() < 1e-13, str(report)
        assert report.max_rel(tensor="w{3}.mu") < 1e-13
        sigma = report.worst(tensor="w{3}.sigma", known=True)
        assert sigma.limitation and sigma.max_rel > 1e-3  # Keras averages the variance
        assert any("sigma" in lim for lim in report.limitations)


def test_float32_keras_model_within_the_float32_tolerance():
    net = small_net(lr=(1.0, 2.0))
    opts = sgd_opts(wd=WD)
    report = train(
        net,
        opts,
        matconvnet_optimizer(net, opts, steps_per_epoch=2),
        to_keras(net, "float32"),
        dtype="float32",
    )
    assert report.ok and report.tolerance == TRAINING_TOLERANCES["float32"], str(report)
    assert 1e-9 < report.max_rel() < 1e-5


def test_bad_input_names_the_argument():
    net = small_net()
    opts = sgd_opts()
    built = keras.optimizers.SGD(A)
    built.build(to_keras(net).trainable_variables)
    with pytest.raises(McnError, match="fresh optimizer"):
        train(net, opts, built)
    with pytest.raises(McnError, match="epochs_of_steps"):
        compare_training(net, to_keras(net), keras.optimizers.SGD(A), batches(), opts, epochs_of_steps=[1, 2])
    with pytest.raises(McnError, match=r"batches\[0\]"):
        compare_training(net, to_keras(net), keras.optimizers.SGD(A), [np.zeros((8, 8, 1, 2))], opts)
    with pytest.raises(McnError, match="labels"):
        compare_training(net, to_keras(net), keras.optimizers.SGD(A), [(np.zeros((8, 8, 1, 2)), [[1]])], opts)
    with pytest.raises(McnError, match="dialect"):
        compare_training(net, to_keras(net), keras.optimizers.SGD(A), batches(), opts, dialect="beta24")
    dropout = small_net()
    dropout.layers.insert(1, Layer("dropout", "drop1", rate=0.5))
    with pytest.raises(McnError, match="drop1"):
        compare_training(dropout, to_keras(small_net()), keras.optimizers.SGD(A), batches(), opts)
