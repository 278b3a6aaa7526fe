"""vl_nnconv and vl_nnconvt: semantics against loop transliterations, gradients, bad input.

Forward results are compared with direct loops over output pixels and filter taps that
spell out MatConvNet's definitions (cross-correlation, zero padding, implicit groups,
dilation; for convt, the scatter of each input pixel through the filter). Gradients are
checked in float64 by central differences of ``sum(y * dzdy)`` on a random subset of
coordinates (both ops are linear in each argument, so differences are exact up to
rounding). Options are valid by construction: groups and per-group sizes are drawn first
and the channels built from them; input sizes are drawn at least as large as the dilated
filter minus the padding; crops below the filter size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.mcn.kernels.conv_gemm as conv_gemm
from harness.mcn import McnError, vl_nnconv, vl_nnconvt

from ..gradcheck import central_difference

MAX_COORDS = 24


def grad_check(op, x, f, b, opts: dict, dzdy, grads, seed: int) -> None:
    """Central differences of the scalar ``sum(op(x, f, b, **opts) * dzdy)`` against ``grads``
    (op's dzdx, dzdf, dzdb) at up to MAX_COORDS elements of each of x, f and b that holds
    values (f and b may be None or empty)."""
    __tracebackhide__ = True
    rng = np.random.default_rng(seed)

    def fun() -> float:
        return float(np.sum(op(x, f, b, **opts) * dzdy))

    for name, a, analytic in zip("xfb", (x, f, b), grads, strict=True):
        if a is None or a.size == 0:
            continue
        flat = a.reshape(-1)
        coords = rng.choice(flat.size, size=min(flat.size, MAX_COORDS), replace=False)
        numeric = np.array([central_difference(fun, flat, i) for i in coords])
        got = np.asarray(analytic).reshape(-1)[coords]
        np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-7, err_msg=f"d/d{name}")


def loop_conv(x, f, b, pad, stride, dilate):
    """vl_nnconv's definition, one output pixel and filter at a time."""
    (pt, pb, pl, pr), (sy, sx), (dy, dx) = pad, stride, dilate
    h, w, c, n = x.shape
    if f is None:  # no filters: the identity filter bank
        f, dy, dx = np.eye(c, dtype=x.dtype).reshape(1, 1, c, c), 1, 1
    fh, fw, fc, k = f.shape
    kg = k // (c // fc)
    xp = np.pad(x, ((pt, pb), (pl, pr), (0, 0), (0, 0)))
    ho, wo = (h + pt + pb - (fh - 1) * dy - 1) // sy + 1, (w + pl + pr - (fw - 1) * dx - 1) // sx + 1
    y = np.zeros((ho, wo, k, n), x.dtype)
    for oy in range(ho):
        for ox in range(wo):
            for q in range(k):
                g = q // kg
                patch = xp[
                    oy * sy : oy * sy + (fh - 1) * dy + 1 : dy, ox * sx : ox * sx + (fw - 1) * dx + 1 : dx
                ]
                y[oy, ox, q] = np.einsum("ijcn,ijc->n", patch[:, :, g * fc : (g + 1) * fc], f[:, :, :, q])
    if b is not None:
        y += np.reshape(b, (-1, 1))
    return y


def loop_convt(x, f, b, upsample, crop, num_groups):
    """vl_nnconvt's definition: every input pixel scatters its filter into the output."""
    (uy, ux), (ct, cb, cl, cr), groups = upsample, crop, num_groups
    h, w, d, n = x.shape
    fh, fw, k, _ = f.shape
    dg = d // groups
    full = np.zeros(((h - 1) * uy + fh, (w - 1) * ux + fw, k * groups, n), x.dtype)
    for oy in range(h):
        for ox in range(w):
            for g in range(groups):
                xs = x[oy, ox, g * dg : (g + 1) * dg]  # dg x n
                full[oy * uy : oy * uy + fh, ox * ux : ox * ux + fw, g * k : (g + 1) * k] += np.einsum(
                    "ijkd,dn->ijkn", f[:, :, :, g * dg : (g + 1) * dg], xs
                )
    y = full[ct : full.shape[0] - cb, cl : full.shape[1] - cr]
    if b is not None:
        y = y + np.reshape(b, (-1, 1))
    return y


BIAS_FORMS = ("row", "column", "vector", "none")


def make_bias(rng, k: int, form: str):
    b = rng.standard_normal(k)
    return {"row": b.reshape(1, k), "column": b.reshape(k, 1), "vector": b, "none": None}[form]


@dataclass(frozen=True)
class Case:
    """A drawn case: x and f shapes, the op's options (the loop's arguments too), the number
    of biases and their form, and the seed of the arrays."""

    xshape: tuple[int, ...]
    fshape: tuple[int, ...]
    opts: dict
    biases: int
    form: str
    seed: int

    def arrays(self, form: str | None = None):
        """The generator seeded by the case, and x, f and b drawn from it (b in ``form``,
        when given, else in the case's form)."""
        rng = np.random.default_rng(self.seed)
        x, f = rng.standard_normal(self.xshape), rng.standard_normal(self.fshape)
        return rng, x, f, make_bias(rng, self.biases, form or self.form)


def drawn_case(draw, xshape, fshape, opts: dict, biases: int) -> Case:
    """The Case of drawn shapes and options; its bias form and seed are drawn last."""
    form = draw(st.sampled_from(BIAS_FORMS))
    return Case(xshape, fshape, opts, biases, form, seed=draw(st.integers(0, 2**32 - 1)))


@st.composite
def conv_cases(draw, max_size: int = 7, row_gemm: bool = False) -> Case:
    """A Case with options pad [T B L R], stride, dilate: valid by construction.

    Groups G, per-group depth FC and filters per group KG are drawn first (C = G*FC,
    K = G*KG); H and W are at least the dilated filter extent minus the padding.
    Shrinks toward one group, 1x1 filters, no padding, stride and dilation 1. With
    ``row_gemm`` only cases the row-GEMM path takes: one group, column stride 1.
    """
    groups = 1 if row_gemm else draw(st.integers(1, 3))
    fc, kg = draw(st.integers(1, 2 + row_gemm)), draw(st.integers(1, 2 + row_gemm))
    fh, fw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilate = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), 1 if row_gemm else draw(st.integers(1, 3)))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    ext_h, ext_w = (fh - 1) * dilate[0] + 1, (fw - 1) * dilate[1] + 1
    h = draw(st.integers(max(1, ext_h - pad[0] - pad[1]), max_size))
    w = draw(st.integers(max(1, ext_w - pad[2] - pad[3]), max_size))
    n = draw(st.integers(1, 2))
    opts = dict(pad=pad, stride=stride, dilate=dilate)
    return drawn_case(draw, (h, w, groups * fc, n), (fh, fw, fc, groups * kg), opts, groups * kg)


@settings(deadline=None)
@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    c=st.integers(1, 3),
    pad=st.tuples(*[st.integers(0, 2)] * 4),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    with_bias=st.booleans(),
    empty=st.sampled_from(["none", "matlab"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_conv_empty_filters_subsamples_and_gradients(h, w, c, pad, stride, with_bias, empty, seed):
    """f = [] is MatConvNet's Subsample: zero-pad, keep every stride-th pixel, add the bias."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((h, w, c, 2))
    b = rng.standard_normal((1, c)) if with_bias else np.zeros((0, 0))
    f = None if empty == "none" else np.zeros((0, 0))
    y = vl_nnconv(x, f, b, pad=pad, stride=stride)
    np.testing.assert_array_equal(y, loop_conv(x, None, b if with_bias else None, pad, stride, (1, 1)))

    dzdy = rng.standard_normal(y.shape)
    dzdx, dzdf, dzdb = vl_nnconv(x, f, b, dzdy, pad=pad, stride=stride)
    assert dzdf.shape == (0, 0) and dzdf.dtype == x.dtype
    assert dzdb.shape == ((1, c) if with_bias else (0, 0))
    grad_check(vl_nnconv, x, f, b, dict(pad=pad, stride=stride), dzdy, (dzdx, dzdf, dzdb), seed)


@st.composite
def convt_cases(draw, max_size: int = 5, row_gemm: bool = False) -> Case:
    """A Case with f of shape FH x FW x K x D and options upsample, crop [T B L R], num_groups.

    num_groups G and the per-group input depth are drawn first (D = G*DG); crops are
    drawn below the filter size per axis so the output is never empty. Shrinks toward one
    group, 1x1 filters, no upsampling or cropping.
    """
    groups = 1 if row_gemm else draw(st.integers(1, 3))
    dg, k = draw(st.integers(1, 2 + row_gemm)), draw(st.integers(1, 2 + row_gemm))
    fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    upsample = (draw(st.integers(1, 3)), 1 if row_gemm else draw(st.integers(1, 3)))
    ct = draw(st.integers(0, fh - 1))
    cb = draw(st.integers(0, fh - 1 - ct))
    cl = draw(st.integers(0, fw - 1))
    cr = draw(st.integers(0, fw - 1 - cl))
    h, w, n = draw(st.integers(1, max_size)), draw(st.integers(1, max_size)), draw(st.integers(1, 2))
    opts = dict(upsample=upsample, crop=(ct, cb, cl, cr), num_groups=groups)
    return drawn_case(draw, (h, w, groups * dg, n), (fh, fw, k, groups * dg), opts, k * groups)


@pytest.mark.parametrize(
    "op, loop, cases",
    [(vl_nnconv, loop_conv, conv_cases()), (vl_nnconvt, loop_convt, convt_cases())],
    ids=["conv", "convt"],
)
@settings(deadline=None)
@given(data=st.data())
def test_forward_matches_loops_and_gradients(op, loop, cases, data):
    case = data.draw(cases, label="case")
    rng, x, f, b = case.arrays()
    y = op(x, f, b, **case.opts)
    np.testing.assert_allclose(y, loop(x, f, b, **case.opts), rtol=1e-12, atol=1e-12)

    dzdy = rng.standard_normal(y.shape)
    dzdx, dzdf, dzdb = op(x, f, b, dzdy, **case.opts)
    assert dzdx.shape == x.shape and dzdf.shape == f.shape
    if b is None:
        assert dzdb.size == 0
    else:
        assert dzdb.shape == b.shape
    grad_check(op, x, f, b, case.opts, dzdy, (dzdx, dzdf, dzdb), case.seed)


@settings(deadline=None)
@given(case=convt_cases())
def test_convt_is_the_adjoint_of_conv(case):
    """vl_nnconvt.m: Y(:) = M' X(:) where U(:) = M V(:) is vl_nnconv(V, F, [], stride, pad)."""
    rng = np.random.default_rng(case.seed)
    x, f = rng.standard_normal(case.xshape), rng.standard_normal(case.fshape)
    y = vl_nnconvt(x, f, None, **case.opts)
    upsample, crop = case.opts["upsample"], case.opts["crop"]
    assert y.shape[:2] == (
        (x.shape[0] - 1) * upsample[0] - crop[0] - crop[1] + f.shape[0],
        (x.shape[1] - 1) * upsample[1] - crop[2] - crop[3] + f.shape[1],
    )
    v = rng.standard_normal(y.shape)
    u = vl_nnconv(v, f, None, stride=upsample, pad=crop)
    assert u.shape == x.shape
    np.testing.assert_allclose(np.sum(y * v), np.sum(x * u), rtol=1e-10)


@settings(deadline=None)
@given(case=conv_cases(), ones=st.booleans())
def test_conv_derivatives_are_consistent(case, ones):
    """Bilinearity: <dzdx, x> = <dzdf, f> = <dzdy, y - b>; with dzdy = 1, dzdb counts outputs."""
    rng, x, f, b = case.arrays("row" if case.form == "none" else case.form)
    y = vl_nnconv(x, f, b, **case.opts)
    dzdy = np.ones_like(y) if ones else rng.standard_normal(y.shape)
    dzdx, dzdf, dzdb = vl_nnconv(x, f, b, dzdy, **case.opts)
    linear = np.sum(dzdy * (y - np.reshape(b, (-1, 1))))
    np.testing.assert_allclose(np.sum(dzdx * x), linear, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.sum(dzdf * f), linear, rtol=1e-9, atol=1e-9)
    if ones:
        ho, wo, k, n = y.shape
        np.testing.assert_array_equal(np.ravel(dzdb), np.full(k, ho * wo * n))
        # Every filter of a group sees the same patches, so their derivatives coincide.
        groups = x.shape[2] // f.shape[2]
        per_group = dzdf.reshape(f.shape[:3] + (groups, f.shape[3] // groups))
        np.testing.assert_allclose(
            per_group, np.broadcast_to(per_group[..., :1], per_group.shape), rtol=1e-12, atol=1e-12
        )


@contextlib.contextmanager
def row_gemm_path(enabled: bool):
    """Force the row-GEMM path on wherever it applies (or off everywhere), whatever the sizes."""
    saved = conv_gemm.ROWS_MIN_DEPTH, conv_gemm.ROWS_MIN_PIXELS
    conv_gemm.ROWS_MIN_DEPTH = conv_gemm.ROWS_MIN_PIXELS = 1 if enabled else 2**62
    try:
        yield
    finally:
        conv_gemm.ROWS_MIN_DEPTH, conv_gemm.ROWS_MIN_PIXELS = saved


@pytest.mark.parametrize(
    "op, loop, cases",
    [(vl_nnconv, loop_conv, conv_cases(row_gemm=True)), (vl_nnconvt, loop_convt, convt_cases(row_gemm=True))],
    ids=["conv", "convt"],
)
@settings(deadline=None)
@given(data=st.data())
def test_row_gemm_matches_loops_gradients_and_columns(op, loop, cases, data):
    """The row-GEMM path (one BLAS product per output row and tap) against the definition,
    central differences, and the column-matrix path."""
    case = data.draw(cases, label="case")
    rng, x, f, b = case.arrays()
    opts = case.opts
    with row_gemm_path(True):
        y = op(x, f, b, **opts)
        dzdy = rng.standard_normal(y.shape)
        grads = op(x, f, b, dzdy, **opts)
        grad_check(op, x, f, b, opts, dzdy, grads, case.seed)
    np.testing.assert_allclose(y, loop(x, f, b, **opts), rtol=1e-12, atol=1e-12)
    with row_gemm_path(False):
        columns = op(x, f, b, dzdy, **opts)
    for got, want in zip(grads, columns, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_row_gemm_path_is_taken_for_wide_batches(monkeypatch):
    """With the default thresholds a deep layer on a wide batch takes the row-GEMM path, and in
    float32 agrees with the column-matrix path."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 9, 16, 600)).astype(np.float32)  # Wo*N = 7*600 pixels a row
    f = rng.standard_normal((2, 3, 16, 20)).astype(np.float32)
    b = rng.standard_normal((1, 20)).astype(np.float32)
    opts = dict(pad=(1, 0, 0, 1), stride=(2, 1))
    dzdy = rng.standard_normal(vl_nnconv(x, f, b, **opts).shape).astype(np.float32)
    taken = []
    for name in ("rows_forward", "rows_backward"):
        original = getattr(conv_gemm, name)
        monkeypatch.setattr(
            conv_gemm, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k)
        )
    rows = [vl_nnconv(x, f, b, **opts), *vl_nnconv(x, f, b, dzdy, **opts)]
    assert taken == ["rows_forward", "rows_backward"]
    with row_gemm_path(False):
        columns = [vl_nnconv(x, f, b, **opts), *vl_nnconv(x, f, b, dzdy, **opts)]
    for got, want in zip(rows, columns, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize(
    "op, xshape, fshape, opts",
    [
        (vl_nnconv, (7, 6, 4, 9), (3, 2, 4, 5), dict(pad=(1, 0, 2, 1), stride=(2, 1))),
        (vl_nnconv, (7, 6, 4, 9), (2, 3, 2, 4), dict(pad=(0, 1, 1, 0), stride=(1, 2), dilate=(1, 2))),
        (vl_nnconv, (6, 6, 6, 5), (3, 3, 2, 6), dict(dilate=2, pad=1)),
        (vl_nnconv, (5, 5, 8, 7), (1, 1, 4, 6), {}),  # pointwise, 2 groups
        (vl_nnconv, (4, 5, 3, 6), (4, 5, 3, 2), {}),  # fully connected
        (vl_nnconv, (3, 2, 6, 5), (3, 2, 2, 6), {}),  # fully connected, 3 groups
        (vl_nnconvt, (4, 5, 6, 3), (3, 4, 2, 6), dict(upsample=(2, 3), crop=(1, 0, 2, 1), num_groups=2)),
        (vl_nnconvt, (1, 1, 4, 3), (3, 2, 5, 4), {}),  # one pixel: the "fully connected" transpose
    ],
)
@pytest.mark.parametrize("row_gemm", [False, True])
def test_chunked_rows_match_one_chunk(monkeypatch, op, xshape, fshape, opts, row_gemm):
    """Splitting the output rows into chunks (of the column buffer, or of the row-GEMM outputs)
    changes nothing, in either precision."""
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        x, f = rng.standard_normal(xshape).astype(dtype), rng.standard_normal(fshape).astype(dtype)
        b = rng.standard_normal(op(x, f, None, **opts).shape[2]).astype(dtype)
        dzdy = rng.standard_normal(op(x, f, b, **opts).shape).astype(dtype)
        with row_gemm_path(row_gemm):
            whole = [op(x, f, b, **opts), *op(x, f, b, dzdy, **opts)]
            monkeypatch.setattr(conv_gemm, "CHUNK_BYTES", 1)
            chunked = [op(x, f, b, **opts), *op(x, f, b, dzdy, **opts)]
            monkeypatch.undo()
        for a, c in zip(whole, chunked, strict=True):
            assert a.dtype == dtype
            np.testing.assert_allclose(a, c, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_float32_stays_float32_and_matches_float64():
    rng = np.random.default_rng(1)
    x, f, b = (
        rng.standard_normal((9, 8, 6, 3)),
        rng.standard_normal((3, 3, 3, 4)),
        rng.standard_normal((1, 4)),
    )
    y64 = vl_nnconv(x, f, b, pad=1, stride=2)
    y32 = vl_nnconv(x.astype(np.float32), f.astype(np.float32), b.astype(np.float32), pad=1, stride=2)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
    t32 = vl_nnconvt(
        x.astype(np.float32), rng.standard_normal((2, 2, 5, 6)).astype(np.float32), None, upsample=2
    )
    assert t32.dtype == np.float32


def test_dropped_trailing_singletons_are_restored():
    """MATLAB stores H x W x C x 1 as 3-D and a 1x1 filter bank as 2-D: accept both, return 4-D."""
    rng = np.random.default_rng(2)
    x, f = rng.standard_normal((5, 4, 3)), rng.standard_normal((2, 2, 3))
    y = vl_nnconv(x, f, None)
    assert y.shape == (4, 3, 1, 1)
    np.testing.assert_allclose(y, vl_nnconv(x[..., None], f[..., None], None))
    dzdx, dzdf, _ = vl_nnconv(x, f, None, y[:, :, 0])
    assert dzdx.shape == (5, 4, 3, 1) and dzdf.shape == (2, 2, 3, 1)


# ----------------------------------------------------------------------------------------
#                                                                              bad input


X = np.zeros((5, 5, 4, 2))
F = np.zeros((3, 3, 2, 4))


@pytest.mark.parametrize(
    "args, opts, name",
    [
        ((X, np.zeros((3, 3, 3, 4)), None), {}, "f"),  # depth 3 does not divide 4 channels
        ((X, np.zeros((3, 3, 2, 3)), None), {}, "f"),  # 2 groups do not divide 3 filters
        ((np.zeros((5, 5, 4, 2, 1, 2)), F, None), {}, "x"),  # more than 4 dimensions
        ((X, np.zeros((3, 3, 2, 4, 2)), None), {}, "f"),
        ((X, np.zeros((6, 3, 2, 4)), None), {}, "f"),  # filter taller than the input
        ((X, F, None), dict(dilate=3), "f"),  # dilated extent 7 > 5
        ((X, F, np.zeros(3)), {}, "b"),  # bias length != K
        ((X, None, np.zeros(3)), {}, "b"),  # empty filters: bias length != C
        ((X, F, None, np.zeros((3, 3, 4, 1))), {}, "dzdy"),  # wrong output shape
        ((X, F, None, np.zeros((3, 3, 4, 2), np.float32)), {}, "dzdy"),
        ((X.astype(np.int32), F, None), {}, "x"),
        ((X.astype(np.float32), F, None), {}, "f"),  # float32 data, float64 filters
        ((X, F, np.zeros(4, np.float32)), {}, "b"),
        ((X, F, None), dict(pad=-1), "pad"),
        ((X, F, None), dict(pad=(1, 2)), "pad"),
        ((X, F, None), dict(stride=0), "stride"),
        ((X, F, None), dict(dilate=(1, 2, 3)), "dilate"),
        ((X, None, None), dict(dilate=2), "dilate"),
    ],
)
def test_conv_bad_input(args, opts, name):
    with pytest.raises(McnError, match=rf"Received {name}[.=]"):
        vl_nnconv(*args, **opts)


FT = np.zeros((3, 3, 2, 4))  # FH x FW x K x D, D = 4 = depth of X


@pytest.mark.parametrize(
    "args, opts, name",
    [
        ((X, FT, None), dict(num_groups=3), "num_groups"),  # 3 does not divide D = 4
        ((X, FT, None), dict(num_groups=0), "num_groups"),
        ((X, FT, None), dict(num_groups=(1, 2)), "num_groups"),
        ((X, np.zeros((3, 3, 2, 3)), None), {}, "f"),  # D != depth of x
        ((X, None, None), {}, "f"),
        ((X, FT, None), dict(crop=(3, 3, 0, 0), upsample=0), "upsample"),
        ((np.zeros((1, 1, 4, 2)), FT, None), dict(crop=(2, 1, 0, 0)), "crop"),  # empty output
        ((X, FT, np.zeros(3)), {}, "b"),  # K * num_groups = 2 biases expected
        ((X, FT, None, np.zeros((15, 15, 2, 2))), {}, "dzdy"),
        ((X.astype(np.float32), FT, None), {}, "f"),
        ((X.astype(np.int64), FT, None), {}, "x"),
    ],
)
def test_convt_bad_input(args, opts, name):
    with pytest.raises(McnError, match=rf"Received {name}[.=]"):
        vl_nnconvt(*args, **opts)
