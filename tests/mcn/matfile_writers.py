"""Hostile .mat files for the loader tests: a small byte-level v5 writer (scipy.io.savemat
cannot write most of these), v7.3 files through h5py, and the nets they hold."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import h5py
import numpy as np

from harness.mcn import Net, save_net
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
