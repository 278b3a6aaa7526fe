"""The convolution kernels' machinery (harness.mcn.kernels): which path the default
thresholds take, the BLAS binding on strided operands and without it, the task runner,
the BLAS thread setting, the workspace, the malloc setting and the bias sums. The paths
themselves are checked against the definitions in test_kernels_paths.py.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.mcn.kernels.blas as blas
import harness.mcn.kernels.conv_gemm as conv_gemm
import harness.mcn.kernels.threads as threads
from harness.mcn import vl_nnconv

# ----------------------------------------------------------------------------------------
#                                                                 the path the sizes take


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
            mp.setattr(blas, "_CBLAS", NO_BINDING)
        got = blas.gemm(a, b, out=out, accumulate=accumulate)
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
    monkeypatch.setattr(blas, "_CBLAS", NO_BINDING)
    monkeypatch.setattr(conv_gemm, "PARALLEL_MIN_MACS", 0)
    assert conv_gemm.workers(10**12, True) == 1
    without = [
        vl_nnconv(x, f, None, pad=1),
        *vl_nnconv(x, f, None, np.ones((10, 10, 8, 4), np.float32), pad=1),
    ]
    for a, c in zip(with_binding[:3], without[:3], strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(c).max())


def test_the_binding_is_found_here():
    """This environment's BLAS (numpy's or scipy's OpenBLAS) is bound: the layers run on
    every core."""
    assert blas.cblas().available


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


def test_split_rows_covers_every_row_once_and_shares_large_arrays(monkeypatch):
    monkeypatch.setattr(threads, "cpu_cores", lambda: 2)
    for rows, size, parts in ((7, threads.PARALLEL_MIN_ELEMENTWISE, 2), (7, 10, 1), (1, 2**30, 1)):
        seen: list[slice] = []
        threads.split_rows(seen.append, rows, size)  # list.append is atomic under the GIL
        assert len(seen) == parts
        assert sorted(i for part in seen for i in range(rows)[part]) == list(range(rows))


def test_background_gives_its_result_or_its_error_and_never_waits_on_a_busy_pool():
    assert threads.background(sum, [1, 2, 3])() == 6
    failing = threads.background(int, "not a number")
    with pytest.raises(ValueError):
        failing()
    # Called from the pool's own threads (all busy running these tasks), the work runs on
    # the caller when asked for instead of waiting for a thread that never comes.
    results = []

    def task(t: int, worker: int) -> None:
        get = threads.background(lambda v: v * 10, t)
        results.append(get())

    threads.run_tasks(task, 6, 2)
    assert sorted(results) == [0, 10, 20, 30, 40, 50]


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
    ws = conv_gemm.Workspace()
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


def test_keep_freed_memory_in_a_fresh_process():
    """The opt-in malloc setting takes effect under glibc (in a child process: it is
    process-wide) and the reference runs as before."""
    code = (
        "import numpy as np\n"
        "from harness.mcn.kernels import threads\n"
        "from harness.mcn import vl_nnconv\n"
        "ok = threads.keep_freed_memory()\n"
        "x = np.ones((8, 8, 16, 2)); f = np.ones((3, 3, 16, 4))\n"
        "for _ in range(3):\n"
        "    y = vl_nnconv(x, f, None, pad=1)\n"
        "assert float(y[4, 4, 0, 0]) == 9 * 16\n"
        "print(ok)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert out.stdout.strip() == "True"


@pytest.mark.parametrize("n", [1, 8, 31, 32, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_sums_match_the_definition(n, dtype):
    """Both orders of bias_sums give the sum over pixels and images (float64) within
    rounding of the float64 sum, and exact counts for ones."""
    rng = np.random.default_rng(n)
    dy = rng.standard_normal((5, 7, 6, n)).astype(dtype)
    want = dy.astype(np.float64).sum(axis=(0, 1, 3))
    got = conv_gemm.bias_sums(dy)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-5)
    np.testing.assert_array_equal(conv_gemm.bias_sums(np.ones((5, 7, 6, n), dtype)), np.full(6, 35.0 * n))
