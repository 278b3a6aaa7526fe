"""vl_nnbnorm: training-mode gradients, given-moments mode, summation order, shapes and errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.mcn import McnError, vl_nnbnorm
from harness.mcn.bnorm import _channel_columns, _sequential_sum

from ..gradcheck import numeric_grad


@st.composite
def bnorm_cases(draw):
    """x (H x W x C x N, at least 2 values per channel), g, b in one of MatConvNet's shapes, dzdy, eps."""
    h, w, depth = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.integers(2 if h * w == 1 else 1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # channel means and scales of different sizes; the variance is never tiny
    x = rng.standard_normal((h, w, depth, n)) * rng.uniform(0.5, 3.0, (1, 1, depth, 1))
    x += rng.uniform(-2.0, 2.0, (1, 1, depth, 1))
    layout = draw(st.sampled_from([(depth, 1), (1, depth), (depth,)]))
    g = rng.uniform(0.5, 2.0, depth).reshape(layout)
    b = rng.uniform(-1.0, 1.0, depth).reshape(layout)
    dzdy = rng.standard_normal(x.shape)
    epsilon = draw(st.sampled_from([1e-4, 1e-5, 0.1]))
    return x, g, b, dzdy, epsilon


@settings(deadline=None)
@given(case=bnorm_cases())
def test_training_mode_gradients(case):
    x, g, b, dzdy, epsilon = case
    dzdx, dzdg, dzdb, moments = vl_nnbnorm(x, g, b, dzdy, epsilon=epsilon)
    depth = x.shape[2]
    assert dzdx.shape == x.shape and dzdg.shape == (depth, 1) and dzdb.shape == (depth, 1)

    def objective(_) -> float:  # numeric_grad changes x, g or b in place
        return float(np.sum(vl_nnbnorm(x, g, b, epsilon=epsilon) * dzdy))

    np.testing.assert_allclose(dzdx, numeric_grad(objective, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dzdg.ravel(), numeric_grad(objective, g).ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dzdb.ravel(), numeric_grad(objective, b).ravel(), rtol=1e-5, atol=1e-6)
    # the fourth output is the batch moments, the same as the forward pass returns
    np.testing.assert_array_equal(moments, vl_nnbnorm(x, g, b, epsilon=epsilon, return_moments=True)[1])


@settings(deadline=None)
@given(case=bnorm_cases())
def test_training_forward_moments(case):
    x, g, b, _, epsilon = case
    y, moments = vl_nnbnorm(x, g, b, epsilon=epsilon, return_moments=True)
    mu = x.mean(axis=(0, 1, 3))
    sigma = np.sqrt(x.var(axis=(0, 1, 3)) + epsilon)  # biased variance, epsilon inside the root
    assert moments.shape == (x.shape[2], 2)
    np.testing.assert_allclose(moments, np.stack([mu, sigma], axis=1), rtol=1e-10, atol=1e-12)
    want = g.reshape(1, 1, -1, 1) * (x - mu.reshape(1, 1, -1, 1)) / sigma.reshape(1, 1, -1, 1)
    np.testing.assert_allclose(y, want + b.reshape(1, 1, -1, 1), rtol=1e-10, atol=1e-10)


@settings(deadline=None)
@given(case=bnorm_cases(), seed=st.integers(0, 2**32 - 1))
def test_given_moments(case, seed):
    x, g, b, dzdy, epsilon = case
    depth = x.shape[2]
    rng = np.random.default_rng(seed)
    moments = np.stack([rng.uniform(-1, 1, depth), rng.uniform(0.5, 2.0, depth)], axis=1)
    mu, sigma = (moments[:, k].reshape(1, 1, -1, 1) for k in (0, 1))
    gc, bc = g.reshape(1, 1, -1, 1), b.reshape(1, 1, -1, 1)
    # forward: sigma used as given, epsilon not added again
    y, m_out = vl_nnbnorm(x, g, b, epsilon=epsilon, moments=moments, return_moments=True)
    np.testing.assert_allclose(y, gc * (x - mu) / sigma + bc, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(m_out, moments)
    # backward: the batch-statistics formula evaluated with the given mu and sigma
    mass = x.shape[0] * x.shape[1] * x.shape[3]
    dzdb = dzdy.sum(axis=(0, 1, 3))
    dzdg = ((dzdy * (x - mu)).sum(axis=(0, 1, 3))) / sigma.ravel()
    dzdx = gc / sigma * (dzdy - dzdb.reshape(1, 1, -1, 1) / mass)
    dzdx -= gc / sigma * dzdg.reshape(1, 1, -1, 1) / (mass * sigma) * (x - mu)
    got = vl_nnbnorm(x, g, b, dzdy, epsilon=epsilon, moments=moments)
    np.testing.assert_allclose(got[0], dzdx, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got[1].ravel(), dzdg, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got[2].ravel(), dzdb, rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(got[3], moments)


@settings(deadline=None)
@given(case=bnorm_cases())
def test_backward_with_batch_moments_equals_training_backward(case):
    x, g, b, dzdy, epsilon = case
    train = vl_nnbnorm(x, g, b, dzdy, epsilon=epsilon)
    given_ = vl_nnbnorm(x, g, b, dzdy, moments=train[3])
    for a, c in zip(train, given_, strict=True):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize(
    "shape",
    [
        (6, 7, 3, 1),
        (30, 30, 1, 7),
        (1, 1, 5, 300),
        (4, 5, 2, 20),
        (1, 1, 8, 100),  # H = W = 1: the transposed view is column-major without a copy
        (100, 100, 1, 1),  # one channel: one contiguous run (numpy would sum it pairwise)
        (2, 2, 4096, 2),
        (32, 32, 64, 16),  # the ResNet benchmark's shape
        (9, 9, 17, 33),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sums_are_sequential_in_matconvnet_memory_order(shape, dtype):
    """nnbnorm.cpp adds element by element (n outer, then w, then h) in x's precision."""
    rng = np.random.default_rng(9)
    x = ((rng.standard_normal(shape) + 3) * rng.uniform(0.1, 100)).astype(dtype)
    h, w, depth, n = shape
    want = np.zeros(depth, dtype)
    for m in range(n):
        for j in range(w):
            for i in range(h):
                want = want + x[i, j, :, m]
    got = _sequential_sum(_channel_columns(x))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


def test_float32_stays_float32_and_dropped_singletons():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((4, 5, 3)).astype(np.float32)  # N = 1 stored as 3-D
    g, b = np.ones((1, 3)), np.zeros((1, 3))  # float64 parameters are cast to x's dtype
    y, m = vl_nnbnorm(x, g, b, return_moments=True)
    assert y.shape == (4, 5, 3, 1) and y.dtype == np.float32 and m.dtype == np.float32
    out = vl_nnbnorm(x, g, b, rng.standard_normal((4, 5, 3)).astype(np.float32))
    assert [o.shape for o in out] == [(4, 5, 3, 1), (3, 1), (3, 1), (3, 2)]
    assert all(o.dtype == np.float32 for o in out)


def test_moments_trailing_singletons_accepted():
    x = np.random.default_rng(11).standard_normal((2, 2, 3, 2))
    m = np.stack([np.zeros(3), np.ones(3)], axis=1)
    np.testing.assert_array_equal(vl_nnbnorm(x, np.ones(3), np.zeros(3), moments=m.reshape(3, 2, 1, 1)), x)


X = np.random.default_rng(12).standard_normal((2, 3, 4, 2))
G, B = np.ones(4), np.zeros(4)
M = np.stack([np.zeros(4), np.ones(4)], axis=1)


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((X, np.ones(3), B), {}, "g"),
        ((X, G, np.zeros((4, 2))), {}, "b"),
        ((X, "g", B), {}, "g"),
        ((X, G, B), {"moments": M.T}, "moments"),
        ((X, G, B), {"moments": np.ones((4, 3))}, "moments"),
        ((X, G, B), {"moments": np.ones(8)}, "moments"),
        ((X, G, B), {"moments": np.stack([np.zeros(4), np.r_[1.0, 1.0, 0.0, 1.0]], axis=1)}, "moments"),
        ((X, G, B), {"moments": np.stack([np.zeros(4), -np.ones(4)], axis=1)}, "moments"),
        ((X, G, B), {"epsilon": -1e-4}, "epsilon"),
        ((X, G, B), {"epsilon": [1e-4, 1e-5]}, "epsilon"),
        ((X, G, B), {"epsilon": np.nan}, "epsilon"),
        ((X, G, B), {"epsilon": "small"}, "epsilon"),
        ((X, G, B, np.ones((2, 3, 4))), {}, "dzdy"),
        ((X.astype(int), G, B), {}, "x"),
        ((np.zeros((0, 3, 4, 2)), G, B), {}, "x"),
    ],
)
def test_errors(args, kwargs, name):
    with pytest.raises(McnError, match=name):
        vl_nnbnorm(*args, **kwargs)
