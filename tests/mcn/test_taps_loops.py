"""The compiled tap products (harness.mcn.kernels.taps_loops): the generated module is the
one its generator writes, each loop computes its definition (every tile, the tails, the
spans), and the convolution paths that take them agree with the plain definition and
are taken where they should be (float32, filter counts in tiles of 32) and only there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.mcn.kernels.conv_rows as conv_rows
from harness.mcn.kernels import jit, taps_codegen, taps_loops

from .test_kernels_paths import Case, _check_conv, _close, _spy, conv_cases, conv_definition, forced

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba is not installed")


def test_module_is_what_the_generator_writes():
    path = Path(taps_loops.__file__)
    assert path.read_text() == taps_codegen.source(), "run python -m harness.mcn.kernels.taps_codegen"
    assert (taps_loops.ROWS, taps_loops.CHANNELS, taps_loops.TILE, taps_loops.WIDE) == (
        taps_codegen.ROWS,
        taps_codegen.CHANNELS,
        taps_codegen.TILE,
        taps_codegen.WIDE,
    )


def _rows_and_taps(rng, taps, cin, rows):
    src = rng.standard_normal(rows * cin + 7).astype(np.float32)
    starts = rng.integers(0, rows // 3, size=taps) * cin  # overlapping runs of rows, as taps read
    return src, starts.astype(np.uint64)


@pytest.mark.parametrize(
    ("taps", "cin", "cout", "m", "span"),
    [
        (9, 32, 32, 64, 32),
        (9, 16, 64, 4 * 5 + 3, 16),  # tiles of 64 filters; a tail row
        (4, 24, 32, 3, 10),  # fewer rows than a tile; uneven spans
        (1, 1, 32, 1, 1),
        (9, 64, 96, 37, 24),  # three tiles of 32
        (9, 40, 128, 9, 16),  # two tiles of 64
    ],
)
def test_tap_sums_is_its_definition(taps, cin, cout, m, span):
    rng = np.random.default_rng(taps * 1000 + cin)
    rows = 3 * m + 40
    src, starts = _rows_and_taps(rng, taps, cin, rows)
    w = rng.standard_normal((taps, cin, cout)).astype(np.float32)
    o0 = 5
    out = np.full((o0 + m + 3, cout), 7.0, np.float32)
    taps_loops.tap_sums(src, starts, w.reshape(-1), out.reshape(-1), o0, m, cin, cout, span)
    want = np.zeros((m, cout))
    for t in range(taps):
        block = src[int(starts[t]) : int(starts[t]) + m * cin].reshape(m, cin).astype(np.float64)
        want += block @ w[t].astype(np.float64)
    scale = np.abs(want).max()
    assert np.abs(out[o0 : o0 + m] - want).max() <= 1e-5 * scale
    assert (out[:o0] == 7).all() and (out[o0 + m :] == 7).all(), "rows outside o0..o0+m-1 were written"


@pytest.mark.parametrize(
    ("taps", "cin", "cout", "m"),
    [
        (9, 32, 32, 600),
        (3, 8, 64, 5),
        (2, 16, 32, 256),
        (1, 8, 32, 1),
        (2, 4, 64, 300),
        (2, 16, 96, 7),
        (1, 8, 128, 3),
    ],
)
def test_tap_grads_adds_its_definition(taps, cin, cout, m):
    rng = np.random.default_rng(taps * 1000 + cin + m)
    rows = 3 * m + 40
    src, starts = _rows_and_taps(rng, taps, cin, rows)
    d0 = 4
    dy = rng.standard_normal((d0 + m + 2, cout)).astype(np.float32)
    before = rng.standard_normal((taps, cin, cout)).astype(np.float32)
    out = before.copy()
    taps_loops.tap_grads(src, starts, dy.reshape(-1), d0, m, out, cin, cout)
    want = before.astype(np.float64)
    for t in range(taps):
        block = src[int(starts[t]) : int(starts[t]) + m * cin].reshape(m, cin).astype(np.float64)
        want[t] += block.T @ dy[d0 : d0 + m].astype(np.float64)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


def test_arguments_that_would_leave_the_arrays_are_refused():
    """The loops run without bounds checks: their wrappers refuse what would take them out."""
    src, starts = np.zeros(100 * 8, np.float32), np.zeros(2, np.uint64)
    w, out = np.zeros(2 * 8 * 32, np.float32), np.zeros(10 * 32, np.float32)
    taps_loops.tap_sums(src, starts, w, out, 0, 10, 8, 32, 8)  # fits
    for args, what in [
        ((src, starts, w, out, 0, 11, 8, 32, 8), "out too small"),
        ((src, starts + np.uint64(8 * 95), w, out, 0, 10, 8, 32, 8), "src or w too small"),
        ((src, starts, w[:-1], out, 0, 10, 8, 32, 8), "src or w too small"),
        ((src, starts, w, out, 0, 10, 8, 48, 8), "multiple of 32"),
    ]:
        with pytest.raises(ValueError, match=what):
            taps_loops.tap_sums(*args)
    dy, grads = np.zeros(10 * 32, np.float32), np.zeros((2, 8, 32), np.float32)
    taps_loops.tap_grads(src, starts, dy, 0, 10, grads, 8, 32)  # fits
    for args, what in [
        ((src, starts, dy, 1, 10, grads, 8, 32), "src or dy too small"),
        ((src, starts, dy, 0, 10, grads[:1], 8, 32), "out is not"),
        ((src, starts, dy, 0, 10, np.zeros((2, 12, 32), np.float32), 12, 32), "not a multiple of the tile"),
    ]:
        with pytest.raises(ValueError, match=what):
            taps_loops.tap_grads(*args)


def test_running_sums_of_many_terms_stay_within_the_blas_error():
    """tap_grads sums a long run of rows in spans (a float32 running total of thousands of
    terms drifts): on 20,000 rows its error against float64 is no worse than twice the
    BLAS's."""
    rng = np.random.default_rng(5)
    m, cin, cout = 20000, 8, 32
    src = (rng.standard_normal(m * cin) + 1).astype(np.float32)
    dy = (rng.standard_normal((m, cout)) + 1).astype(np.float32)
    out = np.zeros((1, cin, cout), np.float32)
    taps_loops.tap_grads(src, np.zeros(1, np.uint64), dy.reshape(-1), 0, m, out, cin, cout)
    x = src.reshape(m, cin)
    want = x.astype(np.float64).T @ dy.astype(np.float64)
    blas = np.abs((x.T @ dy).astype(np.float64) - want).max()
    assert np.abs(out[0] - want).max() <= 2 * blas + 1e-6 * np.abs(want).max()


def _wide(case, cin: int, kg: int):
    """``case`` with ``cin`` channels and ``kg`` filters per group (the compiled loops' tiles)."""
    h, w, c, n = case.xshape
    fh, fw, fc, k = case.fshape
    groups = c // fc
    return dataclasses.replace(case, xshape=(h, w, groups * cin, n), fshape=(fh, fw, cin, groups * kg))


@pytest.mark.parametrize("path", ["rows-whole", "rows-by-row"])
@settings(deadline=None, max_examples=25)
@given(
    case=conv_cases(),
    cin=st.sampled_from([8, 16, 24]),
    kg=st.sampled_from([32, 64]),
    two_threads=st.booleans(),
    small_blocks=st.booleans(),
)
def test_conv_through_the_compiled_loops_matches_the_definition(
    path, case, cin, kg, two_threads, small_blocks
):
    """Forward and the three derivatives, float32, filters in tiles of 32 (strides, dilation,
    pads, groups as the path tests draw them), with the compiled loops taken."""
    case = _wide(case, cin, kg)
    with forced(path, two_threads=two_threads, small_blocks=small_blocks) as m:
        taken = _spy(m, taps_loops, ("tap_sums", "tap_grads"))
        _check_conv(case, np.float32)
    direct = case.pad == (0, 0, 0, 0) and case.fshape[:2] == case.xshape[:2]  # conv_direct's case
    phased = case.stride != (1, 1) and case.dilate == (1, 1)
    if (case.stride[1] == 1 or phased) and not direct:  # the tap products apply
        assert "tap_sums" in taken
        # the filter derivative runs on whole blocks of rows: at row stride 1 when forced, or on phases
        if phased or (path == "rows-whole" and case.stride[0] == 1):
            assert "tap_grads" in taken


@pytest.mark.parametrize(
    ("xshape", "fshape", "pad", "stride", "dilate"),
    [
        ((7, 6, 32, 2), (3, 3, 32, 48), (1, 1, 1, 1), (1, 1), (1, 1)),  # the turned correlation
        ((8, 7, 32, 3), (3, 3, 32, 48), (1, 0, 1, 2), (2, 2), (1, 1)),  # phase by phase
        ((9, 9, 32, 1), (3, 2, 32, 48), (2, 2, 1, 1), (1, 1), (2, 2)),  # dilated
        ((6, 6, 64, 2), (3, 3, 32, 96), (1, 1, 1, 1), (1, 1), (1, 1)),  # two groups
    ],
)
def test_the_data_derivative_through_the_compiled_sums(xshape, fshape, pad, stride, dilate):
    """32 channels per group and 48 filters: only the data derivative's sums (the filters
    turned, 32 wide) can take the compiled loop, and they do, matching the definition."""
    case = Case(xshape, fshape, pad, stride, dilate, 11)
    with forced("rows-whole", two_threads=True, small_blocks=True) as m:
        taken = _spy(m, taps_loops, ("tap_sums", "tap_grads"))
        _check_conv(case, np.float32)
    assert set(taken) == {"tap_sums"}


@pytest.mark.parametrize("upsample", [(1, 1), (2, 2), (2, 1)])
def test_convt_through_the_compiled_sums(upsample):
    """vl_nnconvt's forward is a data derivative: with 32 output channels per group it runs
    on the compiled sums, and matches the definition."""
    from harness.mcn import vl_nnconvt

    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6, 48, 2)).astype(np.float32)
    f = rng.standard_normal((3, 3, 32, 48)).astype(np.float32)
    crop = (1, 0, 0, 1)
    with forced("rows-whole", two_threads=True, small_blocks=False) as m:
        taken = _spy(m, taps_loops, ("tap_sums",))
        y = vl_nnconvt(x, f, None, upsample=upsample, crop=crop)
    assert "tap_sums" in taken
    hy = (5 - 1) * upsample[0] - 1 + 3
    wy = (6 - 1) * upsample[1] - 1 + 3
    want, _, _ = conv_definition(np.zeros((hy, wy, 32, 2)), f, None, x, crop, upsample, (1, 1))
    _close(y, want, np.float32, "y")


def test_first_use_leaves_numbas_settings_as_they_were():
    """The SLP vectorizer is on only while a ``contract`` loop compiles."""
    import numba

    def double(a):  # noqa: ANN001, ANN202
        for i in range(a.shape[0]):
            a[i] = a[i] * 2
        return a

    before = numba.core.config.SLP_VECTORIZE
    loop = jit.Compiled(double, contract=True)
    np.testing.assert_array_equal(loop(np.arange(4.0, dtype=np.float32)), [0, 2, 4, 6])
    assert numba.core.config.SLP_VECTORIZE == before


def test_a_loop_numba_cannot_compile_leaves_the_blas(monkeypatch):
    """If numba fails to compile a tap loop, the convolution keeps the BLAS path (and its
    results), instead of raising from inside numba."""

    def broken(*args):  # noqa: ANN002, ANN202 - numba cannot type object()
        return object()

    for loops in (taps_loops._sums, taps_loops._grads):
        for tile in list(loops):
            monkeypatch.setitem(loops, tile, jit.Compiled(broken, contract=True))
    case = Case((8, 8, 16, 2), (3, 3, 16, 64), (1, 1, 1, 1), (1, 1), (1, 1), 3)
    with forced("rows-whole", two_threads=False, small_blocks=False) as m:
        taken = _spy(m, taps_loops, ("tap_sums", "tap_grads"))
        _check_conv(case, np.float32)
    assert taken == []
    assert not taps_loops.usable(False, 16, 64)


def test_compiled_loops_are_taken_only_where_they_apply(monkeypatch):
    """float32 and 32 filters: both loops; float64 or 48 filters: the BLAS; 256 filters
    (wider than TAP_SUMS_MAX_FILTERS) or deeper than TAP_SUMS_MAX_DEPTH: the filter
    derivative's loop only (the results checked against the definition each time)."""
    case = Case((8, 8, 16, 2), (3, 3, 16, 32), (1, 1, 1, 1), (1, 1), (1, 1), 3)
    for dtype, fshape, expect in [
        (np.float32, (3, 3, 16, 32), {"tap_sums", "tap_grads"}),
        (np.float64, (3, 3, 16, 32), set()),
        (np.float32, (3, 3, 16, 48), set()),
        (np.float32, (3, 3, 16, 64), {"tap_sums", "tap_grads"}),
        (np.float32, (3, 3, 16, 256), {"tap_grads"}),
    ]:
        with forced("rows-whole", two_threads=False, small_blocks=False) as m:
            taken = _spy(m, taps_loops, ("tap_sums", "tap_grads"))
            _check_conv(dataclasses.replace(case, fshape=fshape), dtype)
        assert set(taken) == expect, (dtype, fshape)
    with forced("rows-whole", two_threads=False, small_blocks=False) as m:
        m.setattr(conv_rows, "TAP_SUMS_MAX_DEPTH", 9 * 16 - 1)
        taken = _spy(m, taps_loops, ("tap_sums", "tap_grads"))
        _check_conv(case, np.float32)
    assert set(taken) == {"tap_grads"}
