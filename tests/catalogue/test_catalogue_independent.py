"""The port catalogue checked directly against MatConvNet's stored outputs (no harness code).

Tolerances.  All three network goldens are single precision, so the stored outputs carry
MatConvNet's own float32 rounding (measured: a float32 port agrees to <= 1.3e-6 normwise, the
float64 port to 7e-7 -- the float64 port's remaining error *is* the golden's rounding, it
cannot be held to float64 accuracy).  Both dtypes therefore use FAITHFUL_TOL = 1e-5
normwise (max|diff| / max|ref|): ~10x the rounding actually seen, and 100x below BUG_MIN = 1e-3
(the smallest planted-bug effect in CATALOGUE is 1.6e-3 at the output).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from .golden_nets import (
    SEED_BNORM_TEST,
    SEED_SMALL,
    SMALL_MIXED,
    load_layer_case,
    load_net,
    nhwc,
    softmax_channels,
)
from .ports import CATALOGUE, SUBTLE, CountAvgPool2D, Port, lrn_with_ops, trace

FAITHFUL_TOL = {"float32": 1e-5, "float64": 1e-5}
BUG_MIN = 1e-3
SUBTLE_MIN = 1e-4  # a SUBTLE bug's culprit layer still differs by >= 10x FAITHFUL_TOL

FAITHFUL = [p for p in CATALOGUE if p.faithful]
BUGGY = [p for p in CATALOGUE if not p.faithful]


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Normwise relative error max|a - ref| / max|ref| (in float64)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def reference_output(port: Port) -> np.ndarray:
    """Golden output of the layer before the loss, (N, -1); softmax of it for softmax ports."""
    net = load_net(port.case)
    ref = net.output(net.pre_loss_layer)
    ref = softmax_channels(ref) if port.ends_in_softmax else ref
    return nhwc(ref).reshape(ref.shape[-1], -1)


@functools.cache
def run(port: Port) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(output as (N, -1), intermediate outputs by MatConvNet layer name) on the golden batch."""
    net = load_net(port.case)
    model = port.build()
    x = net.x_nhwc.astype(port.dtype)
    y = keras.ops.convert_to_numpy(model(x))
    return y.reshape(len(x), -1), trace(model, x)


def tap_errors(port: Port) -> list[tuple[str, float]]:
    """(MatConvNet layer, normwise error vs golden) for every layer the port exposes, net order."""
    net = load_net(port.case)
    taps = run(port)[1]
    out = []
    for name in net.layer_names:
        if name not in taps:
            continue
        got, ref = taps[name], net.output_nhwc(name)
        if got.shape != ref.shape:  # e.g. (N, 32) for a 1 x 1 x 32 map
            assert ref.shape[1:3] == (1, 1), (name, got.shape, ref.shape)
            ref = ref.reshape(got.shape)
        out.append((name, rel_err(got, ref)))
    return out


def ids(ports):
    return [p.name for p in ports]


# ---------------------------------------------------------------------------------------------
# The catalogue itself
# ---------------------------------------------------------------------------------------------


def test_catalogue_covers_the_required_styles():
    styles = {p.style for p in FAITHFUL}
    assert {
        "sequential",
        "functional+keras.ops",
        "subclass-call-logic",
        "subclass-pytorch-order",
        "sequential+lambda-tf-lrn",
        "functional+permute-head",
        "sequential-float64",
        "functional+fused-activation",
    } <= styles
    assert len(BUGGY) >= 25
    assert len({p.name for p in CATALOGUE + SUBTLE}) == len(CATALOGUE + SUBTLE)
    assert {p.case for p in CATALOGUE} == {SEED_SMALL, SMALL_MIXED, SEED_BNORM_TEST}
    assert any(p.dtype == "float64" for p in FAITHFUL) and any(p.ends_in_softmax for p in FAITHFUL)
    for p in BUGGY + SUBTLE:
        assert p.bug and p.culprit, p.name
        assert any(f.style == p.style and f.case == p.case for f in FAITHFUL), p.name
        assert p.culprit in load_net(p.case).layer_names, p.name
    for style in styles:
        assert sum(p.style == style for p in BUGGY) >= 2, style
    for p in FAITHFUL:
        assert p.bug is None and p.culprit is None


def test_golden_cases_are_single_precision():
    """Justifies FAITHFUL_TOL: nothing here can be compared at float64 accuracy."""
    for case in (SEED_SMALL, SMALL_MIXED, SEED_BNORM_TEST):
        net = load_net(case)
        assert net.precision == "single"
        assert all(a.dtype == np.float32 for a in net.res_x)


# ---------------------------------------------------------------------------------------------
# (a) faithful ports reproduce the golden output; (b) bug ports do not
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", FAITHFUL, ids=ids(FAITHFUL))
def test_faithful_port_matches_golden(port):
    y, _ = run(port)
    assert y.dtype == np.dtype(port.dtype)
    assert rel_err(y, reference_output(port)) < FAITHFUL_TOL[port.dtype]


@pytest.mark.parametrize("port", FAITHFUL, ids=ids(FAITHFUL))
def test_faithful_port_matches_every_exposed_layer(port):
    errs = tap_errors(port)
    assert len(errs) >= 8
    assert max(e for _, e in errs) < FAITHFUL_TOL[port.dtype], errs


@pytest.mark.parametrize("port", FAITHFUL, ids=ids(FAITHFUL))
def test_faithful_port_reproduces_golden_loss(port):
    """softmax + log loss with 1-based labels, divided by N (master dialect)."""
    net = load_net(port.case)
    assert net.dialect == "master"
    y, _ = run(port)
    y = y.astype(np.float64)
    if port.ends_in_softmax:
        logp = np.log(y)
    else:
        z = y - y.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    labels = net.labels.astype(int) - 1
    loss = -logp[np.arange(len(labels)), labels].mean()
    assert loss == pytest.approx(net.loss, rel=1e-5)


@pytest.mark.parametrize("port", BUGGY, ids=ids(BUGGY))
def test_bug_port_differs_from_golden(port):
    y, _ = run(port)
    assert rel_err(y, reference_output(port)) > BUG_MIN


# ---------------------------------------------------------------------------------------------
# (c) the culprit is honest: every exposed layer before it is reproduced, and it (or the first
# exposed layer after it, when the port fuses it away) is not
# ---------------------------------------------------------------------------------------------


def check_culprit(port: Port, min_diff: float) -> None:
    net = load_net(port.case)
    culprit_at = net.layer_names.index(port.culprit)
    errs = tap_errors(port)
    before = [(n, e) for n, e in errs if net.layer_names.index(n) < culprit_at]
    after = [(n, e) for n, e in errs if net.layer_names.index(n) >= culprit_at]
    assert before or culprit_at == 0, errs
    for name, e in before:
        assert e < FAITHFUL_TOL[port.dtype], f"{name} already differs ({e:.2e}) before {port.culprit}"
    if port.culprit == net.layers[-1].name:  # loss: every layer the port exposes is right
        assert not after
        return
    assert after, f"{port.name} exposes nothing at or after {port.culprit}"
    first, e = after[0]
    if first != port.culprit:  # only allowed when the culprit is fused into a later layer
        assert port.culprit not in run(port)[1]
    assert e > min_diff, f"{first}: {e:.2e}"


@pytest.mark.parametrize("port", BUGGY, ids=ids(BUGGY))
def test_bug_port_culprit_is_the_first_differing_layer(port):
    check_culprit(port, BUG_MIN)


@pytest.mark.parametrize("port", SUBTLE, ids=ids(SUBTLE))
def test_subtle_bug_is_found_per_layer_but_hides_at_the_output(port):
    check_culprit(port, SUBTLE_MIN)
    y, _ = run(port)
    assert rel_err(y, reference_output(port)) < BUG_MIN


# ---------------------------------------------------------------------------------------------
# float64 port hygiene
# ---------------------------------------------------------------------------------------------


def test_float64_port_restores_global_dtype_settings():
    port = next(p for p in FAITHFUL if p.dtype == "float64")
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy().name
    model = port.build()
    assert keras.config.floatx() == floatx and keras.config.dtype_policy().name == policy
    assert all(w.dtype == "float64" for w in model.weights)
    x = load_net(port.case).x_nhwc.astype(np.float64)
    assert keras.ops.convert_to_numpy(model(x)).dtype == np.float64


# ---------------------------------------------------------------------------------------------
# MatConvNet semantics the ports rely on, pinned on the single-layer goldens
# ---------------------------------------------------------------------------------------------


def _fast_pow(x: np.ndarray, y: float) -> np.ndarray:
    """MatConvNet's float fast_pow (normalize_cpu.cpp): cubic log2/exp2 on the bit pattern."""
    f = np.float32
    x = np.asarray(x, np.float32)
    offset = np.int32(127 << 23)
    ix = x.view(np.int32) - offset
    mx = ((ix & np.int32((1 << 23) - 1)) + offset).view(np.float32) - f(1)
    fx = (ix >> 23).astype(np.float32)
    t = f(y) * (
        fx + mx * f(1.442695040888963) + mx * mx * f(-0.606737602222409) + mx**3 * f(0.164042561333445)
    )
    fz = np.floor(t)
    rz = t - fz
    tz = fz + rz * f(0.693147180559945) + rz * rz * f(0.227411277760219) + rz**3 * f(0.079441541679836)
    return ((tz * f(1 << 23)).astype(np.int32) + offset).view(np.float32)


LRN_CASES = ["lrn_3_2_1e-3_0.5", "lrn_5_1_2e-5_0.75"]


def _lrn_case(stem):
    d = load_layer_case(stem)
    n, kappa, alpha, beta = d["inputs"]["param"].ravel()
    return d["inputs"]["x"], (int(n), float(kappa), float(alpha), float(beta)), d["outputs"]["y"]


@pytest.mark.parametrize("stem", LRN_CASES)
def test_lrn_window_and_alpha_convention_exactly(stem):
    """With fast_pow emulated, sum over channels [c - floor((N-1)/2), c + ceil((N-1)/2)] of x^2
    times alpha (not alpha/N) reproduces vl_nnnormalize to float32 rounding."""
    x, (n, kappa, alpha, beta), y = _lrn_case(stem)
    m1 = (n - 1) // 2
    m2 = n - 1 - m1
    c = x.shape[2]
    got = np.empty_like(x)
    for k in range(c):
        s = (x[:, :, max(0, k - m1) : min(c, k + m2 + 1)] ** 2).sum(axis=2, dtype=np.float32)
        got[:, :, k] = x[:, :, k] * _fast_pow(np.float32(kappa) + np.float32(alpha) * s, -beta)
    assert rel_err(got, y) < 1e-6


@pytest.mark.parametrize("stem", LRN_CASES)
def test_tf_lrn_conventions(stem):
    """tf.nn.local_response_normalization(depth_radius=(N-1)/2, bias=kappa, alpha=alpha, beta)
    matches up to fast_pow's error (<= 3.3e-3, fixtures/golden/README.md); the Caffe-style
    alpha/N and depth_radius=N are far off.  lrn_with_ops (the ports' keras.ops version) agrees
    with TF."""
    x, (n, kappa, alpha, beta), y = _lrn_case(stem)
    xt, yt = nhwc(x), nhwc(y)

    def tf_lrn(radius, a):
        return tf.nn.local_response_normalization(xt, radius, kappa, a, beta).numpy()

    right = tf_lrn((n - 1) // 2, alpha)
    assert rel_err(right, yt) < 3.5e-3
    assert rel_err(tf_lrn((n - 1) // 2, alpha / n), yt) > 2e-2
    assert rel_err(tf_lrn(n, alpha), yt) > 2e-2
    ours = keras.ops.convert_to_numpy(lrn_with_ops(keras.ops.convert_to_tensor(xt), n, kappa, alpha, beta))
    assert rel_err(ours, right) < 1e-6


def test_lrn_even_window_is_off_centre_towards_higher_channels():
    """For even N (no golden case has one) normalize_cpu.cpp uses m1 = (N-1)/2 channels below and
    N-1-m1 above: N=4 sums channels c-1..c+2.  Pin lrn_with_ops to that definition."""
    x = np.random.RandomState(0).randn(1, 2, 2, 6).astype(np.float32)
    got = keras.ops.convert_to_numpy(lrn_with_ops(keras.ops.convert_to_tensor(x), 4, 2.0, 0.1, 0.75))
    sq = x.astype(np.float64) ** 2
    want = np.stack(
        [x[..., k] / (2.0 + 0.1 * sq[..., max(0, k - 1) : k + 3].sum(-1)) ** 0.75 for k in range(6)], -1
    )
    assert rel_err(got, want) < 1e-6


def _pool_case(stem):
    d = load_layer_case(stem)
    opts = d["opts"]
    pad = [int(v) for v in opts.get("pad", [0])]
    pad = pad * 4 if len(pad) == 1 else pad
    stride = [int(v) for v in opts.get("stride", [1])]
    stride = stride * 2 if len(stride) == 1 else stride
    pool = [int(v) for v in d["inputs"]["pool"].ravel()]
    pool = pool * 2 if len(pool) == 1 else pool
    return nhwc(d["inputs"]["x"]), tuple(pool), tuple(stride), tuple(pad), nhwc(d["outputs"]["y"])


@pytest.mark.parametrize("stem", ["pool_avg_pad1_stride2", "pool_avg_pad_asym"])
def test_avg_pool_pads_are_not_counted(stem):
    x, pool, stride, pad, y = _pool_case(stem)
    got = keras.ops.convert_to_numpy(CountAvgPool2D(pool, stride, pad)(x))
    assert rel_err(got, y) < 1e-6
    t, b, l, r = pad
    naive = keras.layers.AveragePooling2D(pool, stride)(keras.layers.ZeroPadding2D(((t, b), (l, r)))(x))
    assert rel_err(keras.ops.convert_to_numpy(naive), y) > 1e-2


@pytest.mark.parametrize("stem", ["pool_max_negative_pad", "pool_max_pad_asym", "pool_max_pad1_stride2"])
def test_max_pool_never_picks_a_pad_cell(stem):
    x, pool, stride, pad, y = _pool_case(stem)
    t, b, l, r = pad
    spec = [[0, 0], [t, b], [l, r], [0, 0]]
    got = keras.ops.max_pool(keras.ops.pad(x, spec, constant_values=-np.inf), pool, stride)
    assert rel_err(keras.ops.convert_to_numpy(got), y) == 0.0
    zero_padded = keras.ops.convert_to_numpy(keras.ops.max_pool(keras.ops.pad(x, spec), pool, stride))
    if stem == "pool_max_negative_pad":  # zero padding is only wrong where a window is all < 0
        assert rel_err(zero_padded, y) > 1e-2
