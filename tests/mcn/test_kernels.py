"""The convolution fast paths (harness.mcn.kernels) against the plain definitions.

Every path of ``conv_gemm`` (tap products on the pixel-major layout: whole blocks of rows
or row by row, the data derivative as a turned correlation or gathered row by row; the
column matrix; the direct product) is forced in turn and compared, forward and all three
derivatives, with the definitions spelled out tap by tap below, on random shapes with
strides, dilation, asymmetric pads (also pads that crop the turned correlation), filter
groups, 1x1 and non-square filters, in float32 and float64, on one thread and on two,
with one block or many. Also: the BLAS binding on strided operands and without it, the
task runner, the BLAS thread setting and the workspace.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.mcn.kernels.conv_gemm as conv_gemm
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
    taken = []
    path = "rows-whole" if whole else "rows-by-row"
    with forced(path, two_threads=True, small_blocks=small_blocks) as m:
        for name in ("rows_forward", "rows_backward"):
            original = getattr(conv_gemm, name)
            m.setattr(conv_gemm, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k))
        _check_conv(case, dtype)
    if (case.xshape[:2], case.pad) != (case.fshape[:2], (0, 0, 0, 0)) or case.stride != (1, 1):
        assert "rows_forward" in taken and "rows_backward" in taken


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


def test_default_thresholds_take_the_tap_products_on_a_dncnn_layer(monkeypatch):
    taken = []
    for name in ("rows_forward", "rows_backward", "columns_forward", "columns_backward"):
        original = getattr(conv_gemm, name)
        monkeypatch.setattr(
            conv_gemm, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k)
        )
    x = np.ones((16, 16, 64, 2), np.float32)
    f = np.ones((3, 3, 64, 8), np.float32)
    y = vl_nnconv(x, f, None, pad=1)
    vl_nnconv(x, f, None, y, pad=1)
    vl_nnconv(np.ones((16, 16, 1, 2), np.float32), np.ones((3, 3, 1, 8), np.float32), None, pad=1)
    assert taken == ["rows_forward", "rows_backward", "columns_forward"]


# ----------------------------------------------------------------------------------------
#                                                                              the BLAS call


def _operand(rng, shape, layout, dtype):
    """A ``shape`` matrix stored C-ordered, F-ordered, as a slice of a wider array, or with
    a step that no BLAS takes."""
    r, c = shape
    if layout == "c":
        return rng.standard_normal(shape).astype(dtype)
    if layout == "f":
        return np.asfortranarray(rng.standard_normal(shape).astype(dtype))
    if layout == "slice":
        return rng.standard_normal((r + 1, c + 3)).astype(dtype)[1:, 2 : 2 + c]
    return rng.standard_normal((r, 2 * c)).astype(dtype)[:, ::2]


NO_BINDING = type("NoBinding", (), {"available": False})()


@pytest.mark.parametrize("blas_binding", [True, False])
@settings(deadline=None, max_examples=60)
@given(
    m=st.integers(1, 6),
    k=st.integers(0, 6),
    n=st.integers(1, 6),
    layouts=st.tuples(*[st.sampled_from(["c", "f", "slice", "step"])] * 3),
    accumulate=st.booleans(),
    dtype=st.sampled_from([np.float64, np.float32]),
    seed=st.integers(0, 2**32 - 1),
)
def test_gemm_on_any_layout(blas_binding, m, k, n, layouts, accumulate, dtype, seed):
    """gemm through the ctypes binding (strided operands passed as they are) and through
    scipy's wrappers, on C-, F-ordered, sliced and stepped operands, 1-row and 1-column
    matrices, an empty inner dimension."""
    rng = np.random.default_rng(seed)
    a, b = _operand(rng, (m, k), layouts[0], dtype), _operand(rng, (k, n), layouts[1], dtype)
    out = _operand(rng, (m, n), layouts[2], dtype)
    before = out.astype(np.float64)
    with pytest.MonkeyPatch.context() as mp:
        if not blas_binding:
            mp.setattr(conv_gemm, "_CBLAS", NO_BINDING)
        got = conv_gemm.gemm(a, b, out=out, accumulate=accumulate)
    assert got is out
    want = a.astype(np.float64) @ b.astype(np.float64) + (before if accumulate else 0)
    np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_without_the_binding_the_layers_run_on_one_thread(monkeypatch):
    """scipy's wrappers keep the GIL: without the ctypes binding the work stays on the
    calling thread, and the results are those of the binding."""
    rng = np.random.default_rng(7)
    x, f = (
        rng.standard_normal((10, 10, 16, 4)).astype(np.float32),
        rng.standard_normal((3, 3, 16, 8)).astype(np.float32),
    )
    with_binding = [
        vl_nnconv(x, f, None, pad=1),
        *vl_nnconv(x, f, None, np.ones((10, 10, 8, 4), np.float32), pad=1),
    ]
    monkeypatch.setattr(conv_gemm, "_CBLAS", NO_BINDING)
    monkeypatch.setattr(conv_gemm, "PARALLEL_MIN_MACS", 0)
    assert conv_gemm._workers(10**12, True) == 1
    without = [
        vl_nnconv(x, f, None, pad=1),
        *vl_nnconv(x, f, None, np.ones((10, 10, 8, 4), np.float32), pad=1),
    ]
    for a, c in zip(with_binding[:3], without[:3], strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(c).max())


def test_the_binding_is_found_here():
    """This environment's BLAS (numpy's or scipy's OpenBLAS) is bound: the layers run on
    every core."""
    assert conv_gemm._cblas().available


# ----------------------------------------------------------------------------------------
#                                                         threads, BLAS setting, workspace


def test_run_tasks_runs_each_task_once_on_the_given_threads():
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def task(t: int, worker: int) -> None:
        with lock:
            seen.append((t, worker))

    threads.run_tasks(task, 50, 3)
    assert sorted(t for t, _ in seen) == list(range(50))
    assert {w for _, w in seen} <= {0, 1, 2}
    threads.run_tasks(task, 0, 2)  # nothing to do
    assert len(seen) == 50


def test_run_tasks_raises_the_first_error_and_skips_the_rest():
    ran = []

    def task(t: int, worker: int) -> None:
        ran.append(t)
        if t == 3:
            raise ValueError("task 3")

    with pytest.raises(ValueError, match="task 3"):
        threads.run_tasks(task, 1000, 2)
    assert len(ran) < 1000


def test_run_tasks_nested_in_a_pool_thread_completes():
    """A task that runs tasks itself (its helpers possibly busy) still finishes: the
    caller runs whatever no helper took."""
    done = []

    def outer(t: int, worker: int) -> None:
        threads.run_tasks(lambda i, w: done.append((t, i)), 5, 2)

    threads.run_tasks(outer, 4, 2)
    assert sorted(done) == [(t, i) for t in range(4) for i in range(5)]


def test_blas_single_threaded_nests_and_restores():
    libs = threads.blas_libraries()
    before = [lib.num_threads for lib in libs]
    with threads.blas_single_threaded() as single:
        assert single == bool(libs)
        assert all(lib.num_threads == 1 for lib in libs)
        with threads.blas_single_threaded():
            assert all(lib.num_threads == 1 for lib in libs)
        assert all(lib.num_threads == 1 for lib in libs)
    assert [lib.num_threads for lib in libs] == before


def test_workspace_reuses_buffers_within_its_cap(monkeypatch):
    ws = conv_gemm._Workspace()
    a, buf = ws.take((10, 10), np.float32)
    assert a.shape == (10, 10) and a.dtype == np.float32
    ws.give(buf)
    b, buf2 = ws.take((5, 4), np.float64)  # smaller: the same buffer again
    assert buf2 is buf and b.shape == (5, 4)
    ws.give(buf2)
    monkeypatch.setattr(conv_gemm, "WORKSPACE_BYTES", 1000)
    _, big = ws.take((1000,), np.float32)
    ws.give(big)
    assert sum(x.nbytes for x in ws._free) <= 1000


def test_outputs_never_share_the_workspace():
    """Results are fresh arrays: a later call (reusing the workspace) leaves them alone."""
    rng = np.random.default_rng(3)
    x, f = rng.standard_normal((8, 8, 16, 2)), rng.standard_normal((3, 3, 16, 4))
    dzdy = rng.standard_normal((8, 8, 4, 2))
    first = [vl_nnconv(x, f, None, pad=1), *vl_nnconv(x, f, None, dzdy, pad=1)[:2]]
    copies = [a.copy() for a in first]
    vl_nnconv(2 * x, f, None, 3 * dzdy, pad=1)
    for a, c in zip(first, copies, strict=True):
        np.testing.assert_array_equal(a, c)


def test_to_grid_pads_crops_and_groups():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((4, 5, 6, 3))
    flat, hg, wg = conv_gemm._to_grid(a, (2, -1, -2, 1), 2, 3, lambda s, d: np.full(s, np.nan, d))
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
    original_run, original_add = threads.run_tasks, conv_gemm._col2im_add

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
    monkeypatch.setattr(conv_gemm, "_col2im_add", col2im_add)
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
