"""vl_nnpool: gradients, MatConvNet's window clipping and tie-breaking, and bad input.

Gradients are checked in float64 by central differences on tie-free inputs (distinct
multiples of 0.37, so no window maximum changes under a 1e-6 step). Options are valid by
construction: pads are drawn below the pool size, heights and widths at least the pool
size minus the padding. A transliteration of nnpooling.cpp's CPU loops pins the exact
semantics (clipped windows, strict '>' scan in column-major order, float32 operation
order) bit for bit, ties included.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.mcn.kernels.pool_blocks as pool_blocks
import harness.mcn.kernels.threads as threads
from harness.mcn import McnError, vl_nnpool

from ..gradcheck import numeric_grad


def loop_pool(x, pool, dzdy=None, *, method="max", pad=(0, 0, 0, 0), stride=(1, 1)):
    """nnpooling.cpp's CPU loops, transliterated (scalar arithmetic in the dtype of x)."""
    (ph, pw), (sy, sx), (pt, pb, pl, pr) = pool, stride, pad
    h, w, depth, n = x.shape
    ho, wo = (h + pt + pb - ph) // sy + 1, (w + pl + pr - pw) // sx + 1
    f = x.dtype.type
    y = np.zeros((ho, wo, depth, n), x.dtype)
    dzdx = np.zeros_like(x)
    for k in range(depth):
        for m in range(n):
            for ox in range(wo):
                for oy in range(ho):
                    x1, y1 = ox * sx - pl, oy * sy - pt
                    x2, y2 = min(x1 + pw, w), min(y1 + ph, h)
                    x1, y1 = max(x1, 0), max(y1, 0)
                    cells = [(v, u) for u in range(x1, x2) for v in range(y1, y2)]  # rows fastest
                    if method == "max":
                        value, active = f(-np.inf), None
                        for v, u in cells:
                            if x[v, u, k, m] > value:
                                value, active = x[v, u, k, m], (v, u)
                        y[oy, ox, k, m] = value
                        if dzdy is not None and active is not None:
                            dzdx[active + (k, m)] += dzdy[oy, ox, k, m]
                    else:
                        scale = f(1) / f((y2 - y1) * (x2 - x1))
                        value = f(0)
                        for v, u in cells:
                            value += x[v, u, k, m]
                            if dzdy is not None:
                                dzdx[v, u, k, m] += dzdy[oy, ox, k, m] * scale
                        y[oy, ox, k, m] = value * scale
    return y if dzdy is None else dzdx


@st.composite
def pool_options(draw, max_size: int = 6):
    """(input shape, pool, pad [T B L R], stride, method): valid by construction.

    Pads are drawn below the pool size on their axis, and H (W) at least the pool height
    (width) minus the padding. Shrinks toward 1x1 pools, no padding, stride 1, small inputs.
    """
    ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pad = (
        draw(st.integers(0, ph - 1)),
        draw(st.integers(0, ph - 1)),
        draw(st.integers(0, pw - 1)),
        draw(st.integers(0, pw - 1)),
    )
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h = draw(st.integers(max(1, ph - pad[0] - pad[1]), max_size))
    w = draw(st.integers(max(1, pw - pad[2] - pad[3]), max_size))
    shape = (h, w, draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    return shape, (ph, pw), pad, stride, draw(st.sampled_from(["max", "avg"]))


def tie_free(shape, rng: np.random.Generator) -> np.ndarray:
    """Distinct values 0.37 apart, negative and positive, in random positions."""
    size = int(np.prod(shape))
    return (rng.permutation(size) - size / 2).reshape(shape) * 0.37


@settings(deadline=None)
@given(pool_options(), st.integers(0, 2**32 - 1))
def test_gradient(options, seed):
    shape, pool, pad, stride, method = options
    rng = np.random.default_rng(seed)
    x = tie_free(shape, rng)
    kw = dict(method=method, pad=pad, stride=stride)
    y = vl_nnpool(x, pool, **kw)
    assert (
        y.shape
        == (
            (shape[0] + pad[0] + pad[1] - pool[0]) // stride[0] + 1,
            (shape[1] + pad[2] + pad[3] - pool[1]) // stride[1] + 1,
        )
        + shape[2:]
    )
    dzdy = rng.standard_normal(y.shape)
    dzdx = vl_nnpool(x, pool, dzdy, **kw)
    assert dzdx.shape == x.shape and dzdx.dtype == np.float64
    num = numeric_grad(lambda a: float(np.sum(vl_nnpool(a, pool, **kw) * dzdy)), x.copy())
    np.testing.assert_allclose(dzdx, num, rtol=1e-6, atol=1e-6)


@settings(deadline=None)
@given(
    pool_options(max_size=5),
    st.sampled_from(["ties", "negative", "normal"]),
    st.sampled_from([np.float32, np.float64]),
    st.integers(0, 2**32 - 1),
)
def test_matches_kernel_loops_bitwise(options, values, dtype, seed):
    shape, pool, pad, stride, method = options
    rng = np.random.default_rng(seed)
    x = {
        "ties": lambda: rng.integers(0, 3, shape),  # many equal maxima per window
        "negative": lambda: -rng.integers(1, 4, shape),  # padding must never win
        "normal": lambda: rng.standard_normal(shape),
    }[values]().astype(dtype)
    kw = dict(method=method, pad=pad, stride=stride)
    y = vl_nnpool(x, pool, **kw)
    dzdy = rng.standard_normal(y.shape).astype(dtype)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, loop_pool(x, pool, **kw))
    np.testing.assert_array_equal(vl_nnpool(x, pool, dzdy, **kw), loop_pool(x, pool, dzdy, **kw))


def test_max_backward_picks_first_maximum_in_column_major_order():
    # Window [[0, 5], [5, 0]]: scanning down the rows first meets (1, 0) before (0, 1).
    x = np.array([[0.0, 5.0], [5.0, 0.0]], np.float32)
    dzdx = vl_nnpool(x, 2, np.ones((1, 1), np.float32))
    np.testing.assert_array_equal(dzdx[:, :, 0, 0], [[0, 0], [1, 0]])
    # Overlapping windows over a constant image: each window's first cell is its top-left.
    dzdx = vl_nnpool(np.ones((3, 3), np.float32), 2, np.full((2, 2), 10.0, np.float32))
    np.testing.assert_array_equal(dzdx[:, :, 0, 0], [[10, 10, 0], [10, 10, 0], [0, 0, 0]])
    # A later, strictly larger value takes over; an equal one does not.
    x = np.array([[1.0, 2.0, 2.0]], np.float32)
    np.testing.assert_array_equal(vl_nnpool(x, [1, 3], np.ones((1, 1)))[0, :, 0, 0], [0, 1, 0])


def test_max_never_picks_padding():
    rng = np.random.default_rng(0)
    x = -rng.uniform(1.0, 2.0, (5, 4, 3, 2)).astype(np.float32)
    kw = dict(pad=[2, 1, 1, 2], stride=2)
    y = vl_nnpool(x, 3, **kw)
    assert np.all(y < 0)
    # Corner window: rows -2..0 and columns -1..1 hold real cells x[0, 0:2] only.
    np.testing.assert_array_equal(y[0, 0], x[0, :2].max(axis=0))
    dzdy = rng.uniform(1.0, 2.0, y.shape).astype(np.float32)
    dzdx = vl_nnpool(x, 3, dzdy, **kw)
    # Every output sends its whole derivative to a real cell.
    np.testing.assert_allclose(dzdx.sum(axis=(0, 1)), dzdy.sum(axis=(0, 1)), rtol=1e-6)


def test_avg_divides_by_real_cells_only():
    x = np.ones((4, 5, 2, 1), np.float32)
    kw = dict(method="avg", pad=[1, 2, 2, 0], stride=[1, 2])
    np.testing.assert_array_equal(vl_nnpool(x, 3, **kw), 1.0)
    # Top-left window covers rows -1..1 and columns -2..0: real cells 2 x 1.
    x = np.arange(20, dtype=np.float64).reshape(4, 5)
    assert vl_nnpool(x, 3, **kw)[0, 0, 0, 0] == pytest.approx((x[0, 0] + x[1, 0]) / 2)
    dzdx = vl_nnpool(x, 3, np.ones((5, 3)), **kw)
    # Cell (0, 0) is in windows (0,0), (1,0), (0,1), (1,1) of 2, 3, 6 and 9 real cells.
    assert dzdx[0, 0, 0, 0] == pytest.approx(1 / 2 + 1 / 3 + 1 / 6 + 1 / 9)


def test_accepts_dropped_singleton_dims_and_keeps_dtype():
    for dtype in (np.float32, np.float64):
        x = np.arange(12, dtype=dtype).reshape(3, 4)
        y = vl_nnpool(x, 2)
        assert y.shape == (2, 3, 1, 1) and y.dtype == dtype
        dzdx = vl_nnpool(x, 2, y[:, :, 0, 0])
        assert dzdx.shape == (3, 4, 1, 1) and dzdx.dtype == dtype


def test_large_input_matches_small_slices():
    # Large enough to be split across threads; each image must equal its own pooling.
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, (9, 9, 16, 64)).astype(np.float32)
    for kw in (dict(method="max", pad=1, stride=1), dict(method="avg", pad=[0, 1, 1, 0], stride=2)):
        y = vl_nnpool(x, 3, **kw)
        dzdy = rng.standard_normal(y.shape).astype(np.float32)
        dzdx = vl_nnpool(x, 3, dzdy, **kw)
        for m in (0, 31, 63):
            np.testing.assert_array_equal(y[..., m : m + 1], vl_nnpool(x[..., m : m + 1], 3, **kw))
            np.testing.assert_array_equal(
                dzdx[..., m : m + 1], vl_nnpool(x[..., m : m + 1], 3, dzdy[..., m : m + 1], **kw)
            )


@pytest.mark.parametrize(
    ("pool", "kw"),
    [
        (3, dict(method="max", pad=1, stride=1)),  # overlapping windows: compact blocks
        ([3, 2], dict(method="max", pad=[2, 0, 1, 0], stride=[2, 1])),
        (3, dict(method="avg", pad=[0, 1, 1, 0], stride=1)),
        (2, dict(method="max", stride=2)),  # disjoint windows: the arrays themselves, split
        ([2, 3], dict(method="avg", pad=[1, 0, 0, 2], stride=[2, 3])),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_and_threads_change_nothing(monkeypatch, pool, kw, dtype):
    """Work split into blocks over two threads equals the whole array on one thread, bit for bit."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 3, (7, 6, 5, 40)).astype(dtype)  # ties everywhere; C*N = 200
    y = vl_nnpool(x, pool, **kw)
    dzdy = rng.standard_normal(y.shape).astype(dtype)
    monkeypatch.setattr(threads, "cpu_cores", lambda: 1)
    monkeypatch.setattr(pool_blocks, "BLOCK_BYTES", 1 << 30)
    whole = (vl_nnpool(x, pool, **kw), vl_nnpool(x, pool, dzdy, **kw))
    np.testing.assert_array_equal(whole[0], y)
    monkeypatch.setattr(threads, "cpu_cores", lambda: 2)
    monkeypatch.setattr(threads, "PARALLEL_MIN", 0)
    # Blocks one column wide, then whole cache lines wide (48 or 64) with a narrower last one.
    for block_bytes in (1, 30_000):
        monkeypatch.setattr(pool_blocks, "BLOCK_BYTES", block_bytes)
        np.testing.assert_array_equal(vl_nnpool(x, pool, **kw), whole[0])
        np.testing.assert_array_equal(vl_nnpool(x, pool, dzdy, **kw), whole[1])


def test_max_backward_with_non_finite_dzdy_adds_only_to_winners():
    # dzdy * 0 would be NaN: an infinite or NaN derivative must reach its winning cell only.
    rng = np.random.default_rng(5)
    x = tie_free((6, 5, 2, 3), rng).astype(np.float32)
    y = vl_nnpool(x, 2, stride=1)
    dzdy = rng.standard_normal(y.shape).astype(np.float32)
    dzdy[1, 2, 0, 1], dzdy[3, 0, 1, 2] = np.inf, np.nan
    want = loop_pool(x, (2, 2), dzdy)
    np.testing.assert_array_equal(vl_nnpool(x, 2, dzdy), want)
    assert np.isnan(want).sum() == 1 and np.isinf(want).sum() == 1


def test_max_pool_with_more_than_255_taps():
    # A 16 x 17 pool has 272 taps: more than a byte can number.
    rng = np.random.default_rng(6)
    x = rng.integers(0, 50, (18, 17, 2, 1)).astype(np.float32)
    y = vl_nnpool(x, [16, 17], pad=[0, 1, 0, 0])
    np.testing.assert_array_equal(y, loop_pool(x, (16, 17), pad=(0, 1, 0, 0)))
    dzdy = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_array_equal(
        vl_nnpool(x, [16, 17], dzdy, pad=[0, 1, 0, 0]), loop_pool(x, (16, 17), dzdy, pad=(0, 1, 0, 0))
    )


X = np.zeros((4, 4, 2, 1), np.float32)


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((X, 2), dict(pad=2), "pad"),
        ((X, [3, 2]), dict(pad=[0, 0, 2, 0]), "pad"),
        ((X, 5), {}, "pool"),
        ((X, [2, 6]), dict(pad=[0, 0, 1, 0]), "pool"),
        ((X, 2), dict(method="median"), "method"),
        ((X, 2), dict(method=None), "method"),
        ((X, 0), {}, "pool"),
        ((X, [2, 2, 2]), {}, "pool"),
        ((X, 1.5), {}, "pool"),
        ((X, 2), dict(stride=0), "stride"),
        ((X, 2), dict(stride=[1, 2, 3]), "stride"),
        ((X, 2), dict(pad=-1), "pad"),
        ((X, 2), dict(pad=[1, 1]), "pad"),
        ((X, 2, np.zeros((4, 4, 2, 1), np.float32)), {}, "dzdy"),
        ((X.astype(np.int32), 2), {}, "x"),
        ((np.zeros((2, 2, 1, 1, 2), np.float32), 2), {}, "x"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, name):
    with pytest.raises(McnError, match=rf"Received .*\b{name}\b"):
        vl_nnpool(*args, **kwargs)
