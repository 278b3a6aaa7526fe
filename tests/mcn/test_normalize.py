"""vl_nnnormalize (LRN) and MatConvNet's fast_pow: gradients, window, approximation, errors.

Gradients are checked in float64 by central differences with ``exact=True``: the default
``fast_pow`` is piecewise polynomial on the float's bit pattern and not smooth at the
scale of a finite-difference step, so it is instead held to the exact power within the
approximation's tolerance (5e-3 relative), and pinned bit for bit to values produced by
nnnormalize.cpp's ``fast_pow`` compiled with GCC 12 -O2 (its ``fast-math`` pragma on).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.mcn import McnError, vl_nnnormalize
from harness.mcn.normalize import fast_pow

from ..gradcheck import numeric_grad

# (x, y, float32 bits, float64 bits) of fast_pow(x, y) from the compiled C++ kernel.
FAST_POW_PINS = [
    (1.0, -0.75, 0x3F800000, 0x3FF0000000000000),
    (2.0, -0.75, 0x3F1828AD, 0x3FE3051591F9DD5B),
    (0.5, -0.5, 0x3FB4E8DE, 0x3FF69D1BD0105C60),
    (1.5, -0.75, 0x3F3C416E, 0x3FE7882DA17AFDE3),
    (3.0, -0.5, 0x3F137D91, 0x3FE26FB2199AA923),
    (1000.0, -0.75, 0x3BB8254C, 0x3F7704A96B3D8734),
    (1.0001, -0.5, 0x3F7FFCBA, 0x3FEFFF97263BD825),
    (7.25, -1.3, 0x3D9B9D10, 0x3FB373A1EE773CA6),
]


@st.composite
def lrn_cases(draw, betas=(0.5, 0.75, 1.2)):
    """(x shape, param): window sizes from 1 to beyond the depth, Caffe-like and larger alphas.

    Shrinks toward a single pixel, one channel, N = 1.
    """
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 7)),
        draw(st.integers(1, 2)),
    )
    n = draw(st.integers(1, 2 * shape[2] + 1))
    kappa = draw(st.sampled_from([0.5, 1.0, 2.0]))
    alpha = draw(st.sampled_from([1e-4, 1e-2, 0.3]))
    beta = draw(st.sampled_from(betas))
    return shape, [n, kappa, alpha, beta]


def reference_lrn(x: np.ndarray, param) -> np.ndarray:
    """The documented formula with fresh window sums and the exact power."""
    n, kappa, alpha, beta = param
    m1, m2 = (n - 1) // 2, n - (n - 1) // 2 - 1
    depth = x.shape[2]
    y = np.empty_like(x)
    for k in range(depth):
        window = x[:, :, max(0, k - m1) : min(depth, k + m2 + 1)]
        y[:, :, k] = x[:, :, k] * (kappa + alpha * (window**2).sum(axis=2)) ** -beta
    return y


@settings(deadline=None)
@given(lrn_cases(), st.integers(0, 2**32 - 1))
def test_gradient_exact_power(case, seed):
    shape, param = case
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, shape)
    dzdy = rng.standard_normal(shape)
    dzdx = vl_nnnormalize(x, param, dzdy, exact=True)
    assert dzdx.shape == shape and dzdx.dtype == np.float64
    num = numeric_grad(lambda a: float(np.sum(vl_nnnormalize(a, param, exact=True) * dzdy)), x.copy())
    np.testing.assert_allclose(dzdx, num, rtol=1e-6, atol=1e-7)


@settings(deadline=None)
# fast_pow's relative error grows with |BETA| (see test_fast_pow_error_bound): 5e-3 holds to 1.
@given(
    lrn_cases(betas=(0.5, 0.75, 1.0)), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1)
)
def test_fast_pow_within_tolerance_of_exact_power(case, dtype, seed):
    shape, param = case
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3.0, 3.0, shape).astype(dtype)
    dzdy = rng.standard_normal(shape).astype(dtype)
    y_exact = vl_nnnormalize(x, param, exact=True)
    y_fast = vl_nnnormalize(x, param)
    assert y_fast.dtype == dtype
    np.testing.assert_allclose(y_exact, reference_lrn(x.astype(np.float64), param), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(y_fast, y_exact, rtol=5e-3, atol=1e-6)
    g_exact = vl_nnnormalize(x, param, dzdy, exact=True)
    g_fast = vl_nnnormalize(x, param, dzdy)
    # dzdx is a difference of terms and may cancel: relative to the size of the terms.
    scale = np.abs(dzdy).max() * max(1.0, np.abs(x).max() ** 2)
    np.testing.assert_allclose(g_fast, g_exact, rtol=5e-3, atol=5e-3 * scale)


@pytest.mark.parametrize(("x", "y", "bits32", "bits64"), FAST_POW_PINS)
def test_fast_pow_matches_compiled_kernel_bitwise(x, y, bits32, bits64):
    assert fast_pow(np.array([x], np.float32), np.float32(y)).view(np.uint32)[0] == bits32
    assert fast_pow(np.array([x], np.float64), y).view(np.uint64)[0] == bits64


def test_fast_pow_error_bound():
    # log2's cubic is off by up to 5.3e-3 (absolute) and exp2's by 6.2e-4 (relative), so
    # x^y is off by about ln(2) * 5.3e-3 * |y| + 6.2e-4 relative: 3.3e-3 at y = -0.75.
    x = np.geomspace(1e-3, 1e4, 20001)
    for y in (-0.25, -0.5, -0.75, -1.0):
        for dtype in (np.float32, np.float64):
            got = fast_pow(x.astype(dtype), dtype(y)).astype(np.float64)
            rel = np.abs(got / x.astype(dtype).astype(np.float64) ** y - 1)
            assert rel.max() < 3.7e-3 * abs(y) + 7e-4


def test_window_bounds():
    x = np.zeros((1, 1, 6, 1))
    x[0, 0, 2, 0] = 1.0  # a single nonzero channel k = 2
    # N = 4: m1 = 1 back, m2 = 2 ahead; channel 2 enters the windows of k in [0, 3].
    assert vl_nnnormalize(x, [4, 1.0, 1.0, 1.0], exact=True)[0, 0, 2, 0] == pytest.approx(0.5)
    g = vl_nnnormalize(x, [4, 1.0, 1.0, 1.0], np.ones_like(x), exact=True)
    # With dzdy = 1 and x_q = 0 off channel 2, dzdx_q = 1 / L_q: 1/2 where the window of q
    # reaches channel 2 (q in [0, 3]), else 1. At q = 2 the two terms cancel: 1/2 - 2/4.
    np.testing.assert_allclose(g.ravel(), [0.5, 0.5, 0.0, 0.5, 1.0, 1.0], atol=1e-15)
    # N >= 2 * depth normalises all channels as one group.
    x = np.random.default_rng(0).standard_normal((2, 2, 3, 2))
    y = vl_nnnormalize(x, [6, 1.0, 0.5, 0.75], exact=True)
    np.testing.assert_allclose(y, x * (1 + 0.5 * (x**2).sum(axis=2, keepdims=True)) ** -0.75)


def test_dropped_singleton_dims_and_dtype():
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    y = vl_nnnormalize(x, [5, 1, 1e-4, 0.75])
    assert y.shape == (3, 4, 1, 1) and y.dtype == np.float32 and y.flags.c_contiguous
    assert vl_nnnormalize(x, [5, 1, 1e-4, 0.75], np.ones((3, 4))).shape == (3, 4, 1, 1)


X = np.ones((2, 2, 3, 1), np.float32)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: vl_nnnormalize(X, [5, 1, 1e-4]), "param"),
        (lambda: vl_nnnormalize(X, []), "param"),
        (lambda: vl_nnnormalize(X, [0, 1, 1e-4, 0.75]), "param"),
        (lambda: vl_nnnormalize(X, [2.5, 1, 1e-4, 0.75]), "param"),
        (lambda: vl_nnnormalize(X, [5, np.nan, 1e-4, 0.75]), "param"),
        (lambda: vl_nnnormalize(X, [5, 1, 1e-4, 0.75], np.ones((2, 2, 4, 1))), "dzdy"),
        (lambda: vl_nnnormalize(X.astype(int), [5, 1, 1e-4, 0.75]), "x"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(McnError, match=rf"Received .*\b{name}\b"):
        call()
