"""vl_nnrelu, vl_nnsigmoid, vl_nnsoftmax, vl_nndropout: gradients, MatConvNet's formulas, errors.

Gradients are checked in float64 by central differences of ``sum(y .* dzdy)``. ReLU inputs
are built at least 0.1 away from the kink at 0 by construction; the value at exactly 0
(where MatConvNet's derivative is the leak) has its own test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.mcn import McnError, vl_nndropout, vl_nnrelu, vl_nnsigmoid, vl_nnsoftmax

from ..gradcheck import numeric_grad


def check_gradient(forward, backward, x: np.ndarray, rng: np.random.Generator) -> None:
    __tracebackhide__ = True
    dzdy = rng.standard_normal(forward(x).shape)
    dzdx = backward(x, dzdy)
    assert dzdx.shape == x.shape and dzdx.dtype == np.float64
    num = numeric_grad(lambda a: float(np.sum(forward(a) * dzdy)), x.copy())
    np.testing.assert_allclose(dzdx, num, rtol=1e-6, atol=1e-7)


shapes = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(1, 3))
seeds = st.integers(0, 2**32 - 1)


@settings(deadline=None)
@given(shapes, st.sampled_from([0.0, 0.1, 0.5, -0.2, 1.5]), seeds)
def test_relu_gradient(shape, leak, seed):
    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 2.0, shape)  # |x| >= 0.1: off the kink
    check_gradient(lambda a: vl_nnrelu(a, leak=leak), lambda a, g: vl_nnrelu(a, g, leak=leak), x, rng)


@settings(deadline=None)
@given(shapes, seeds)
def test_sigmoid_gradient(shape, seed):
    rng = np.random.default_rng(seed)
    check_gradient(vl_nnsigmoid, vl_nnsigmoid, rng.uniform(-4.0, 4.0, shape), rng)


@settings(deadline=None)
@given(shapes, seeds)
def test_softmax_gradient(shape, seed):
    rng = np.random.default_rng(seed)
    check_gradient(vl_nnsoftmax, vl_nnsoftmax, rng.uniform(-3.0, 3.0, shape), rng)


@settings(deadline=None)
@given(shapes, st.sampled_from([0.0, 0.25, 0.5, 0.9]), seeds)
def test_dropout_gradient_with_mask(shape, rate, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    _, mask = vl_nndropout(x, rate=rate, rng=rng, return_mask=True)
    check_gradient(
        lambda a: vl_nndropout(a, rate=rate, mask=mask),
        lambda a, g: vl_nndropout(a, g, rate=rate, mask=mask),
        x,
        rng,
    )


def test_relu_formula_and_derivative_at_zero():
    x = np.array([-2.0, -0.0, 0.0, 3.0], np.float32).reshape(1, 1, 4, 1)
    g = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 1, 4, 1)
    np.testing.assert_array_equal(vl_nnrelu(x).ravel(), [0, 0, 0, 3])
    np.testing.assert_array_equal(vl_nnrelu(x, g).ravel(), [0, 0, 0, 4])  # 0 at exactly 0
    np.testing.assert_array_equal(vl_nnrelu(x, leak=0.1).ravel(), np.float32([-0.2, 0, 0, 3]))
    np.testing.assert_array_equal(vl_nnrelu(x, g, leak=0.1).ravel(), np.float32([0.1, 0.2, 0.3, 4]))
    assert vl_nnrelu(x, leak=0.1).dtype == np.float32
    # MATLAB's max(x, 0) ignores NaN.
    assert vl_nnrelu(np.array([np.nan]))[0, 0, 0, 0] == 0


def test_sigmoid_and_softmax_values():
    x = np.array([[-1.0, 0.0, 2.0]]).reshape(1, 1, 3, 1)
    np.testing.assert_allclose(vl_nnsigmoid(x).ravel(), 1 / (1 + np.exp(-x.ravel())))
    y = vl_nnsoftmax(x)
    np.testing.assert_allclose(y.ravel(), np.exp(x.ravel()) / np.exp(x.ravel()).sum())
    # The max subtraction keeps huge scores finite; the sum over channels is 1 at every pixel.
    big = np.random.default_rng(0).uniform(-1e4, 1e4, (2, 3, 5, 2)).astype(np.float32)
    y = vl_nnsoftmax(big)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(axis=2), 1.0, rtol=1e-6)
    assert vl_nnsigmoid(np.float32([-1e5, 1e5])).ravel().tolist() == [0.0, 1.0]


def test_dropout_mask_draw():
    x = np.ones((6, 7, 8, 9), np.float32)
    y, mask = vl_nndropout(x, rate=0.25, rng=np.random.default_rng(1), return_mask=True)
    assert mask.dtype == np.float32 and y.dtype == np.float32 and mask.shape == x.shape
    assert set(np.unique(mask).tolist()) == {0.0, np.float32(1 / 0.75)}
    assert abs((mask == 0).mean() - 0.25) < 0.03
    np.testing.assert_array_equal(y, mask * x)
    # Deterministic given the generator; the mask is applied unchanged backward.
    y2 = vl_nndropout(x, rate=0.25, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(y, y2)
    g = np.full(x.shape, 3.0, np.float32)
    dzdx, mask2 = vl_nndropout(x, g, mask=mask, return_mask=True)
    np.testing.assert_array_equal(dzdx, 3 * mask)
    assert mask2 is not None and np.array_equal(mask2, mask)
    # rate 0 keeps everything; double inputs get a double mask.
    _, m0 = vl_nndropout(x.astype(np.float64), rate=0.0, return_mask=True)
    assert m0.dtype == np.float64 and np.all(m0 == 1)


def test_inputs_with_dropped_singleton_dims():
    x, g = np.linspace(-1, 1, 12).reshape(3, 4), np.ones((3, 4))
    for fn, kw in ((vl_nnrelu, {}), (vl_nnsigmoid, {}), (vl_nnsoftmax, {}), (vl_nndropout, {"mask": g})):
        assert fn(x, **kw).shape == (3, 4, 1, 1)
        assert fn(x, g, **kw).shape == (3, 4, 1, 1)


X = np.zeros((2, 3, 4, 1), np.float32)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: vl_nnrelu(X, np.zeros((2, 3, 5))), "dzdy"),
        (lambda: vl_nnrelu(X, leak=[0.1, 0.2]), "leak"),
        (lambda: vl_nnrelu(X.astype(np.int64)), "x"),
        (lambda: vl_nnsigmoid(X, np.zeros((3, 3, 4))), "dzdy"),
        (lambda: vl_nnsoftmax(X, np.zeros((2, 3, 4, 2))), "dzdy"),
        (lambda: vl_nnsoftmax(np.zeros((1, 1, 1, 1, 2))), "x"),
        (lambda: vl_nndropout(X, rate=1.0), "rate"),
        (lambda: vl_nndropout(X, rate=-0.1), "rate"),
        (lambda: vl_nndropout(X, rate=[0.1, 0.2]), "rate"),
        (lambda: vl_nndropout(X, mask=np.ones((2, 3, 5, 1))), "mask"),
        (lambda: vl_nndropout(X, mask=np.array(["a"] * 24).reshape(2, 3, 4)), "mask"),
        (lambda: vl_nndropout(X, np.ones_like(X)), "mask"),
        (lambda: vl_nndropout(X, rng=123), "rng"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(McnError, match=rf"Received .*\b{name}\b"):
        call()


def test_relu_shared_among_cores_is_bitwise_matlabs_formula(monkeypatch):
    """Above threads.PARALLEL_MIN_ELEMENTWISE the passes are split by rows among the cores:
    the values are MATLAB's max(x, 0) and dzdy .* (x > 0) bit for bit, NaN, infinities and
    signed zeros included."""
    from harness.mcn.kernels import threads

    monkeypatch.setattr(threads, "cpu_cores", lambda: 2)
    monkeypatch.setattr(threads, "PARALLEL_MIN_ELEMENTWISE", 64)
    rng = np.random.default_rng(5)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45], np.float32)
    x = rng.standard_normal((9, 5, 4, 3)).astype(np.float32)
    dzdy = rng.standard_normal(x.shape).astype(np.float32)
    x.flat[: special.size], dzdy.flat[-special.size :] = special, special
    y, dzdx = vl_nnrelu(x), vl_nnrelu(x, dzdy)
    assert y.dtype == dzdx.dtype == np.float32
    np.testing.assert_array_equal(y.view(np.int32), np.fmax(x, np.float32(0)).view(np.int32))
    np.testing.assert_array_equal(dzdx.view(np.int32), (dzdy * (x > 0)).view(np.int32))
