"""harness.mcn.matfile against hostile .mat files: depth bombs, size bombs, HDF5 links and
external storage, lone surrogates, faithful complex/sparse/object types, damaged bytes.

Every file is generated here, in tmp_path. v5 files are assembled byte by byte with the
small writer below (scipy.io.savemat cannot write most of these); v7.3 files with h5py.
The fuzzer loads mutated files in a worker process, so a crash of scipy or h5py (a
segfault) fails the test with the input that caused it instead of killing pytest.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.mcn import McnError, Net, load_checkpoint, load_net, save_net
from harness.mcn.matfile import MatlabObject, _read_variables, list_variables, read_variables
from harness.mcn.net import Layer

REPO = Path(__file__).resolve().parents[1]
SECRET = b"TOP-SECRET-4f9c2a: the contents of another local file"

# --------------------------------------------------------------------------- v5 writer


def el(mdtype: int, data: bytes = b"", o: str = "<") -> bytes:
    """A full-format data element, padded to 8 bytes (``o``: the file's byte order)."""
    return struct.pack(o + "II", mdtype, len(data)) + data + b"\x00" * (-len(data) % 8)


def matrix(
    mclass: int, dims: tuple[int, ...], name: bytes, *parts: bytes, flags: int = 0, o: str = "<"
) -> bytes:
    """A miMATRIX element: array flags, dimensions, name, then the class's parts."""
    head = el(6, struct.pack(o + "II", flags | mclass, 0), o) + el(
        5, struct.pack(f"{o}{len(dims)}i", *dims), o
    )
    return el(14, head + el(1, name, o) + b"".join(parts), o)


def double(name: bytes, values: np.ndarray) -> bytes:
    a = np.asarray(values, dtype="<f8")
    dims = a.shape if a.ndim >= 2 else (1, a.size)
    return matrix(6, dims, name, el(9, a.ravel(order="F").tobytes()))


def char(name: bytes, units: list[int]) -> bytes:
    """A char array of UTF-16 code units (miUINT16, as MATLAB writes non-UTF-8 text)."""
    return matrix(4, (1, len(units)), name, el(4, np.array(units, "<u2").tobytes()))


def text(name: bytes, s: str) -> bytes:
    return char(name, list(np.frombuffer(s.encode("utf-16-le"), "<u2")))


def cell(name: bytes, *items: bytes) -> bytes:
    return matrix(1, (1, len(items)), name, *items)


def struct_(name: bytes, fields: dict[bytes, bytes], namelength: int = 32) -> bytes:
    names = b"".join(k.ljust(namelength, b"\x00") for k in fields)
    return matrix(2, (1, 1), name, el(5, struct.pack("<i", namelength)), el(1, names), *fields.values())


def v5(*elements: bytes, o: str = "<") -> bytes:
    header = b"MATLAB 5.0 MAT-file, written by test_mcn_matfile_safety".ljust(116, b" ")
    endian = b"IM" if o == "<" else b"MI"
    return header + b"\x00" * 8 + struct.pack(o + "H", 0x0100) + endian + b"".join(elements)


def compressed(element: bytes, o: str = "<") -> bytes:
    z = zlib.compress(element)
    return struct.pack(o + "II", 15, len(z)) + z


def v5_net(layers: list[bytes], meta: bytes | None = None) -> bytes:
    """A top-level ``net`` struct: layers (a cell of the given layer structs), meta."""
    fields = {b"layers": cell(b"", *layers)}
    if meta is not None:
        fields[b"meta"] = meta
    return struct_(b"net", fields)


ONE = double(b"", np.ones(1))


def relu(name: str = "r1") -> bytes:
    return struct_(b"", {b"type": text(b"", "relu"), b"name": text(b"", name)})


def deep_cells_v5(depth: int, name: bytes = b"net") -> bytes:
    """``depth`` 1x1 cells nested in one another around a double: built as one header per
    level (outermost first) and the innermost element, so it costs O(depth)."""
    inner = double(b"", np.ones((1, 1)))
    heads = []
    size = len(inner)  # bytes of the element nested in the next level
    for level in range(depth, 0, -1):
        head = el(6, struct.pack("<II", 1, 0)) + el(5, struct.pack("<2i", 1, 1))
        head += el(1, name if level == 1 else b"")
        heads.append((head, size))
        size = 8 + len(head) + size
    out = [struct.pack("<II", 14, len(h) + child) + h for h, child in reversed(heads)]
    return b"".join(out) + inner


# --------------------------------------------------------------------------- helpers


def tiny_net() -> Net:
    r = np.random.RandomState(0)
    layers = [
        Layer(
            "conv", "c1", [r.randn(3, 3, 1, 2).astype(np.float32), np.zeros((1, 2), np.float32)], stride=1.0
        ),
        Layer("relu", "r1", [], leak=0.0),
        Layer("softmaxloss", "loss", []),
    ]
    return Net(layers, {"inputSize": np.array([[5.0, 5.0, 1.0]]), "classes": ["a", "b"]})


def all_strings_utf8(value) -> bool:
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            all_strings_utf8(k)
            all_strings_utf8(v)
    elif isinstance(value, list):
        for v in value:
            all_strings_utf8(v)
    return True


def one_line_mcn(excinfo, path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def h5_add_field(group: h5py.Group, name: str | bytes) -> None:
    """Append ``name`` to a struct group's MATLAB_fields (the names the loader reads)."""
    raw = name.encode() if isinstance(name, str) else name
    old = list(group.attrs.get("MATLAB_fields", []))
    names = np.empty(len(old) + 1, dtype=object)
    for i, n in enumerate(old):
        names[i] = n
    names[-1] = np.frombuffer(raw, dtype="S1")
    group.attrs.create("MATLAB_fields", names, dtype=h5py.vlen_dtype(np.dtype("S1")))


def v73_net(path: Path, meta: dict | None = None) -> Path:
    net = tiny_net()
    if meta is not None:
        net.meta = meta
    save_net(path, net, version="7.3")
    return path


def secret_h5(tmp_path: Path) -> Path:
    p = tmp_path / "secret.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=np.frombuffer(SECRET, dtype=np.uint8))
    return p


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


# --------------------------------------------------------------------------- v7.3


def test_v73_deep_nesting_is_refused(tmp_path):
    p = v73_net(tmp_path / "deep.mat")
    with h5py.File(p, "a") as f:
        refs = f["#refs#"]
        inner = refs.create_dataset("deep0", data=np.array([[1.0]]))
        inner.attrs["MATLAB_class"] = np.bytes_("double")
        for i in range(1, 60):
            ds = refs.create_dataset(f"deep{i}", data=np.array([[inner.ref]], dtype=h5py.ref_dtype))
            ds.attrs["MATLAB_class"] = np.bytes_("cell")
            inner = ds
        f["net/meta"].create_dataset("deep", data=np.array([[inner.ref]], dtype=h5py.ref_dtype))
        f["net/meta/deep"].attrs["MATLAB_class"] = np.bytes_("cell")
        h5_add_field(f["net/meta"], "deep")
    with pytest.raises(McnError, match="deeper than 32") as e:
        load_net(p)
    assert "net.meta.deep{1}{1}" in one_line_mcn(e, p)


def _cell_cycle(f):
    ds = f["#refs#"].create_dataset("loop", shape=(1, 1), dtype=h5py.ref_dtype)
    ds.attrs["MATLAB_class"] = np.bytes_("cell")
    ds[0, 0] = ds.ref  # a cell containing itself
    f["net/meta"].create_dataset("loop", data=np.array([[ds.ref]], dtype=h5py.ref_dtype))
    f["net/meta/loop"].attrs["MATLAB_class"] = np.bytes_("cell")
    h5_add_field(f["net/meta"], "loop")
    return "net.meta.loop{1}{1}"


def _link_cycle(f):
    g = f["net/meta"].create_group("loop")  # a struct whose field is itself (a second hard link)
    g.attrs["MATLAB_class"] = np.bytes_("struct")
    g["self"] = g
    h5_add_field(g, "self")
    h5_add_field(f["net/meta"], "loop")
    return "net.meta.loop.self"


def _fan_out(f):
    """20 levels of cells whose two elements are the same next level: 2^20 paths."""
    refs = f["#refs#"]
    inner = refs.create_dataset("fan0", data=np.array([[1.0]]))
    inner.attrs["MATLAB_class"] = np.bytes_("double")
    for i in range(1, 21):
        inner = refs.create_dataset(f"fan{i}", data=np.array([[inner.ref, inner.ref]], dtype=h5py.ref_dtype))
        inner.attrs["MATLAB_class"] = np.bytes_("cell")
    f["net/meta"].create_dataset("loop", data=np.array([[inner.ref]], dtype=h5py.ref_dtype))
    f["net/meta/loop"].attrs["MATLAB_class"] = np.bytes_("cell")
    h5_add_field(f["net/meta"], "loop")
    return "net.meta.loop{1}"


@pytest.mark.parametrize("make", [_cell_cycle, _link_cycle, _fan_out], ids=["cell", "hard-link", "fan-out"])
def test_v73_reference_cycles_and_shared_objects_are_refused(tmp_path, make):
    p = v73_net(tmp_path / "cycle.mat")
    with h5py.File(p, "a") as f:
        where = make(f)
    t = time.perf_counter()
    with pytest.raises(McnError, match="refers back") as e:
        load_net(p)
    assert time.perf_counter() - t < 2.0
    assert where in one_line_mcn(e, p)


def huge_zeros(group: h5py.Group, name: str) -> None:
    """1.1 GB declared, all zeros, chunked and compressed: no chunk is ever written."""
    ds = group.create_dataset(name, shape=(1100, 1000, 1000), dtype=np.uint8, chunks=(10, 100, 100),
                              compression="gzip")  # fmt: skip
    ds.attrs["MATLAB_class"] = np.bytes_("uint8")


def test_v73_unused_huge_variable_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "1G")
    p = v73_net(tmp_path / "big.mat")
    with h5py.File(p, "a") as f:
        huge_zeros(f, "big")
    assert p.stat().st_size < 32 * 1024  # 1.1 GB declared
    opened: list[str] = []
    real = h5py.Dataset.__getitem__
    monkeypatch.setattr(
        h5py.Dataset, "__getitem__", lambda self, k: opened.append(self.name) or real(self, k)
    )
    t = time.perf_counter()
    net = load_net(p)
    assert time.perf_counter() - t < 2.0
    assert net == tiny_net()
    assert opened and not any("big" in n for n in opened)
    assert "big" in list_variables(p)
    assert set(load_checkpoint(p).net.meta) == {"inputSize", "classes"}


def test_v73_huge_array_inside_the_net_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "1G")
    p = v73_net(tmp_path / "big.mat")
    with h5py.File(p, "a") as f:
        huge_zeros(f["net/meta"], "big")
        h5_add_field(f["net/meta"], "big")
    t = time.perf_counter()
    with pytest.raises(McnError, match="memory budget") as e:
        load_net(p)
    assert time.perf_counter() - t < 2.0
    assert "net.meta.big" in one_line_mcn(e, p)


def _external_storage(f, tmp_path):
    raw = tmp_path / "secret.bin"
    raw.write_bytes(SECRET)
    ds = f["net/meta"].create_dataset("leak", shape=(1, len(SECRET)), dtype=np.uint8,
                                      external=[(str(raw), 0, h5py.h5f.UNLIMITED)])  # fmt: skip
    ds.attrs["MATLAB_class"] = np.bytes_("uint8")


def _external_link(f, tmp_path):
    f["net/meta"]["leak"] = h5py.ExternalLink(str(secret_h5(tmp_path)), "/data")


def _soft_link(f, tmp_path):
    f["net/meta"]["leak"] = h5py.SoftLink("/net/layers")


def _virtual(f, tmp_path):
    src = secret_h5(tmp_path)
    layout = h5py.VirtualLayout(shape=(len(SECRET),), dtype=np.uint8)
    layout[:] = h5py.VirtualSource(str(src), "data", shape=(len(SECRET),))
    ds = f["net/meta"].create_virtual_dataset("leak", layout)
    ds.attrs["MATLAB_class"] = np.bytes_("uint8")


@pytest.mark.parametrize(
    "make, message",
    [(_external_storage, "external file"), (_external_link, "external link"), (_soft_link, "soft link"),
     (_virtual, "virtual dataset")],
    ids=["external-storage", "external-link", "soft-link", "virtual"],
)  # fmt: skip
def test_v73_never_reads_other_files(tmp_path, make, message):
    p = v73_net(tmp_path / "leak.mat")
    with h5py.File(p, "a") as f:
        make(f, tmp_path)
        h5_add_field(f["net/meta"], "leak")
    with h5py.File(p, "r") as f:  # the file really does reach the secret
        assert f["net/meta/leak"].size > 0
    with pytest.raises(McnError, match=message) as e:
        load_net(p)
    msg = one_line_mcn(e, p)
    assert "net.meta.leak" in msg
    assert SECRET.decode() not in msg and "TOP-SECRET" not in msg


def test_v73_unused_link_is_never_followed(tmp_path):
    p = v73_net(tmp_path / "leak.mat")
    with h5py.File(p, "a") as f:
        f["leak"] = h5py.ExternalLink(str(secret_h5(tmp_path)), "/data")
    assert load_net(p) == tiny_net()
    with pytest.raises(McnError, match="external link"):
        read_variables(p)


def test_v73_strings_and_names(tmp_path):
    net = tiny_net()
    net.layers[0].name = "a\ud800b"  # written as UTF-16 code units: 0x61 0xD800 0x62
    net.layers[1].name = "\ud83d\ude00"  # a surrogate pair
    net.meta = {"classes": ["\udc00x"]}
    p = tmp_path / "s.mat"
    save_net(p, net, version="7.3")
    with h5py.File(p, "a") as f:
        ds = f["net/meta"].create_dataset(b"bad\xed\xa0\x80", data=np.array([[1.0]]))
        ds.attrs["MATLAB_class"] = np.bytes_("double")
        h5_add_field(f["net/meta"], b"bad\xed\xa0\x80")
    back = load_net(p)
    assert back.layers[0].name == "a\ufffdb"
    assert back.layers[1].name == "\U0001f600"
    assert back.meta["classes"] == ["\ufffdx"]
    assert "bad\ufffd\ufffd\ufffd" in back.meta
    assert all_strings_utf8(back.meta) and all_strings_utf8([l.name for l in back.layers])


def test_v73_complex_sparse_and_objects_come_back_typed(tmp_path):
    p = v73_net(tmp_path / "typed.mat")
    with h5py.File(p, "a") as f:
        conv = f[f["net/layers"][0, 0]]
        weights = f[conv["weights"][0, 0]]
        w = np.zeros((2, 1, 3, 3), dtype=[("real", "<f4"), ("imag", "<f4")])
        w["real"], w["imag"] = 1.0, 2.0
        name = weights.name
        del f[name]
        ds = f.create_dataset(name, data=w)
        ds.attrs["MATLAB_class"] = np.bytes_("single")
        conv["weights"][0, 0] = ds.ref
        sp = scipy.sparse.random(5, 4, density=0.4, format="csc", random_state=1)
        bias = f[conv["weights"][1, 0]]  # HDF5 holds the 1x2 cell as 2x1
        name = bias.name
        del f[name]
        g = f.create_group(name)  # the second filter: a sparse matrix
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(5)
        g["data"], g["ir"], g["jc"] = sp.data, sp.indices.astype(np.uint64), sp.indptr.astype(np.uint64)
        conv["weights"][1, 0] = g.ref
        obj = f["net/meta"].create_dataset("gpu", data=np.array([[0xDD000000, 2, 1, 1, 1, 1]], np.uint32))
        obj.attrs["MATLAB_class"] = np.bytes_("gpuArray")
        obj.attrs["MATLAB_object_decode"] = np.int32(3)
        h5_add_field(f["net/meta"], "gpu")
        fh = f["net/meta"].create_group("fn")
        fh.attrs["MATLAB_class"] = np.bytes_("function_handle")
        h5_add_field(f["net/meta"], "fn")
    net = load_net(p)
    w0 = net.layers[0].weights[0]
    assert w0.dtype == np.complex64 and w0.shape == (3, 3, 1, 2) and w0[0, 0, 0, 0] == 1 + 2j
    got = net.layers[0].weights[1]
    assert scipy.sparse.issparse(got) and got.shape == (5, 4)
    np.testing.assert_allclose(got.toarray(), sp.toarray())
    assert net.meta["gpu"] == MatlabObject("gpuArray")
    assert net.meta["fn"] == MatlabObject("function_handle")


def test_v73_bad_sparse_indices_are_refused(tmp_path):
    p = v73_net(tmp_path / "sp.mat")
    with h5py.File(p, "a") as f:
        g = f["net/meta"].create_group("sp")
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(3)
        g["data"], g["ir"], g["jc"] = np.ones(2), np.array([0, 99], np.uint64), np.array([0, 2], np.uint64)
        h5_add_field(f["net/meta"], "sp")
    with pytest.raises(McnError, match="sparse") as e:
        load_net(p)
    assert "net.meta.sp" in one_line_mcn(e, p)


def test_v73_truncated_and_garbage(tmp_path):
    good = v73_net(tmp_path / "good.mat").read_bytes()
    p = tmp_path / "t.mat"
    for cut in (600, 2048, len(good) // 2, len(good) - 100):
        p.write_bytes(good[:cut])
        with pytest.raises(McnError) as e:
            load_net(p)
        one_line_mcn(e, p)
    p.write_bytes(good[:520] + np.random.RandomState(0).bytes(8192))
    with pytest.raises(McnError):
        load_net(p)


def _patch_fields_type(data: bytes, offset: int, value: int) -> bytes:
    """Set a byte of the first MATLAB_fields attribute's datatype message."""
    at = data.index(b"MATLAB_fields\x00\x00\x00\x19") + 16  # the name, padded to 8 bytes
    return data[: at + offset] + bytes([value]) + data[at + offset + 1 :]


def _patch_heap(data: bytes) -> bytes:
    """Give the first object of the first global heap collection a size of 2^64 - 16: its
    header plus the padded size wraps around to 0, and libhdf5 never moves past it."""
    at = data.index(b"GCOL\x01") + 16 + 8
    return data[:at] + (2**64 - 16).to_bytes(8, "little") + data[at + 8 :]


@pytest.mark.parametrize(
    "patch",
    [
        lambda d: _patch_fields_type(d, 1, 0x03),  # variable-length kind 3 (0 sequence, 1 string)
        lambda d: _patch_fields_type(d, 8, 0x17),  # a sequence of region references
        _patch_heap,
    ],
    ids=["vlen-kind", "vlen-of-regref", "heap-object-size"],
)
def test_v73_inputs_that_crash_or_hang_libhdf5(tmp_path, fuzz_env, patch):
    """Found by the fuzzer: reading MATLAB_fields from these makes libhdf5 segfault
    (the first two) or loop forever (the third). The loader refuses them first; they are
    loaded in the worker process so that a regression fails this test, not pytest."""
    _, _, worker = fuzz_env
    p = tmp_path / "bad.mat"
    p.write_bytes(patch(v73_net(tmp_path / "good.mat").read_bytes()))
    assert worker.load(p, timeout=30) == "mcn"


@pytest.mark.parametrize("version", ["7", "7.3"])
def test_structs_without_fields_round_trip(tmp_path, version):
    net = tiny_net()
    net.meta = {}
    net.layers[1].extra = {}
    p = tmp_path / "empty.mat"
    save_net(p, net, version=version)
    back = load_net(p)
    assert back.meta == {} and back.layers[1].extra == {}
    assert back == net


def test_checkpoint_reads_only_its_variables(tmp_path, monkeypatch):
    """Older cnn_train saved ``info`` where newer ones save ``stats``; other variables
    (here one above the budget) are left alone."""
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "1M")
    p = tmp_path / "net-epoch-2.mat"
    save_net(p, tiny_net())
    raw = scipy.io.loadmat(p)
    info = {"train": {"objective": 0.25}}
    scipy.io.savemat(p, {"net": raw["net"], "info": info, "images": np.zeros((600, 600))})
    ckpt = load_checkpoint(p)
    assert ckpt.net.layers == tiny_net().layers
    assert ckpt.stats["train"]["objective"] == 0.25
    with pytest.raises(McnError, match="memory budget"):
        read_variables(p)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.mat"
    os.mkfifo(fifo)
    with pytest.raises(McnError, match="not a regular file"):
        load_net(fifo)


def test_private_alias_and_wanted(tmp_path):
    p = tmp_path / "v.mat"
    scipy.io.savemat(p, {"a": 1.0, "b": "x", "c": np.ones((2, 2))})
    assert _read_variables is read_variables
    assert set(read_variables(p)) == {"a", "b", "c"}
    assert read_variables(p, ["b", "zz"]) == {"b": "x"}
    assert read_variables(p, []) == {}


# --------------------------------------------------------------------------- fuzzer

_WORKER = r"""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from harness.mcn import McnError, Net, load_net

def check_strings(v):
    if isinstance(v, str):
        v.encode("utf-8")
    elif isinstance(v, dict):
        for k, x in v.items():
            check_strings(k); check_strings(x)
    elif isinstance(v, list):
        for x in v:
            check_strings(x)

for line in sys.stdin:
    try:
        net = load_net(line.rstrip("\n"))
        if isinstance(net, Net):
            for layer in net.layers:
                check_strings(dict(layer.fields()))
            check_strings(net.meta)
            out = "net"
        else:
            out = "wrong " + type(net).__name__
    except McnError as err:
        out = "mcn" if "\n" not in str(err) else "mcn-multiline"
    except BaseException as err:
        out = "exception " + type(err).__name__ + ": " + " ".join(str(err).split())[:300]
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
"""


class Worker:
    """A process running load_net on the paths it is sent: one that segfaults dies alone."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(
            os.environ, MCN_HARNESS_MEMORY_BUDGET="256M", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=REPO, env=env,
        )  # fmt: skip

    def load(self, path: Path, timeout: float = 60.0) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if not ready:
                self.proc.kill()
            code = self.proc.wait()
            self.proc = None
            return f"crashed (exit status {code})" if ready else "hung"
        return line.strip()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    net = tiny_net()
    bases = {}
    for version in ("7", "7.3"):
        p = root / f"base-{version}.mat"
        save_net(p, net, version=version)
        bases[version] = p.read_bytes()
    p = root / "base-7-plain.mat"
    scipy.io.savemat(p, {"net": {"layers": np.array([[{"type": "relu", "name": "r"}]], dtype=object),
                                 "meta": {"x": np.arange(4.0)}}})  # fmt: skip
    bases["7-plain"] = p.read_bytes()
    # function handle, MCOS object, UTF-16 text with a surrogate pair, cells, uncompressed
    fh = matrix(16, (1, 1), b"", struct_(b"", {b"function_handle": struct_(b"", {b"file": text(b"", "f")})}))
    layer = struct_(
        b"", {b"type": text(b"", "custom"), b"forward": fh, b"name": char(b"", [0x61, 0xD83D, 0xDE00])}
    )
    mcos = el(
        14,
        el(6, struct.pack("<II", 17, 0)) + el(1) + el(1, b"MCOS") + el(1, b"string")
        + matrix(13, (1, 6), b"", el(6, np.array([0xDD000000, 2, 1, 1, 1, 2], "<u4").tobytes())),
    )  # fmt: skip
    meta = struct_(b"", {b"s": mcos, b"c": cell(b"", double(b"", np.ones((2, 2))), text(b"", "ab"))})
    bases["7-crafted"] = v5(v5_net([layer, relu()], meta))
    worker = Worker()
    for version, data in bases.items():  # the unmutated files load
        (root / "check.mat").write_bytes(data)
        assert worker.load(root / "check.mat") == "net", version
    yield root, bases, worker
    worker.stop()


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op, at, arg in ops:
        at = at % (len(buf) + 1)
        if op == "flip" and at < len(buf):
            buf[at] ^= 1 << (arg % 8)
        elif op == "set":
            buf[at : at + len(arg)] = arg
        elif op == "insert":
            buf[at:at] = arg
        elif op == "truncate":
            del buf[at:]
    return bytes(buf)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
        st.tuples(
            st.just("set"),
            st.integers(0, 1 << 20),
            st.sampled_from(
                [
                    b"\xff\xff\xff\xff",
                    b"\x00\x00\x00\x00",
                    b"\xff\xff\xff\x7f",
                    b"\x0e",
                    b"\x0f",
                    b"\x01\x00\x00\x00",
                    b"\x00\x00\x00\x80",
                ]
            )
            | st.binary(min_size=1, max_size=8),
        ),  # fmt: skip
        st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.none()),
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("version", ["7", "7-plain", "7-crafted", "7.3"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_fuzz_mutated_files_load_or_raise_mcn_error(fuzz_env, version, ops):
    root, bases, worker = fuzz_env
    data = _mutate(bases[version], ops)
    path = root / f"mutant-{version}.mat"
    path.write_bytes(data)
    result = worker.load(path)
    if result not in ("net", "mcn"):
        keep = root / f"failing-{version}-{abs(hash(tuple(ops)))}.mat"
        keep.write_bytes(data)
        pytest.fail(f"load_net on a mutated v{version} file ({ops}): {result}; input kept at {keep}")
