"""The convolution paths (harness.mcn.kernels: conv_rows, conv_columns, conv_direct)
against the plain definitions.

Every path (tap products on the pixel-major layout: whole blocks of rows or row by row,
the data derivative as a turned correlation or gathered row by row; the column matrix;
the direct product) is forced in turn and compared, forward and all three derivatives,
with the definitions spelled out tap by tap below, on random shapes with strides,
dilation, asymmetric pads (also pads that crop the turned correlation), filter groups,
1x1 and non-square filters, in float32 and float64, on one thread and on two, with one
block or many. Also: the pixel-major copy, and the column matrix's data derivative
blocks that run side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import harness.mcn.kernels.conv_columns as conv_columns
import harness.mcn.kernels.conv_gemm as conv_gemm
import harness.mcn.kernels.conv_rows as conv_rows
import harness.mcn.kernels.threads as threads
from harness.mcn import vl_nnconv, vl_nnconvt

# ----------------------------------------------------------------------------------------
#                                                                   the plain definitions


def _patches(xp: np.ndarray, i: int, j: int, out_hw, stride, dilate) -> tuple[slice, slice]:
    """Rows and columns of the padded input that tap (i, j) reads for every output pixel."""
    (ho, wo), (sy, sx), (dy, dx) = out_hw, stride, dilate
    return slice(i * dy, i * dy + (ho - 1) * sy + 1, sy), slice(j * dx, j * dx + (wo - 1) * sx + 1, sx)


def conv_definition(x, f, b, dzdy, pad, stride, dilate):
    """vl_nnconv tap by tap, in float64: y = b + sum over taps and channels of the padded
    input at (oy*SY + i*DY, ox*SX + j*DX) times f[i, j]; with ``dzdy``, the derivatives
    dzdx (scatter of dzdy through each tap), dzdf (each tap's input against dzdy) and dzdb."""
    x, f = np.asarray(x, np.float64), np.asarray(f, np.float64)
    (pt, pb, pl, pr), (sy, sx), (dy, dx) = pad, stride, dilate
    h, w, c, n = x.shape
    fh, fw, fc, k = f.shape
    groups, kg = c // fc, k // (c // fc)
    xp = np.pad(x, ((pt, pb), (pl, pr), (0, 0), (0, 0)))
    ho = (h + pt + pb - (fh - 1) * dy - 1) // sy + 1
    wo = (w + pl + pr - (fw - 1) * dx - 1) // sx + 1
    y = np.zeros((ho, wo, k, n))
    dxp, df = np.zeros_like(xp), np.zeros_like(f)
    d = None if dzdy is None else np.asarray(dzdy, np.float64)
    for i in range(fh):
        for j in range(fw):
            ys, xs = _patches(xp, i, j, (ho, wo), (sy, sx), (dy, dx))
            for q in range(groups):
                cs, ks = slice(q * fc, (q + 1) * fc), slice(q * kg, (q + 1) * kg)
                patch = xp[ys, xs, cs]
                y[:, :, ks] += np.einsum("hwcn,ck->hwkn", patch, f[i, j, :, ks])
                if d is not None:
                    df[i, j, :, ks] = np.einsum("hwcn,hwkn->ck", patch, d[:, :, ks])
                    dxp[ys, xs, cs] += np.einsum("hwkn,ck->hwcn", d[:, :, ks], f[i, j, :, ks])
    if b is not None:
        y += np.reshape(b, (-1, 1))
    if d is None:
        return y
    return dxp[pt : pt + h, pl : pl + w], df, d.sum(axis=(0, 1, 3))


# ----------------------------------------------------------------------------------------
#                                                                       forcing the paths


PATHS = ("columns", "rows-whole", "rows-by-row", "direct")


@contextlib.contextmanager
def forced(path: str, *, two_threads: bool, small_blocks: bool):
    """Force ``path`` wherever it applies, on one thread or two, in one block or many (a
    fresh MonkeyPatch per hypothesis example; yields it)."""
    with pytest.MonkeyPatch.context() as m:
        rows = path.startswith("rows")
        m.setattr(conv_gemm, "ROWS_MIN_DEPTH", 1 if rows else 2**62)
        m.setattr(conv_gemm, "ROWS_MIN_PIXELS", 1 if rows else 2**62)
        # whole blocks of rows whatever the extra columns, or never
        m.setattr(conv_gemm, "FLAT_MAX_WASTE", 1.0 if path == "rows-whole" else -1.0)
        if small_blocks:
            m.setattr(conv_gemm, "CHUNK_BYTES", 1)
            m.setattr(conv_gemm, "PARTIAL_BYTES", 1)
        else:
            m.setattr(conv_gemm, "CHUNK_BYTES", 2**40)
        m.setattr(conv_gemm, "PARALLEL_MIN_MACS", 0)
        m.setattr(threads, "cpu_cores", lambda: 2 if two_threads else 1)
        yield m


def _spy(m: pytest.MonkeyPatch, module, names: tuple[str, ...]) -> list[str]:
    """The list to which each call of ``module.<name>`` (for ``names``) appends its name."""
    taken: list[str] = []
    for name in names:
        original = getattr(module, name)
        m.setattr(module, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k))
    return taken


@dataclass(frozen=True)
class Case:
    xshape: tuple[int, int, int, int]
    fshape: tuple[int, int, int, int]
    pad: tuple[int, int, int, int]
    stride: tuple[int, int]
    dilate: tuple[int, int]
    seed: int


@st.composite
def conv_cases(draw, direct: bool = False, unit_column_stride: bool = False) -> Case:
    """Valid by construction: groups and per-group sizes first, inputs at least as large as
    the dilated filter minus the padding; pads up to 3 (beyond a 1x1 filter's reach)."""
    groups = draw(st.integers(1, 3))
    fc, kg = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    n = draw(st.integers(1, 3))
    if direct:
        fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        return Case(
            (fh, fw, groups * fc, n),
            (fh, fw, fc, groups * kg),
            (0, 0, 0, 0),
            (1, 1),
            (1, 1),
            draw(st.integers(0, 2**32 - 1)),
        )
    fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilate = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), 1 if unit_column_stride else draw(st.integers(1, 3)))
    pad = tuple(draw(st.integers(0, 3)) for _ in range(4))
    ext_h, ext_w = (fh - 1) * dilate[0] + 1, (fw - 1) * dilate[1] + 1
    h = draw(st.integers(max(1, ext_h - pad[0] - pad[1]), 9))
    w = draw(st.integers(max(1, ext_w - pad[2] - pad[3]), 9))
    return Case(
        (h, w, groups * fc, n),
        (fh, fw, fc, groups * kg),
        pad,
        stride,
        dilate,
        draw(st.integers(0, 2**32 - 1)),
    )


def _arrays(case: Case, dtype):
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal(case.xshape).astype(dtype)
    f = rng.standard_normal(case.fshape).astype(dtype)
    b = rng.standard_normal((1, case.fshape[3])).astype(dtype)
    return rng, x, f, b


def _close(got, want, dtype, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    tol = 1e-12 if dtype == np.float64 else 2e-5
    err = float(np.abs(got - want).max(initial=0.0)) / scale
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


def _check_conv(case: Case, dtype) -> None:
    rng, x, f, b = _arrays(case, dtype)
    opts = dict(pad=case.pad, stride=case.stride, dilate=case.dilate)
    y = vl_nnconv(x, f, b, **opts)
    assert y.dtype == dtype
    _close(y, conv_definition(x, f, b, None, case.pad, case.stride, case.dilate), dtype, "y")
    dzdy = rng.standard_normal(y.shape).astype(dtype)
    got = vl_nnconv(x, f, b, dzdy, **opts)
    want = conv_definition(x, f, b, dzdy, case.pad, case.stride, case.dilate)
    for name, g_, w_ in zip(("dzdx", "dzdf", "dzdb"), got, want, strict=True):
        assert g_.dtype == dtype, name
        _close(np.reshape(g_, np.shape(w_)), w_, dtype, name)


# ----------------------------------------------------------------------------------------
#                                                                   every path, vl_nnconv


@pytest.mark.parametrize("path", ["columns", "rows-whole", "rows-by-row"])
@settings(deadline=None, max_examples=60)
@given(
    case=conv_cases(),
    dtype=st.sampled_from([np.float64, np.float32]),
    two_threads=st.booleans(),
    small_blocks=st.booleans(),
)
def test_conv_paths_match_the_definition(path, case, dtype, two_threads, small_blocks):
    """Each path, forced wherever it applies (the tap products need column stride 1; the
    column matrix takes the rest), forward and the three derivatives."""
    with forced(path, two_threads=two_threads, small_blocks=small_blocks):
        _check_conv(case, dtype)


@settings(deadline=None, max_examples=40)
@given(
    case=conv_cases(unit_column_stride=True),
    dtype=st.sampled_from([np.float64, np.float32]),
    whole=st.booleans(),
    small_blocks=st.booleans(),
)
def test_tap_products_are_taken_and_match(case, dtype, whole, small_blocks):
    """At column stride 1 the tap products run (spied), on two threads."""
    path = "rows-whole" if whole else "rows-by-row"
    with forced(path, two_threads=True, small_blocks=small_blocks) as m:
        taken = _spy(m, conv_gemm, ("rows_forward", "rows_backward"))
        _check_conv(case, dtype)
    if (case.xshape[:2], case.pad) != (case.fshape[:2], (0, 0, 0, 0)) or case.stride != (1, 1):
        assert "rows_forward" in taken and "rows_backward" in taken


@settings(deadline=None, max_examples=40)
@given(
    case=conv_cases(),
    dtype=st.sampled_from([np.float64, np.float32]),
    whole=st.booleans(),
    small_blocks=st.booleans(),
)
def test_strided_convolutions_run_on_the_input_phases(case, dtype, whole, small_blocks):
    """Strides without dilation (column strides above 1 too) take the tap products on the
    input's phases (spied: forward, data and filter derivatives), on two threads."""
    case = dataclasses.replace(case, dilate=(1, 1))
    assume(case.stride != (1, 1))
    path = "rows-whole" if whole else "rows-by-row"
    with forced(path, two_threads=True, small_blocks=small_blocks) as m:
        taken = _spy(m, conv_rows, ("_phase_grids", "_phased_data_grad"))
        _check_conv(case, dtype)
    if (case.xshape[:2], case.pad) != (case.fshape[:2], (0, 0, 0, 0)):
        # forward and dF read the phases, dX is gathered phase by phase
        assert taken.count("_phase_grids") == 2 and "_phased_data_grad" in taken


def _same_pattern(got, want, dtype, what: str) -> None:
    """Infinities and NaNs where the definition has them, the finite values close."""
    got, want = np.asarray(got, np.float64).reshape(np.shape(want)), np.asarray(want, np.float64)
    for kind in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(kind(got), kind(want), err_msg=f"{what}: {kind.__name__}")
    finite = np.isfinite(want)
    _close(np.where(finite, got, 0.0), np.where(finite, want, 0.0), dtype, what)


@pytest.mark.parametrize("path", ["columns", "rows-whole", "rows-by-row"])
@settings(deadline=None, max_examples=40)
@given(
    case=conv_cases(),
    dtype=st.sampled_from([np.float64, np.float32]),
    where=st.sampled_from(["x", "f", "dzdy"]),
    value=st.sampled_from([np.inf, -np.inf, np.nan]),
    at=st.integers(0, 2**32 - 1),
)
def test_non_finite_values_reach_what_the_definition_reaches(path, case, dtype, where, value, at):
    """An infinity or NaN in the input, the filters or the output derivative: every path
    gives infinities and NaNs exactly where the definition does (MatConvNet's products:
    padding zeros times the filters count, pixels beyond a tap's reach do not)."""
    rng, x, f, b = _arrays(case, dtype)
    opts = dict(pad=case.pad, stride=case.stride, dilate=case.dilate)
    dzdy = rng.standard_normal(vl_nnconv(x, f, b, **opts).shape).astype(dtype)
    target = {"x": x, "f": f, "dzdy": dzdy}[where]
    target.flat[at % target.size] = value
    with forced(path, two_threads=True, small_blocks=False):
        with np.errstate(invalid="ignore", over="ignore"):
            y = vl_nnconv(x, f, b, **opts)
            got = vl_nnconv(x, f, b, dzdy, **opts)
    with np.errstate(invalid="ignore", over="ignore"):
        want_y = conv_definition(x, f, b, None, case.pad, case.stride, case.dilate)
        want = conv_definition(x, f, b, dzdy, case.pad, case.stride, case.dilate)
    _same_pattern(y, want_y, dtype, "y")
    for name, g_, w_ in zip(("dzdx", "dzdf", "dzdb"), got, want, strict=True):
        _same_pattern(g_, w_, dtype, name)


@settings(deadline=None, max_examples=40)
@given(
    case=conv_cases(direct=True), dtype=st.sampled_from([np.float64, np.float32]), two_threads=st.booleans()
)
def test_direct_path_matches_the_definition(case, dtype, two_threads):
    """One window over the whole input: the input is the column matrix."""
    with forced("columns", two_threads=two_threads, small_blocks=False):
        _check_conv(case, dtype)


# ----------------------------------------------------------------------------------------
#                                                                    vl_nnconvt, all paths


@st.composite
def convt_cases(draw):
    groups = draw(st.integers(1, 3))
    dg, k = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    upsample = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    ct = draw(st.integers(0, fh - 1))
    cb = draw(st.integers(0, fh - 1 - ct))
    cl = draw(st.integers(0, fw - 1))
    cr = draw(st.integers(0, fw - 1 - cl))
    h, w, n = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    return (
        (h, w, groups * dg, n),
        (fh, fw, k, groups * dg),
        upsample,
        (ct, cb, cl, cr),
        groups,
        draw(st.integers(0, 2**32 - 1)),
    )


@pytest.mark.parametrize("path", ["columns", "rows-whole", "rows-by-row"])
@settings(deadline=None, max_examples=40)
@given(case=convt_cases(), dtype=st.sampled_from([np.float64, np.float32]), small_blocks=st.booleans())
def test_convt_paths_match_the_definition(path, case, dtype, small_blocks):
    """vl_nnconvt is the data derivative of the conv of stride ``upsample``, padding ``crop``
    and implicit groups; its derivatives are that conv's forward and filter derivative."""
    xshape, fshape, up, crop, groups, seed = case
    rng = np.random.default_rng(seed)
    x, f = rng.standard_normal(xshape).astype(dtype), rng.standard_normal(fshape).astype(dtype)
    (h, w, _, n), (fh, fw, k, _) = xshape, fshape
    hy, wy = (h - 1) * up[0] - crop[0] - crop[1] + fh, (w - 1) * up[1] - crop[2] - crop[3] + fw
    with forced(path, two_threads=True, small_blocks=small_blocks):
        y = vl_nnconvt(x, f, None, upsample=up, crop=crop, num_groups=groups)
        dzdy = rng.standard_normal(y.shape).astype(dtype)
        dzdx, dzdf, _ = vl_nnconvt(x, f, None, dzdy, upsample=up, crop=crop, num_groups=groups)
    # The conv that vl_nnconvt transposes: input (hy, wy, k*groups), output x.
    want_y, _, _ = conv_definition(np.zeros((hy, wy, k * groups, n)), f, None, x, crop, up, (1, 1))
    _close(y, want_y, dtype, "y")
    _close(dzdx, conv_definition(dzdy, f, None, None, crop, up, (1, 1)), dtype, "dzdx")
    _close(dzdf, conv_definition(dzdy, f, None, x, crop, up, (1, 1))[1], dtype, "dzdf")


# ----------------------------------------------------------------------------------------
#                                                          agreement and determinism checks


def test_real_net_shapes_agree_across_paths_and_threads():
    """A DnCNN-like layer (whole blocks, turned data derivative sharing its copy with the
    filter derivative), a small-image layer with a large filter (row by row, gathered
    data derivative) and a strided grouped one, float32: the tap products against the
    column matrix, and bit for bit the same on one thread and on two."""
    rng = np.random.default_rng(5)
    layers = [
        ((12, 12, 16, 4), (3, 3, 16, 8), dict(pad=1)),
        ((6, 6, 16, 8), (5, 5, 16, 8), {}),
        ((9, 8, 16, 3), (3, 2, 8, 6), dict(pad=(1, 0, 2, 1), stride=(2, 1), dilate=(1, 2))),
    ]
    for xshape, fshape, opts in layers:
        x = rng.standard_normal(xshape).astype(np.float32)
        f = rng.standard_normal(fshape).astype(np.float32)
        b = rng.standard_normal(fshape[3]).astype(np.float32)
        dzdy = rng.standard_normal(vl_nnconv(x, f, b, **opts).shape).astype(np.float32)
        runs = {}
        for path, two in (
            ("columns", False),
            ("rows-whole", False),
            ("rows-whole", True),
            ("rows-by-row", True),
        ):
            with forced(path, two_threads=two, small_blocks=False) as m:
                m.setattr(conv_gemm, "CHUNK_BYTES", 4096)  # several blocks and parts
                runs[path, two] = [vl_nnconv(x, f, b, **opts), *vl_nnconv(x, f, b, dzdy, **opts)]
        for a, c in zip(runs["rows-whole", False], runs["rows-whole", True], strict=True):
            np.testing.assert_array_equal(a, c)  # the threads change nothing
        for key in (("rows-whole", True), ("rows-by-row", True)):
            for a, c in zip(runs[key], runs["columns", False], strict=True):
                np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-5 * np.abs(c).max())


# ----------------------------------------------------------------------------------------
#                                                  the pixel-major copy, the column matrix


def test_to_grid_pads_crops_and_groups():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((4, 5, 6, 3))
    flat, hg, wg = conv_rows._to_grid(a, (2, -1, -2, 1), 2, 3, lambda s, d: np.full(s, np.nan, d))
    assert (hg, wg) == (5, 4)
    padded = np.pad(a[:3, 2:], ((2, 0), (0, 1), (0, 0), (0, 0)))  # top 2, crop bottom 1, crop left 2, right 1
    for q in range(2):
        grid = flat[q, : hg * wg * 3].reshape(hg, wg, 3, 3)
        np.testing.assert_array_equal(grid, padded[:, :, q * 3 : (q + 1) * 3].transpose(0, 1, 3, 2))
        np.testing.assert_array_equal(flat[q, hg * wg * 3 :], 0)


@pytest.mark.parametrize(
    "fshape, stride, dilate",
    [((3, 3, 4, 4), (1, 1), (1, 1)), ((5, 2, 4, 4), (2, 2), (2, 1)), ((11, 3, 4, 4), (4, 3), (1, 1))],
)
def test_data_derivative_blocks_that_run_together_write_disjoint_rows(monkeypatch, fshape, stride, dilate):
    """The column matrix's data derivative adds every block into the shared padded array:
    blocks whose tasks may run at the same time must write disjoint input rows."""
    current, record, phase = threading.local(), [], [0]
    original_run, original_add = threads.run_tasks, conv_columns._col2im_add

    def run_tasks(fn, tasks, workers=None):
        phase[0] += 1

        def labelled(t, w, p=phase[0]):
            current.label = (p, t)
            fn(t, w)

        original_run(labelled, tasks, workers)

    def col2im_add(dcols, g, rows, cs, dxp):
        record.append((current.label, rows, cs.start, g))
        original_add(dcols, g, rows, cs, dxp)

    monkeypatch.setattr(threads, "run_tasks", run_tasks)
    monkeypatch.setattr(conv_columns, "_col2im_add", col2im_add)
    monkeypatch.setattr(conv_gemm, "ROWS_MIN_DEPTH", 2**62)
    monkeypatch.setattr(conv_gemm, "CHUNK_BYTES", 1)  # one output row per block
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 9, 8, 2))
    f = rng.standard_normal(fshape)
    y = vl_nnconv(x, f, None, stride=stride, dilate=dilate)
    vl_nnconv(x, f, None, np.ones_like(y), stride=stride, dilate=dilate)
    assert record
    for a_label, a_rows, a_c, g in record:
        for b_label, b_rows, b_c, _ in record:
            if a_label[0] != b_label[0] or a_label[1] == b_label[1] or a_c != b_c:
                continue  # another phase, the same task (in order), or other channels
            reach = g.extent[0]
            a_span = range(a_rows.start * g.stride[0], (a_rows.stop - 1) * g.stride[0] + reach)
            b_span = range(b_rows.start * g.stride[0], (b_rows.stop - 1) * g.stride[0] + reach)
            assert not set(a_span) & set(b_span), (a_rows, b_rows)


@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_copies_on_another_core_are_waited_for_when_the_caller_fails(monkeypatch, stride):
    """The input's grid is copied on another core while this one works: if this one fails
    first, the copy still ends before its workspace buffer is given back (another call
    could take the buffer while the copy writes into it)."""
    events: list[str] = []
    background = threads.background

    def tracked_background(fn, *args):
        result = background(fn, *args)

        def tracked():
            value = result()
            events.append("copy done")
            return value

        return tracked

    give = conv_gemm._WORKSPACE.give
    monkeypatch.setattr(threads, "cpu_cores", lambda: 2)
    monkeypatch.setattr(threads, "background", tracked_background)
    monkeypatch.setattr(conv_gemm._WORKSPACE, "give", lambda buf: events.append("given back") or give(buf))

    def planted(*_args, **_kwargs):
        raise MemoryError("planted")

    monkeypatch.setattr(conv_rows, "_phased_data_grad" if stride != (1, 1) else "_taps_pass", planted)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 32, 32, 16)).astype(np.float32)  # above GRID_BESIDE_MIN
    f = rng.standard_normal((3, 3, 32, 8)).astype(np.float32)
    ho = (32 + 2 - 3) // stride[0] + 1
    g = conv_gemm.ConvGeometry(3, 3, 32, 8, (1, 1, 1, 1), stride, (1, 1), 1, ho, ho)
    dy = rng.standard_normal((ho, ho, 8, 16)).astype(np.float32)
    with pytest.raises(MemoryError, match="planted"):
        conv_gemm.conv_backward(x, dy, f, g, (32, 32), data=True)
    assert "copy done" in events and "given back" in events
    assert events.index("copy done") < events.index("given back")
