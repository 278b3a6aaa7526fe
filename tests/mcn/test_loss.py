"""vl_nnloss and vl_nnsoftmaxloss: gradients, dialects, label handling, quirks and errors.

Gradients are checked in float64 by central differences of the scalar loss. Inputs are
built away from every kink by construction: hinge margins never near 1, mshinge scores
spaced 0.37 apart (no ties, no margin of exactly 1), log/binarylog inputs inside (0, 1).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.mcn import McnError, vl_nnloss, vl_nnsoftmaxloss

from ..gradcheck import numeric_grad

DIFFERENTIABLE = ("softmaxlog", "log", "mhinge", "mshinge", "binarylog", "logistic", "hinge")
BINARY = ("binaryerror", "binarylog", "logistic", "hinge")


def scores(loss: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Scores for ``loss``, valid and away from its kinks by construction."""
    h, w, depth, n = shape
    if loss in ("log", "binarylog"):
        return rng.uniform(0.05, 0.95, shape)
    if loss in ("mhinge", "hinge"):
        # |x| never within 0.1 of 1, so neither x_c nor c*x sits on the hinge.
        mag = np.where(rng.random(shape) < 0.5, rng.uniform(0.0, 0.9, shape), rng.uniform(1.1, 2.0, shape))
        return mag * rng.choice([-1.0, 1.0], shape)
    if loss == "mshinge":
        # Distinct multiples of 0.37 per location: unique runner-up, margins never 1.
        perm = np.argsort(rng.random((h, w, depth, n)), axis=2).astype(float)
        return perm * 0.37 - 0.5 + rng.uniform(-0.01, 0.01, (h, w, 1, n))
    return rng.uniform(-3.0, 3.0, shape)


@st.composite
def loss_cases(draw, loss: str):
    """(x, c, options) for vl_nnloss with ``loss``: shapes, labels with 0s, weights, dialect."""
    binary = loss in BINARY
    min_depth = 2 if loss == "mshinge" else 1
    h, w, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    depth = draw(st.integers(min_depth, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = scores(loss, (h, w, depth, n), rng)
    if binary:
        c = rng.choice([-1.0, 0.0, 1.0] if draw(st.booleans()) else [-1.0, 1.0], (h, w, depth, n))
    elif draw(st.booleans()):
        c = rng.integers(0 if draw(st.booleans()) else 1, depth + 1, n).astype(float)  # one per image
    else:
        c = rng.integers(0 if draw(st.booleans()) else 1, depth + 1, (h, w, 1, n)).astype(float)
    opts = {"loss": loss, "dialect": draw(st.sampled_from(["master", "beta25"]))}
    if opts["dialect"] == "master":
        opts["normalise"] = draw(st.booleans())
    weights = draw(st.sampled_from(["none", "per_image", "shared"]))
    ch = depth if binary else 1
    if weights == "per_image":
        opts["instance_weights"] = rng.uniform(0.1, 2.0, (h, w, ch, n))
    elif weights == "shared":
        opts["instance_weights"] = rng.uniform(0.1, 2.0, (h, w, ch))
    if draw(st.booleans()):
        opts["class_weights"] = rng.uniform(0.1, 2.0, depth)  # ignored by MatConvNet
    return x, c, opts


@pytest.mark.parametrize("loss", DIFFERENTIABLE)
@settings(deadline=None)
@given(data=st.data())
def test_vl_nnloss_gradient(loss, data):
    x, c, opts = data.draw(loss_cases(loss))
    dzdy = data.draw(st.floats(0.25, 2.0))
    dzdx = vl_nnloss(x, c, dzdy, **opts)
    assert dzdx.shape == x.shape and dzdx.dtype == np.float64
    num = numeric_grad(lambda z: vl_nnloss(z, c, **opts).item() * dzdy, x.copy())
    np.testing.assert_allclose(dzdx, num, rtol=1e-6, atol=1e-7)


@st.composite
def softmaxloss_cases(draw):
    h, w, depth, n = (draw(st.integers(1, 3)) for _ in range(4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.uniform(-3.0, 3.0, (h, w, depth, n))
    form = draw(st.sampled_from(["per_image", "spatial", "weights", "per_image_weights"]))
    if form == "per_image":
        c = rng.integers(0, depth + 1, n).astype(float)
    elif form == "spatial":
        c = rng.integers(-1, depth + 1, (h, w, 1, n)).astype(float)  # labels <= 0 ignored
    else:
        rows = (1, 1) if form == "per_image_weights" else (h, w)
        c = np.concatenate(
            [rng.integers(0, depth + 1, (*rows, 1, n)).astype(float), rng.uniform(0.0, 2.0, (*rows, 1, n))],
            axis=2,
        )
    return x, c, draw(st.sampled_from(["master", "beta25"]))


@settings(deadline=None)
@given(case=softmaxloss_cases(), dzdy=st.floats(0.25, 2.0))
def test_vl_nnsoftmaxloss_gradient(case, dzdy):
    x, c, dialect = case
    dzdx = vl_nnsoftmaxloss(x, c, dzdy, dialect=dialect)
    assert dzdx.shape == x.shape
    num = numeric_grad(lambda z: vl_nnsoftmaxloss(z, c, dialect=dialect).item() * dzdy, x.copy())
    np.testing.assert_allclose(dzdx, num, rtol=1e-6, atol=1e-7)


def _softmax_log_terms(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax(x)_c per location (labels H x W x 1 x N, 1-based; 0 reads class 1)."""
    logp = x - np.log(np.exp(x).sum(axis=2, keepdims=True))
    return -np.take_along_axis(logp, np.maximum(labels - 1, 0).astype(int), axis=2)


@settings(deadline=None)
@given(case=softmaxloss_cases())
def test_vl_nnsoftmaxloss_forward_is_weighted_log_loss(case):
    x, c, dialect = case
    h, w, _, n = x.shape
    c4 = c.reshape(1, 1, 1, n) if c.size == n else c
    c4 = np.broadcast_to(c4, (h, w, c4.shape[2], n))
    mass = (c4[:, :, :1] > 0) * (c4[:, :, 1:2] if c4.shape[2] == 2 else 1.0)
    want = np.sum(mass * _softmax_log_terms(x, c4[:, :, :1])) / (n if dialect == "master" else 1)
    got = vl_nnsoftmaxloss(x, c, dialect=dialect)
    assert got.shape == (1, 1, 1, 1)
    np.testing.assert_allclose(got.item(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", DIFFERENTIABLE + ("classerror", "topkerror", "binaryerror"))
@settings(deadline=None)
@given(data=st.data())
def test_dialects_differ_by_exactly_n(loss, data):
    x, c, opts = data.draw(loss_cases(loss))
    opts.pop("normalise", None)
    if loss == "topkerror":
        opts["top_k"] = data.draw(st.integers(1, x.shape[2]))
    n = x.shape[3]
    master = {**opts, "dialect": "master"}
    beta25 = {**opts, "dialect": "beta25"}
    scale = n if n > 1 else 1
    np.testing.assert_array_equal(vl_nnloss(x, c, **master), vl_nnloss(x, c, **beta25) / scale)
    np.testing.assert_array_equal(vl_nnloss(x, c, 0.5, **master), vl_nnloss(x, c, 0.5, **beta25) / scale)
    # normalise=False switches the division off
    np.testing.assert_array_equal(vl_nnloss(x, c, **master, normalise=False), vl_nnloss(x, c, **beta25))


@settings(deadline=None)
@given(case=softmaxloss_cases(), dzdy=st.floats(0.25, 2.0))
def test_softmaxloss_dialects_differ_by_exactly_n(case, dzdy):
    x, c, _ = case
    n = x.shape[3]
    beta_y, beta_d = vl_nnsoftmaxloss(x, c, dialect="beta25"), vl_nnsoftmaxloss(x, c, dzdy, dialect="beta25")
    np.testing.assert_array_equal(vl_nnsoftmaxloss(x, c, dialect="master"), beta_y / n)
    np.testing.assert_array_equal(vl_nnsoftmaxloss(x, c, dzdy, dialect="master"), beta_d / n)


@pytest.mark.parametrize("fn", ["loss", "softmaxloss"])
def test_ignored_image_still_counts_in_master_divisor(fn):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 3, 2))
    call = vl_nnloss if fn == "loss" else vl_nnsoftmaxloss
    both = call(x, [0, 2], dialect="master").item()
    alone = call(x[..., 1:], [2], dialect="master").item()
    assert both == pytest.approx(alone / 2, rel=1e-14)
    dzdx = call(x, [0, 2], 1.0, dialect="master")
    assert np.all(dzdx[..., 0] == 0)
    np.testing.assert_allclose(dzdx[..., 1], call(x[..., 1:], [2], 1.0, dialect="master")[..., 0] / 2)


def test_label_zero_equals_zero_instance_weight():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 2))
    c = rng.integers(1, 5, (2, 3, 1, 2)).astype(float)
    c0, iw = c.copy(), np.ones_like(c)
    c0[0, 1, 0, 1] = 0
    iw[0, 1, 0, 1] = 0
    for loss in ("softmaxlog", "mhinge", "mshinge", "classerror", "topkerror"):
        np.testing.assert_allclose(
            vl_nnloss(x, c0, loss=loss, top_k=2), vl_nnloss(x, c, loss=loss, top_k=2, instance_weights=iw)
        )
        if loss not in ("classerror", "topkerror"):
            np.testing.assert_allclose(
                vl_nnloss(x, c0, 1.0, loss=loss), vl_nnloss(x, c, 1.0, loss=loss, instance_weights=iw)
            )


def test_class_weights_are_ignored_like_matconvnet():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 1, 3, 4))
    c = np.array([1.0, 2.0, 3.0, 1.0])
    for dzdy in (None, 1.0):
        np.testing.assert_array_equal(
            vl_nnloss(x, c, dzdy, class_weights=[5.0, 0.0, 2.0]), vl_nnloss(x, c, dzdy)
        )


def _location_term(loss: str, v: np.ndarray, label: int, k: int) -> float:
    """One categorical loss term, from the vl_nnloss.m documentation (label 0-based)."""
    others = np.delete(v, label)
    if loss == "softmaxlog":
        return np.log(np.exp(v).sum()) - v[label]
    if loss == "log":
        return -np.log(v[label])
    if loss == "mhinge":
        return max(0.0, 1 - v[label])
    if loss == "mshinge":
        return max(0.0, 1 - v[label] + others.max()) if others.size else 0.0
    if loss == "classerror":
        return float(np.argmax(v) != label)
    return float(label not in np.argsort(-v, kind="stable")[:k])  # topkerror


def _reference_terms(loss: str, x: np.ndarray, c: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """Per-location (or per-element, binary) loss terms; label 0 reads class 1 like MatConvNet."""
    if loss == "binaryerror":
        return (np.sign(x - threshold) != c).astype(float)
    if loss == "binarylog":
        return -np.log(c * (x - 0.5) + 0.5)
    if loss == "logistic":
        return np.log1p(np.exp(-c * x))
    if loss == "hinge":
        return np.maximum(0, 1 - c * x)
    h, w, _, n = x.shape
    out = np.zeros((h, w, 1, n))
    for i, j, m in np.ndindex(h, w, n):
        out[i, j, 0, m] = _location_term(loss, x[i, j, :, m], max(int(c[i, j, 0, m]), 1) - 1, k)
    return out


@pytest.mark.parametrize("loss", DIFFERENTIABLE + ("classerror", "topkerror", "binaryerror"))
@settings(deadline=None)
@given(data=st.data())
def test_vl_nnloss_forward_matches_documented_formula(loss, data):
    x, c, opts = data.draw(loss_cases(loss))
    k = data.draw(st.integers(1, x.shape[2]))
    threshold = data.draw(st.sampled_from([0.0, 0.5]))
    h, w, depth, n = x.shape
    c4 = np.broadcast_to(c.reshape(1, 1, 1, n), (h, w, 1, n)) if c.size == n else c
    iw = opts.get("instance_weights", 1.0)
    weights = (c4 != 0) * (iw[..., None] if np.ndim(iw) == 3 else iw)
    want = np.sum(weights * _reference_terms(loss, x, c4, k, threshold))
    if opts["dialect"] == "master" and opts.get("normalise", True) and n > 1:
        want /= n
    got = vl_nnloss(x, c, **opts, top_k=k, threshold=threshold)
    assert got.shape == (1, 1, 1, 1) and got.dtype == np.float64
    np.testing.assert_allclose(got.item(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["classerror", "topkerror", "binaryerror"])
def test_error_losses_have_zero_derivative(loss):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 3, 2)).astype(np.float32)
    c = rng.choice([-1.0, 1.0], x.shape) if loss == "binaryerror" else rng.integers(1, 4, 2).astype(float)
    dzdx = vl_nnloss(x, c, 1.0, loss=loss, top_k=2)
    assert dzdx.shape == x.shape and dzdx.dtype == np.float32 and not dzdx.any()


def test_topkerror_is_double_unless_weighted_in_single():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 1, 4, 3)).astype(np.float32)
    top2 = {"loss": "topkerror", "top_k": 2}
    assert vl_nnloss(x, [1, 2, 3], **top2).dtype == np.float64
    # label 0: cast(c ~= 0) is single, and single * double is single in MATLAB
    assert vl_nnloss(x, [0, 2, 3], **top2).dtype == np.float32
    iw64 = np.ones((1, 1, 1, 3))
    assert vl_nnloss(x, [1, 2, 3], **top2, instance_weights=iw64).dtype == np.float32  # ones like x
    assert vl_nnloss(x, [1, 2, 3], **top2, instance_weights=iw64, dialect="beta25").dtype == np.float64
    iw32 = iw64.astype(np.float32)
    assert vl_nnloss(x, [1, 2, 3], **top2, instance_weights=iw32, dialect="beta25").dtype == np.float32
    assert vl_nnloss(x, [1, 2, 3], loss="softmaxlog").dtype == np.float32


def test_topkerror_ties_keep_channel_order():
    x = np.zeros((1, 1, 4, 1))
    assert vl_nnloss(x, [2], loss="topkerror", top_k=2).item() == 0.0
    assert vl_nnloss(x, [3], loss="topkerror", top_k=2).item() == 1.0


def test_mshinge_single_class_quirk():
    x = np.array([0.3, -2.0]).reshape(1, 1, 1, 2)
    assert vl_nnloss(x, [1, 1], loss="mshinge").item() == 0.0
    # runner-up index falls back onto the label itself; MATLAB's y(qi) = +W is written last
    np.testing.assert_array_equal(vl_nnloss(x, [1, 1], 2.0, loss="mshinge"), np.full(x.shape, 1.0))


def test_log_derivative_clamps_at_1e_minus_8():
    x = np.array([0.0, 0.5]).reshape(1, 1, 2, 1)
    dzdx = vl_nnloss(x, [1], 1.0, loss="log")
    assert dzdx[0, 0, 0, 0] == -1e8 and dzdx[0, 0, 1, 0] == 0


def test_float32_in_float32_out_and_dropped_singletons():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)  # N = 1 stored as 3-D
    for fn in (vl_nnloss, vl_nnsoftmaxloss):
        y = fn(x, [2])
        assert y.shape == (1, 1, 1, 1) and y.dtype == np.float32
        d = fn(x, [2], np.float32(1))
        assert d.shape == (2, 3, 4, 1) and d.dtype == np.float32


def test_empty_dzdy_means_forward():
    x = np.random.default_rng(6).standard_normal((1, 1, 3, 2))
    np.testing.assert_array_equal(vl_nnloss(x, [1, 2], np.zeros(0)), vl_nnloss(x, [1, 2]))


X = np.random.default_rng(7).standard_normal((2, 2, 3, 2))
C = np.ones((2, 2, 1, 2))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"c": C, "loss": "nope"}, "loss"),
        ({"c": C, "dialect": "beta26"}, "dialect"),
        ({"c": C, "dialect": "beta25", "normalise": False}, "normalise"),
        ({"c": C, "normalise": "yes"}, "normalise"),
        ({"c": C * 4}, "c"),  # label above the number of classes
        ({"c": -C}, "c"),
        ({"c": C * 1.5}, "c"),
        ({"c": np.ones((2, 2, 1, 3))}, "c"),
        ({"c": np.ones((2, 2, 3, 2))}, "c"),  # attribute labels for a categorical loss
        ({"c": C, "loss": "hinge"}, "c"),  # one label per location for a binary loss
        ({"c": np.full(X.shape, 2.0), "loss": "logistic"}, "c"),
        ({"c": [[np.nan, 1]]}, "c"),
        ({"c": C, "instance_weights": np.ones((2, 3, 1, 2))}, "instance_weights"),
        ({"c": C, "instance_weights": np.ones((2, 2, 1, 2, 2))}, "instance_weights"),
        ({"c": C, "loss": "topkerror", "top_k": 4}, "top_k"),
        ({"c": C, "loss": "topkerror", "top_k": 0}, "top_k"),
        ({"c": C, "loss": "topkerror", "top_k": 1.5}, "top_k"),
        ({"c": C, "loss": "binaryerror", "threshold": np.inf}, "threshold"),
        ({"c": C, "dzdy": np.ones(2)}, "dzdy"),
    ],
)
def test_vl_nnloss_errors(kwargs, name):
    kwargs = dict(kwargs)
    c, dzdy = kwargs.pop("c"), kwargs.pop("dzdy", None)
    with pytest.raises(McnError, match=name):
        vl_nnloss(X, c, dzdy, **kwargs)


@pytest.mark.parametrize(
    ("x", "c", "kwargs", "name"),
    [
        (X, C * 4, {}, "c"),
        (X, C * 0.5, {}, "c"),
        (X, np.ones((2, 2, 3, 2)), {}, "c"),
        (X, np.ones((3, 2, 1, 2)), {}, "c"),
        (X, C, {"dialect": "master2"}, "dialect"),
        (X.astype(int), C, {}, "x"),
        (X, "cat", {}, "c"),
    ],
)
def test_vl_nnsoftmaxloss_errors(x, c, kwargs, name):
    with pytest.raises(McnError, match=name):
        vl_nnsoftmaxloss(x, c, **kwargs)


def test_vl_nnsoftmaxloss_dzdy_must_be_scalar():
    with pytest.raises(McnError, match="dzdy"):
        vl_nnsoftmaxloss(X, C, np.ones(3))


def test_vl_nnsoftmaxloss_ignores_negative_labels():
    x = np.random.default_rng(8).standard_normal((1, 2, 3, 1))
    np.testing.assert_array_equal(
        vl_nnsoftmaxloss(x, np.array([-1.0, 2.0]).reshape(1, 2, 1, 1)),
        vl_nnsoftmaxloss(x, np.array([0.0, 2.0]).reshape(1, 2, 1, 1)),
    )
