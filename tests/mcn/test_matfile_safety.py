"""harness.mcn.matfile against hostile .mat files: depth bombs, size bombs, HDF5 links and
external storage, lone surrogates, faithful complex/sparse/object types, damaged bytes.

Every file is generated here, in tmp_path. v5 files are assembled byte by byte with the
small writer below (scipy.io.savemat cannot write most of these); v7.3 files with h5py.
The fuzzer loads mutated files in a worker process, so a crash of scipy or h5py (a
segfault) fails the test with the input that caused it instead of killing pytest.
"""

from __future__ import annotations

import os
import struct
import time
import zlib

import numpy as np
import pytest
import scipy.io
import scipy.sparse

from harness.mcn import McnError, load_net
from harness.mcn.matfile import MatlabObject, list_variables, read_variables

from .matfile_writers import (
    ONE,
    char,
    compressed,
    deep_cells_v5,
    double,
    el,
    matrix,
    one_line_mcn,
    relu,
    struct_,
    text,
    v5,
    v5_net,
)

# --------------------------------------------------------------------------- v5: structure


def test_v5_helpers_build_loadable_files(tmp_path):
    p = tmp_path / "ok.mat"
    p.write_bytes(v5(v5_net([relu("a"), relu("b")], struct_(b"", {b"x": double(b"", np.arange(3.0))}))))
    net = load_net(p)
    assert [l.name for l in net.layers] == ["a", "b"]
    np.testing.assert_array_equal(net.meta["x"], [[0.0, 1.0, 2.0]])


@pytest.mark.parametrize("pack", [lambda e: e, compressed], ids=["plain", "compressed"])
def test_v5_deep_nesting_is_refused_quickly(tmp_path, pack):
    p = tmp_path / "deep.mat"
    p.write_bytes(v5(pack(deep_cells_v5(20_000))))
    t = time.perf_counter()
    with pytest.raises(McnError, match="deeper than 32") as e:
        read_variables(p)
    assert time.perf_counter() - t < 2.0
    msg = one_line_mcn(e, p)
    assert "net{1}{1}{1}" in msg


def test_v5_nesting_at_the_limit_loads(tmp_path):
    p = tmp_path / "ok.mat"
    p.write_bytes(v5(deep_cells_v5(32)))
    v = read_variables(p)["net"]
    for _ in range(31):
        (v,) = v
    assert v == [1.0]


def test_v5_unused_variables_are_not_read(tmp_path, monkeypatch):
    """A 1 GiB declared double (uncompressed, as a sparse file) and a 2 GiB one whose
    zlib stream breaks off after 1 MiB: load_net neither reads nor charges them (and
    inflates no more of the compressed one than its header)."""
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "64M")
    n = 2**27
    head = el(6, struct.pack("<II", 6, 0)) + el(5, struct.pack("<2i", 1, n)) + el(1, b"junk")
    big = struct.pack("<II", 14, len(head) + 8 + 8 * n) + head + struct.pack("<II", 9, 8 * n)
    zhead = el(6, struct.pack("<II", 6, 0)) + el(5, struct.pack("<2i", 2**14, 2**14)) + el(1, b"bomb")
    zhead = struct.pack("<II", 14, len(zhead) + 8 + 2**31) + zhead + struct.pack("<II", 9, 2**31)
    z = zlib.compressobj()
    stream = z.compress(zhead + b"\x00" * 2**20)
    stream += z.flush(zlib.Z_SYNC_FLUSH) + b"\xff" * 64  # cut short: inflating it all fails
    bomb = struct.pack("<II", 15, len(stream)) + stream
    p = tmp_path / "big.mat"
    with open(p, "wb") as fh:
        fh.write(v5(bomb, big))
        fh.seek(8 * n, os.SEEK_CUR)  # a hole: the 1 GiB of data takes no disk
        fh.write(v5_net([relu()]))
    assert p.stat().st_size > 2**30
    t = time.perf_counter()
    net = load_net(p)
    assert [l.type for l in net.layers] == ["relu"]
    assert time.perf_counter() - t < 2.0
    assert list_variables(p) == ["bomb", "junk", "net"]
    with pytest.raises(McnError, match="memory budget") as e:
        read_variables(p)  # all of them: refused, never allocated
    assert "bomb" in one_line_mcn(e, p)


def test_v5_declared_sizes_over_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "1M")
    p = tmp_path / "big.mat"
    p.write_bytes(v5(v5_net([relu()], struct_(b"", {b"big": double(b"", np.zeros((400, 400)))}))))
    with pytest.raises(McnError, match="memory budget") as e:
        load_net(p)
    assert "net.meta.big" in one_line_mcn(e, p)
    # a cell declaring 10^10 elements is refused from its header, before any is read
    huge = matrix(1, (100_000, 100_000), b"")
    p.write_bytes(v5(v5_net([relu()], struct_(b"", {b"cells": huge}))))
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "4G")
    with pytest.raises(McnError, match="memory budget") as e:
        load_net(p)
    assert "net.meta.cells" in one_line_mcn(e, p)


@pytest.mark.parametrize(
    "element, message",
    [
        (matrix(6, (1, 1), b"x", el(11, b"\0" * 8)), "not numeric"),
        (matrix(4, (1, 2), b"x", el(99, b"ab")), "char data of type 99"),
        (matrix(6, (1, -1), b"x", el(9)), "negative"),
        (matrix(6, (1, 3), b"x", el(9, b"\0" * 8)), "expected 24"),
        (matrix(40, (1, 1), b"x"), "unknown MATLAB array class 40"),
        (matrix(2, (1, 1), b"x", el(5, struct.pack("<i", 0)), el(1)), "field name length 0"),
        (matrix(2, (1, 1), b"x", el(5, struct.pack("<i", 4)), el(1, b"abcd"), ONE), "not NUL-terminated"),
        (matrix(2, (1, 1), b"x", el(5, struct.pack("<i", 4)), el(1, b"\xff\xfe\0\0"), ONE), "not UTF-8"),
        (matrix(2, (1, 1), b"x", el(5, struct.pack("<i", 1)), el(1, b"\0" * 100_000)), "100000 fields"),
        (el(14, b"\x06\x00\x00\x00"), "too short"),
        (el(3, b"abcd"), "element type 3"),
        (matrix(1, (1, 2), b"x", double(b"", np.ones(1))), "overruns|truncated|declared"),
        (matrix(6, (1, 1), b"x", el(9, b"\0" * 8), b"\0" * 8), "unexpected bytes"),
    ],
    ids=[
        "numeric-type", "char-type", "negative-dim", "size-mismatch", "class", "namelength",
        "field-nul", "field-utf8", "many-fields", "short", "top-type", "missing-cell", "trailing",
    ],
)  # fmt: skip
def test_v5_malformed_elements(tmp_path, element, message):
    """Each would crash, hang or mislead scipy; the scan names the problem."""
    p = tmp_path / "bad.mat"
    p.write_bytes(v5(element))
    with pytest.raises(McnError, match=message) as e:
        read_variables(p)
    one_line_mcn(e, p)


def test_v5_truncated_and_garbage(tmp_path):
    first = compressed(v5_net([relu()]))
    good = v5(first, v5_net([relu("b")]))
    p = tmp_path / "t.mat"
    for cut in range(129, len(good), 5):
        if cut == 128 + len(first):
            continue  # a complete file holding the first net only
        p.write_bytes(good[:cut])
        with pytest.raises(McnError) as e:
            load_net(p)
        one_line_mcn(e, p)
    rng = np.random.RandomState(1)
    for _ in range(20):
        p.write_bytes(good[:128] + rng.bytes(int(rng.randint(8, 4000))))
        with pytest.raises(McnError):
            load_net(p)


def test_v5_strings_are_utf16_code_units(tmp_path):
    layers = [
        struct_(b"", {b"type": text(b"", "relu"), b"name": char(b"", [0x61, 0xD800, 0x62])}),
        struct_(b"", {b"type": text(b"", "relu"), b"name": char(b"", [0xD83D, 0xDE00])}),
        struct_(b"", {b"type": text(b"", "relu"), b"name": char(b"", [0xDC00, 0xD800])}),
        struct_(b"", {b"type": text(b"", "relu"), b"name": text(b"", "héllo wörld ✓")}),
    ]
    p = tmp_path / "s.mat"
    p.write_bytes(v5(v5_net(layers)))
    names = [l.name for l in load_net(p).layers]
    assert names == ["a\ufffdb", "\U0001f600", "\ufffd\ufffd", "héllo wörld ✓"]
    for n in names:
        n.encode("utf-8")


def test_v5_big_endian(tmp_path):
    """Files written on big-endian machines ('MI'): numbers and UTF-16 text."""
    o = ">"
    x = matrix(6, (2, 3), b"x", el(9, np.arange(6.0).astype(">f8").tobytes(), o), o=o)
    s = matrix(4, (1, 3), b"s", el(4, np.array([0x68, 0xD800, 0x69], ">u2").tobytes(), o), o=o)
    p = tmp_path / "be.mat"
    p.write_bytes(v5(x, compressed(s, o), o=o))
    v = read_variables(p)
    np.testing.assert_array_equal(v["x"], np.arange(6.0).reshape(3, 2).T)
    assert v["s"] == "h\ufffdi"


# --------------------------------------------------------------------------- faithful types


def test_v5_complex_sparse_and_function_handles_come_back_typed(tmp_path):
    w = np.ones((3, 3, 1, 2)) * (1 + 2j)
    sp = scipy.sparse.random(4, 3, density=0.5, format="csc", random_state=0)
    layer = {"type": "conv", "name": "c", "weights": np.array([[w, sp]], dtype=object)}
    p = tmp_path / "typed.mat"
    scipy.io.savemat(p, {"net": {"layers": np.array([[layer]], dtype=object), "meta": {"z": 1 + 1j}}})
    net = load_net(p)
    w0, w1 = net.layers[0].weights
    assert isinstance(w0, np.ndarray) and w0.dtype == np.complex128 and w0.shape == (3, 3, 1, 2)
    assert scipy.sparse.issparse(w1) and w1.shape == (4, 3)
    np.testing.assert_allclose(w1.toarray(), sp.toarray())
    assert isinstance(net.meta["z"], np.ndarray) and net.meta["z"].dtype.kind == "c"


def test_v5_function_handle_and_objects(tmp_path):
    """A function handle nested in a layer (as in MatConvNet's practical files, whose
    layers carry forward/backward handles) and an MCOS object at top level."""
    fh_inner = struct_(b"", {b"function_handle": struct_(b"", {b"function": text(b"", "f")})})
    fhandle = matrix(16, (1, 1), b"", fh_inner)
    layer = struct_(b"", {b"type": text(b"", "custom"), b"forward": fhandle})
    mcos = el(
        14,
        el(6, struct.pack("<II", 17, 0)) + el(1, b"gpu") + el(1, b"MCOS") + el(1, b"gpuArray")
        + matrix(13, (1, 6), b"", el(6, np.array([0xDD000000, 2, 1, 1, 1, 1], "<u4").tobytes())),
    )  # fmt: skip
    fields = (el(5, struct.pack("<i", 8)), el(1, b"a" + b"\0" * 7))
    old_style = matrix(3, (1, 1), b"obj", el(1, b"myclass"), *fields, double(b"", np.ones(1)))
    nested = el(
        14,
        el(6, struct.pack("<II", 17, 0)) + el(1) + el(1, b"MCOS") + el(1, b"string")
        + matrix(13, (1, 6), b"", el(6, np.array([0xDD000000, 2, 1, 1, 1, 2], "<u4").tobytes())),
    )  # fmt: skip
    p = tmp_path / "objects.mat"
    p.write_bytes(v5(v5_net([layer], struct_(b"", {b"s": nested})), mcos, compressed(old_style)))
    v = read_variables(p)
    assert v["net"]["meta"]["s"] == MatlabObject("string")
    assert v["gpu"] == MatlabObject("gpuArray")
    assert v["obj"] == MatlabObject("myclass")
    assert v["net"]["layers"][0]["forward"] == MatlabObject("function_handle")
    assert "gpuArray" in repr(v["gpu"])
    net = load_net(p)  # the custom layer stays; its handle is dropped with a note
    assert net.layers[0].type == "custom" and not net.layers[0].has("forward")
    assert net.notes == ["layer 1 'layer1': field 'forward' holds a MATLAB function_handle object; ignored"]
