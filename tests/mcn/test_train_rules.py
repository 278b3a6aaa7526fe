"""cnn_train (harness.mcn.train) on tiny nets against the rules written out here: SGD with
momentum and Nesterov, the examples/+solver functions, the sub-batch split and the two
dialects (master, beta25), zero rates and decays, float32 training, cnn_train resuming from
its state with float32 statistics, and error_multiclass.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.mcn import McnError, vl_simplenn
from harness.mcn.net import Layer, Net
from harness.mcn.train import (
    SOLVER_DEFAULTS,
    SOLVERS,
    TrainOpts,
    cnn_train,
    cnn_train_step,
    error_multiclass,
    prepare_net,
)
from tests.helpers import bnorm_layer

# ---------------------------------------------------------------------------- tiny nets


def tiny_net(seed: int, *, bnorm: bool = False, classes: int = 3, dtype=np.float64) -> Net:
    """5x5x2 input -> conv 3x3 (3 filters) [-> bnorm] -> relu -> conv 3x3 -> softmaxloss."""
    r = np.random.RandomState(seed)
    layers = [
        Layer("conv", "conv1", [r.randn(3, 3, 2, 3) * 0.5, r.randn(1, 3) * 0.1], pad=0, stride=1),
    ]
    if bnorm:
        layers.append(bnorm_layer(r, 3))
    layers += [
        Layer("relu", "relu1"),
        Layer("conv", "fc", [r.randn(3, 3, 3, classes) * 0.5, r.randn(1, classes) * 0.1], pad=0, stride=1),
        Layer("softmaxloss", "loss"),
    ]
    for layer in layers:
        layer.weights = [np.asarray(w, dtype=dtype) for w in layer.weights]
    return Net(layers)


def tiny_batch(seed: int, n: int, classes: int = 3, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """n random 5x5x2 images and their 1 x n labels in 1..classes."""
    r = np.random.RandomState(seed + 1000)
    return r.randn(5, 5, 2, n).astype(dtype), r.randint(1, classes + 1, size=(1, n)).astype(float)


def net_weights(net: Net) -> list[np.ndarray]:
    """Every weight of the net, layer by layer."""
    return [w for layer in net.layers for w in layer.weights]


def _summed_gradients(net: Net, x, labels, S: int, dialect: str) -> list[list[np.ndarray]]:
    """The sub-batch gradients, summed: sub-batch s takes images s, s+S, ... (0-based)."""
    total = None
    for s in range(S):
        idx = np.arange(s, x.shape[3], S)
        if idx.size == 0:
            continue
        res = vl_simplenn(net, x[..., idx], 1.0, labels[:, idx], dialect=dialect)
        grads = [[np.asarray(g) for g in r.dzdw] for r in res[:-1]]
        total = (
            grads
            if total is None
            else [[a + b for a, b in zip(p, q, strict=True)] for p, q in zip(total, grads, strict=True)]
        )
    return total


sgd_settings = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "n": st.integers(1, 5),
        "S": st.integers(1, 3),
        "dialect": st.sampled_from(["master", "beta25"]),
        "nesterov": st.booleans(),
        "bnorm": st.booleans(),
        "lr": st.floats(1e-4, 0.5),
        "momentum": st.floats(0.0, 0.99),
        "wd": st.sampled_from([0.0, 5e-4, 0.1]),
    }
)


@settings(deadline=None)
@given(sgd_settings)
def test_sgd_update_is_matconvnets_rule(p):
    """Two steps against the rule of the semantics document, written out here:
    g = dzdw/d + wd*wd_j*w, mom = momentum*mom - g, w += lr*lr_j*(nesterov ? momentum*mom - g : mom),
    bnorm moments w3 = (1 - lr3)*w3 + lr3/d * dzdw3 (d = S in master, N in beta25)."""
    net0 = tiny_net(p["seed"], bnorm=p["bnorm"])
    x, labels = tiny_batch(p["seed"], p["n"])
    opts = TrainOpts(
        momentum=p["momentum"],
        weight_decay=p["wd"],
        nesterov_update=p["nesterov"],
        num_sub_batches=p["S"],
        dialect=p["dialect"],
    )
    d = p["S"] if p["dialect"] == "master" else p["n"]
    ref = prepare_net(net0)
    moms = [[0.0] * len(layer.weights) for layer in ref.layers]
    net, state = net0, None
    for step in range(2):
        lr = p["lr"] / (step + 1)
        grads = _summed_gradients(ref, x, labels, p["S"], p["dialect"])
        for i, layer in enumerate(ref.layers):
            for j, w in enumerate(layer.weights):
                dz = grads[i][j].reshape(w.shape)
                lr_j = layer.learning_rate.ravel()[j]
                if layer.type == "bnorm" and j == 2:
                    layer.weights[j] = (1 - lr_j) * w + lr_j / d * dz
                    continue
                g = dz / d + p["wd"] * layer.weight_decay.ravel()[j] * w
                moms[i][j] = p["momentum"] * moms[i][j] - g
                step_dir = p["momentum"] * moms[i][j] - g if p["nesterov"] else moms[i][j]
                layer.weights[j] = w + lr * lr_j * step_dir
        net, state, _ = cnn_train_step(net, state, x, labels, learning_rate=lr, opts=opts)
    for a, b in zip(net_weights(net), net_weights(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for i, layer in enumerate(ref.layers):
        for j in range(len(layer.weights)):
            if layer.type == "bnorm" and j == 2:
                assert state["solverState"][i][j] == 0
            else:
                np.testing.assert_allclose(state["solverState"][i][j], moms[i][j], rtol=1e-12, atol=1e-14)


def _solver_reference(name: str, w, s, g, o: dict, lr: float):
    """examples/+solver, restated: adam with bias corrections folded into lr_t."""
    if name == "adam":
        s = s if isinstance(s, dict) else {"m": 0.0, "v": 0.0, "t": 0}
        m = o["beta1"] * s["m"] + (1 - o["beta1"]) * g
        v = o["beta2"] * s["v"] + (1 - o["beta2"]) * g * g
        t = s["t"] + 1
        m_hat, v_hat = m / (1 - o["beta1"] ** t), v / (1 - o["beta2"] ** t)
        eps_hat = o["eps"] / np.sqrt(1 - o["beta2"] ** t)
        return w - lr * m_hat / (np.sqrt(v_hat) + eps_hat), {"m": m, "v": v, "t": t}
    if name == "rmsprop":
        s = o["rho"] * s + (1 - o["rho"]) * g * g
        return w - lr * g / (np.sqrt(s) + o["epsilon"]), s
    if name == "adagrad":
        s = o["rho"] * s + g * g
        return w - lr * g / (np.sqrt(s) + o["epsilon"]), s
    s = s if isinstance(s, dict) else {"g_sqr": 0.0, "delta_sqr": 0.0}
    g_sqr = o["rho"] * s["g_sqr"] + (1 - o["rho"]) * g * g
    delta = -np.sqrt((s["delta_sqr"] + o["epsilon"]) / (g_sqr + o["epsilon"])) * g  # lr ignored
    return w + delta, {"g_sqr": g_sqr, "delta_sqr": o["rho"] * s["delta_sqr"] + (1 - o["rho"]) * delta**2}


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**16),
    solver=st.sampled_from(SOLVERS),
    n=st.integers(1, 4),
    lr=st.floats(1e-4, 0.1),
    wd=st.sampled_from([0.0, 5e-4]),
    tweak=st.booleans(),
)
def test_solvers_follow_examples_solver(seed, solver, n, lr, wd, tweak):
    net0 = tiny_net(seed)
    x, labels = tiny_batch(seed, n)
    defaults = SOLVER_DEFAULTS[solver]
    solver_opts = {k: v * 0.9 for k, v in defaults.items()} if tweak else {}
    opts = TrainOpts(solver=solver, solver_opts=solver_opts, weight_decay=wd)
    o = {**defaults, **solver_opts}
    ref = prepare_net(net0)
    states = [[0] * len(layer.weights) for layer in ref.layers]
    net, state = net0, None
    for _ in range(3):
        grads = _summed_gradients(ref, x, labels, 1, "master")
        for i, layer in enumerate(ref.layers):
            for j, w in enumerate(layer.weights):
                g = grads[i][j].reshape(w.shape) + wd * layer.weight_decay.ravel()[j] * w
                this_lr = lr * layer.learning_rate.ravel()[j]
                layer.weights[j], states[i][j] = _solver_reference(solver, w, states[i][j], g, o, this_lr)
        net, state, _ = cnn_train_step(net, state, x, labels, learning_rate=lr, opts=opts)
    for a, b in zip(net_weights(net), net_weights(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    got = state["solverState"][0][0]
    want = states[0][0]
    if isinstance(want, dict):
        assert list(got) == list(want)
        assert got.get("t", 3) == 3
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-20)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-20)


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 3),
    S=st.integers(2, 3),
    dialect=st.sampled_from(["master", "beta25"]),
)
def test_equal_sub_batches_give_the_one_batch_update(seed, k, S, dialect):
    """N = k*S: in master each sub-batch's loss is a mean over N/S images, the S summed
    gradients are divided by numWorkers = S, giving the batch mean; beta25 sums and divides
    by N. Both equal the single-batch update (no bnorm: its statistics are per sub-batch)."""
    net0 = tiny_net(seed)
    x, labels = tiny_batch(seed, k * S)
    one, _, obj1 = cnn_train_step(net0, None, x, labels, learning_rate=0.1, opts=TrainOpts(dialect=dialect))
    sub, _, objS = cnn_train_step(
        net0, None, x, labels, learning_rate=0.1, opts=TrainOpts(dialect=dialect, num_sub_batches=S)
    )
    for a, b in zip(net_weights(sub), net_weights(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert objS == pytest.approx(obj1, rel=1e-12)


def test_unequal_sub_batches_average_sub_batch_means_in_master():
    """N = 3, S = 2: sub-batches {1, 3} and {2} (interleaved). With per-image gradients G_i,
    master steps along ((G1 + G3)/2 + G2)/2 (a mean of sub-batch means), beta25 along the
    batch mean (G1 + G2 + G3)/3."""
    net0 = tiny_net(7)
    x, labels = tiny_batch(7, 3)
    ref = prepare_net(net0)
    G = [np.asarray(vl_simplenn(ref, x[..., [i]], 1.0, labels[:, [i]])[0].dzdw[0]) for i in range(3)]
    want = {"master": -((G[0] + G[2]) / 2 + G[1]) / 2, "beta25": -(G[0] + G[1] + G[2]) / 3}
    for dialect in ("master", "beta25"):
        opts = TrainOpts(dialect=dialect, num_sub_batches=2, momentum=0.0, weight_decay=0.0)
        net, _, _ = cnn_train_step(net0, None, x, labels, learning_rate=1.0, opts=opts)
        step = net.layers[0].weights[0] - ref.layers[0].weights[0]
        np.testing.assert_allclose(step, want[dialect], rtol=1e-10, atol=1e-15, err_msg=dialect)
    assert not np.allclose(want["master"], want["beta25"], rtol=1e-6)


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), S=st.integers(1, 3), bnorm=st.booleans())
def test_dialects_give_the_same_training(seed, n, S, bnorm):
    """beta25 sums losses and divides by the batch size; master averages per sub-batch and
    divides by S. With equal sub-batch sizes (S = 1 here, or n a multiple of S) they agree."""
    if n % S:
        S = 1
    net0 = tiny_net(seed, bnorm=bnorm)
    x, labels = tiny_batch(seed, n)
    out = {}
    for dialect in ("master", "beta25"):
        opts = TrainOpts(dialect=dialect, num_sub_batches=S)
        net, state, obj = cnn_train_step(net0, None, x, labels, learning_rate=0.05, opts=opts)
        net, state, obj = cnn_train_step(net, state, x, labels, learning_rate=0.05, opts=opts)
        out[dialect] = (net, obj)
    for a, b in zip(net_weights(out["master"][0]), net_weights(out["beta25"][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert out["master"][1] == pytest.approx(out["beta25"][1], rel=1e-12)


def test_nesterov_takes_a_momentum_look_ahead():
    net0 = tiny_net(3)
    x, labels = tiny_batch(3, 4)
    plain, s_plain, _ = cnn_train_step(net0, None, x, labels, learning_rate=0.1, opts=TrainOpts())
    nest, s_nest, _ = cnn_train_step(
        net0, None, x, labels, learning_rate=0.1, opts=TrainOpts(nesterov_update=True)
    )
    start = net_weights(prepare_net(net0))
    # From mom = 0: plain moves by lr*(-g), Nesterov by lr*(momentum*(-g) - g).
    for w0, a, b in zip(start, net_weights(plain), net_weights(nest), strict=True):
        np.testing.assert_allclose(b - w0, 1.9 * (a - w0), rtol=1e-9, atol=1e-15)
        assert not np.array_equal(a, b) or a.size == 0
    np.testing.assert_array_equal(s_plain["solverState"][0][0], s_nest["solverState"][0][0])


def test_zero_learning_rate_keeps_weights_but_momentum_accumulates():
    net0 = tiny_net(4, bnorm=True)
    x, labels = tiny_batch(4, 3)
    net, state = net0, None
    for _ in range(2):
        net, state, _ = cnn_train_step(net, state, x, labels, learning_rate=0.0, opts=TrainOpts())
    start = prepare_net(net0)
    for i, (a, b) in enumerate(zip(net.layers, start.layers, strict=True)):
        for j, (wa, wb) in enumerate(zip(a.weights, b.weights, strict=True)):
            if a.type == "bnorm" and j == 2:
                # the moments use the layer's own rate lr(3), not the global one
                assert not np.array_equal(wa, wb)
                continue
            np.testing.assert_array_equal(wa, wb)
            if a.type == "bnorm":  # weightDecay [0 0] and lr 0: skipped, state stays 0
                assert state["solverState"][i][j] == 0
            else:  # thisDecay > 0: g = dzdw + wd*w, mom = 0.9*(-g) - g after two steps
                assert np.all(np.abs(state["solverState"][i][j]) > 0)


def test_no_rate_and_no_decay_skips_the_parameter():
    net0 = tiny_net(5)
    x, labels = tiny_batch(5, 2)
    net, state, _ = cnn_train_step(
        net0, None, x, labels, learning_rate=0.0, opts=TrainOpts(weight_decay=0.0, solver="adam")
    )
    assert all(s == 0 for layer in state["solverState"] for s in layer)
    for a, b in zip(net_weights(net), net_weights(prepare_net(net0)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_step_does_not_modify_its_inputs_and_fills_multipliers():
    net0 = tiny_net(6)
    before = net0.copy()
    x, labels = tiny_batch(6, 2)
    net, state, _ = cnn_train_step(net0, None, x, labels, learning_rate=0.1)
    _, state2, _ = cnn_train_step(net, state, x, labels, learning_rate=0.1)
    assert net0 == before
    assert not net0.layers[0].has("learning_rate")
    np.testing.assert_array_equal(net.layers[0].learning_rate, [[1.0, 1.0]])
    np.testing.assert_array_equal(net.layers[1].weight_decay, np.ones((1, 0)))
    assert net.layers[-2].precious is True
    assert state["solverState"][0][0] is not state2["solverState"][0][0]


def test_float32_net_trains_in_float32():
    net0 = tiny_net(8, bnorm=True, dtype=np.float32)
    x, labels = tiny_batch(8, 4, dtype=np.float32)
    for solver in (None, *SOLVERS):
        net, state, _ = cnn_train_step(
            net0, None, x, labels, learning_rate=0.01, opts=TrainOpts(solver=solver)
        )
        net, state, _ = cnn_train_step(
            net, state, x, labels, learning_rate=0.01, opts=TrainOpts(solver=solver)
        )
        assert all(w.dtype == np.float32 for w in net_weights(net)), solver
        s = state["solverState"][0][0]
        arrays = s.values() if isinstance(s, dict) else [s]
        assert all(np.asarray(a).dtype == np.float32 for a in arrays if np.ndim(a)), solver


def test_cnn_train_resumes_from_its_state_and_accumulates_stats_in_single():
    net0 = tiny_net(9)
    r = np.random.RandomState(9)
    images = r.randn(5, 5, 2, 10)
    labels = r.randint(1, 4, size=(1, 10)).astype(float)
    batches = [[[1, 2, 3, 4], [5, 6, 7]], [[8, 9, 10, 1], [2]], [[3, 4, 5, 6]], [[7, 8]]]
    schedule = [0.1, 0.05, 0.02]
    opts = TrainOpts(batch_size=4)
    full, s_full, stats = cnn_train(net0, images, labels, opts, schedule, batches)
    half, s_half, _ = cnn_train(net0, images, labels, opts, schedule[:2], batches[:2])
    rest, s_rest, _ = cnn_train(half, images, labels, opts, schedule[2:], batches[2:], state=s_half)
    for a, b in zip(net_weights(full), net_weights(rest), strict=True):
        np.testing.assert_array_equal(a, b)
    # epoch 1 replayed by steps: cnn_train's objective is float32(N1*l1) + float32(N2*l2), over num
    net, st1, o1 = cnn_train_step(net0, None, images[..., :4], labels[:, :4], learning_rate=0.1, opts=opts)
    _, _, o2 = cnn_train_step(net, st1, images[..., 4:7], labels[:, 4:7], learning_rate=0.1, opts=opts)
    expect = (np.float32(4 * o1) + np.float32(3 * o2)) / np.float32(7)
    assert stats["objective"][0] == pytest.approx(expect, rel=2e-7)
    assert stats["objective"].dtype == np.float32 and list(stats["num"]) == [7, 5, 4, 2]
    with pytest.raises(McnError, match="batch_size"):
        cnn_train(net0, images, labels, opts, schedule, [[list(range(1, 6))]])


def test_error_multiclass_ranks_stably_and_ignores_label_zero():
    p = np.zeros((1, 1, 6, 4), np.float32)
    p[0, 0, :, 0] = [0, 3, 3, 1, 0, 0]  # tie between classes 2 and 3: class 2 ranks first
    p[0, 0, :, 1] = [0, 3, 3, 1, 0, 0]
    p[0, 0, :, 2] = [6, 5, 4, 3, 2, 1]  # class 6 ranks last: a top-5 error
    p[0, 0, :, 3] = [1, 2, 3, 4, 5, 6]
    err = error_multiclass(p, np.array([[2, 3, 6, 0]]))
    assert err.dtype == np.float32
    np.testing.assert_array_equal(err, [2, 1])  # image 2 top-1, image 3 top-1 and top-5; image 4 ignored
    weighted = np.zeros((1, 1, 2, 4))
    weighted[0, 0, 0], weighted[0, 0, 1] = [2, 3, 6, 0], [1, 2, 0.5, 1]  # channel 2: instance weights
    np.testing.assert_array_equal(error_multiclass(p, weighted), [2.5, 0.5])
