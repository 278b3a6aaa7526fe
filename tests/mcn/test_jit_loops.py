"""The compiled loops (harness.mcn.kernels.jit: batch normalisation, the plain ReLU, average
pooling, the column matrix's copies) give the bits of their numpy definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.mcn import bnorm, vl_nnbnorm, vl_nnconv, vl_nnpool, vl_nnrelu
from harness.mcn.kernels import bnorm_loops, jit

from .test_kernels_paths import _arrays as _conv_arrays
from .test_kernels_paths import conv_cases, forced

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba is not installed")

SHAPES = [(6, 7, 3, 1), (30, 30, 1, 7), (1, 1, 5, 300), (2, 2, 4096, 2), (32, 32, 32, 16), (9, 9, 17, 33)]


def _same_bits(got, want) -> None:
    """The same numbers bit for bit (so -0 is not +0), NaN where NaN (whatever its payload)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    bits = f"u{got.itemsize}"
    np.testing.assert_array_equal(np.where(nan, 0, got).view(bits), np.where(nan, 0, want).view(bits))


def _data(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal(shape) + 3) * rng.uniform(0.1, 100)).astype(dtype)
    d = rng.standard_normal(shape).astype(dtype)
    return x, d


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sums_bitwise(shape, dtype):
    x, d = _data(shape, dtype, 1)
    for got, want in zip(bnorm_loops.moment_sums(x), bnorm._numpy_moment_sums(x), strict=True):
        assert got.dtype == dtype
        _same_bits(got, want)
    for got, want in zip(bnorm_loops.derivative_sums(x, d), bnorm._numpy_derivative_sums(x, d), strict=True):
        _same_bits(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_passes_bitwise(shape, dtype):
    x, d = _data(shape, dtype, 2)
    rng = np.random.default_rng(3)
    mu, a, b, c = (rng.standard_normal(shape[2]).astype(dtype) for _ in range(4))
    _same_bits(bnorm_loops.normalize(x, mu, a, b), bnorm._numpy_normalize(x, mu, a, b))
    _same_bits(
        bnorm_loops.normalize_backward(x, d, mu, a, b, c), bnorm._numpy_normalize_backward(x, d, mu, a, b, c)
    )


def _both(monkeypatch, fn):
    """fn() with the compiled loops, then with the numpy definitions."""
    compiled = fn()
    monkeypatch.setattr(jit, "ENABLED", False)
    assert not jit.available()
    plain = fn()
    monkeypatch.setattr(jit, "ENABLED", True)
    return compiled, plain


@settings(deadline=None, max_examples=40)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.integers(1, 5)),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
    given_moments=st.booleans(),
    specials=st.booleans(),
)
def test_vl_nnbnorm_same_bits_either_way(shape, dtype, seed, given_moments, specials):
    """Forward and backward, batch or given moments, with NaN and infinities in x when
    ``specials``: every output is the same array with and without numba."""
    x, d = _data(shape, dtype, seed)
    if specials:
        x.flat[:: max(1, x.size // 3)] = [np.nan, np.inf, -np.inf][: len(x.flat[:: max(1, x.size // 3)])]
    rng = np.random.default_rng(seed)
    g, b = rng.uniform(0.5, 2, shape[2]), rng.uniform(-1, 1, shape[2])
    moments = None
    if given_moments:
        moments = np.stack([rng.uniform(-1, 1, shape[2]), rng.uniform(0.5, 2, shape[2])], axis=1)
    with pytest.MonkeyPatch.context() as mp:
        fwd = _both(mp, lambda: vl_nnbnorm(x, g, b, moments=moments, return_moments=True))
        bwd = _both(mp, lambda: vl_nnbnorm(x, g, b, d, moments=moments))
    for compiled, plain in (fwd, bwd):
        for got, want in zip(compiled, plain, strict=True):
            assert got.dtype == want.dtype == dtype
            _same_bits(got, want)


@pytest.mark.parametrize("depth", [1, 3])
def test_all_negative_zero_channels_same_bits(monkeypatch, depth):
    """A channel of -0 (a dead ReLU map times a negative gain): both forms start each sum
    from +0, as nnbnorm.cpp's accumulators do, so the sums are +0, not -0."""
    x = np.full((2, 2, depth, 3), -0.0, np.float32)
    g, b = np.ones(depth), np.full(depth, -0.0)
    compiled = vl_nnbnorm(x, g, b, return_moments=True), vl_nnbnorm(x, g, b, x)
    monkeypatch.setattr(jit, "ENABLED", False)
    plain = vl_nnbnorm(x, g, b, return_moments=True), vl_nnbnorm(x, g, b, x)
    for got, want in zip((*compiled[0], *compiled[1]), (*plain[0], *plain[1]), strict=True):
        _same_bits(got, want)
    assert not np.signbit(compiled[0][1][:, 0]).any()  # the mean: +0


def test_non_contiguous_inputs(monkeypatch):
    """Views (a channel slice, a transposed array) give what their copies give."""
    x, d = _data((5, 4, 6, 3), np.float32, 4)
    xv, dv = x[:, :, ::2], np.asfortranarray(d)[:, :, ::2]
    g, b = np.ones(3), np.zeros(3)
    got = vl_nnbnorm(xv, g, b, dv)
    monkeypatch.setattr(jit, "ENABLED", False)
    want = vl_nnbnorm(xv.copy(), g, b, dv.copy())
    for a, c in zip(got, want, strict=True):
        _same_bits(a, c)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 2), (64, 64, 32, 9)])  # the last split among cores
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_same_bits_either_way(monkeypatch, shape, dtype):
    """Forward and backward of the plain ReLU with -0, NaN and infinities in x and dzdy: the
    same bits, but for the sign of the forward's zero from x = -0, which numpy's own fmax
    gives as -0 or +0 depending on its vector or scalar loop (the compiled loop: +0)."""
    rng = np.random.default_rng(5)
    specials = np.array([-0.0, 0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45], dtype)
    x = rng.standard_normal(shape).astype(dtype)
    d = rng.standard_normal(shape).astype(dtype)
    x.flat[: min(x.size, 7)] = specials[: min(x.size, 7)]
    d.flat[-min(d.size, 7) :] = specials[: min(d.size, 7)]
    d.flat[:: max(1, d.size // 11)] = np.nan
    compiled = vl_nnrelu(x), vl_nnrelu(x, d)
    monkeypatch.setattr(jit, "ENABLED", False)
    plain = vl_nnrelu(x), vl_nnrelu(x, d)
    for got, want in zip(compiled, plain, strict=True):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_array_equal(got, want)  # NaN where NaN; -0 == +0
    np.testing.assert_array_equal(compiled[1].view(f"u{x.itemsize}"), plain[1].view(f"u{x.itemsize}"))
    assert not np.signbit(compiled[0]).any() and not np.isnan(compiled[0]).any()


@settings(deadline=None, max_examples=60)
@given(
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    cn=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    pool=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pads=st.tuples(*[st.integers(0, 3)] * 4),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_average_pooling_same_bits_either_way(hw, cn, pool, stride, pads, dtype, seed):
    """Forward and backward average pooling (overlapping windows, padding, strides; values
    of very different sizes so that the order of additions shows)."""
    pt, pb, pl, pr = (min(p, pool[k // 2] - 1) for k, p in enumerate(pads))
    if hw[0] + pt + pb < pool[0] or hw[1] + pl + pr < pool[1]:
        return
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*hw, *cn)) * 10.0 ** rng.integers(-6, 7, (*hw, *cn))).astype(dtype)
    opts = dict(method="avg", pad=[pt, pb, pl, pr], stride=list(stride))
    y = vl_nnpool(x, list(pool), **opts)
    d = (rng.standard_normal(y.shape) * 10.0 ** rng.integers(-6, 7, y.shape)).astype(dtype)
    compiled = y, vl_nnpool(x, list(pool), d, **opts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jit, "ENABLED", False)
        plain = vl_nnpool(x, list(pool), **opts), vl_nnpool(x, list(pool), d, **opts)
    for got, want in zip(compiled, plain, strict=True):
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))


@pytest.mark.parametrize(
    "pool, stride",
    [
        (16, 1),  # the ResNet head: one window of 256 taps, in compact blocks
        (2, 2),  # windows apart: the loop runs on strided parts of the arrays, one per core
        (3, 2),  # overlapping windows, in compact blocks shared among the cores
    ],
)
def test_average_pooling_of_large_maps_same_bits(monkeypatch, pool, stride):
    x = np.random.default_rng(6).standard_normal((16, 16, 64, 16)).astype(np.float32)
    y = vl_nnpool(x, pool, method="avg", stride=stride)
    d = np.random.default_rng(7).standard_normal(y.shape).astype(np.float32)
    compiled = y, vl_nnpool(x, pool, d, method="avg", stride=stride)
    monkeypatch.setattr(jit, "ENABLED", False)
    plain = (
        vl_nnpool(x, pool, method="avg", stride=stride),
        vl_nnpool(x, pool, d, method="avg", stride=stride),
    )
    for got, want in zip(compiled, plain, strict=True):
        np.testing.assert_array_equal(got.view("u4"), want.view("u4"))


@settings(deadline=None, max_examples=60)
@given(case=conv_cases(), dtype=st.sampled_from([np.float32, np.float64]), two_threads=st.booleans())
def test_column_matrix_copies_same_bits_either_way(case, dtype, two_threads):
    """The column matrix's im2col and col2im as compiled loops: vl_nnconv forward and
    backward on the column-matrix path give the same bits as with numpy's copies."""
    rng, x, f, b = _conv_arrays(case, dtype)
    opts = dict(pad=case.pad, stride=case.stride, dilate=case.dilate)
    with forced("columns", two_threads=two_threads, small_blocks=True) as mp:
        y = vl_nnconv(x, f, b, **opts)
        dzdy = rng.standard_normal(y.shape).astype(dtype)
        compiled = (y, *vl_nnconv(x, f, b, dzdy, **opts))
        mp.setattr(jit, "ENABLED", False)
        plain = (vl_nnconv(x, f, b, **opts), *vl_nnconv(x, f, b, dzdy, **opts))
    for got, want in zip(compiled, plain, strict=True):
        _same_bits(got, want)
