"""MATLAB .mat I/O for simplenn networks and cnn_train checkpoints.

Reads MATLAB v5/v7 files with scipy.io and v7.3 files (HDF5) with h5py; writes both.
A file may hold the net struct's fields at top level (``layers``, ``meta``), a ``net``
variable, or a cnn_train checkpoint (``net-epoch-N.mat``: ``net``, ``state``, ``stats``),
whose solver state ``load_checkpoint`` exposes.

Conversion rules (the same for both formats): structs become dicts (struct arrays lists
of dicts), cell arrays lists (column-major order), char arrays str (UTF-16 code units:
surrogate pairs joined, lone surrogates replaced by U+FFFD), numeric arrays stay arrays
with MATLAB's shape and dtype except 1x1 real numerics, which become Python numbers;
complex arrays stay complex ndarrays (even 1x1), sparse matrices become
scipy.sparse.csc_matrix, function handles and objects (MCOS such as gpuArray, old-style
classes) become ``MatlabObject`` carrying the class name only; a layer's ``precious`` is a
bool. The loader does not refuse any of these: callers do, with their own message.

Files are untrusted: ``read_variables`` reads only the variables asked for (``load_net``:
net, layers, meta), refuses nesting deeper than MAX_NESTING and declared sizes above
``memory_budget()`` before anything is allocated (v5: ``matscan`` walks the file first;
v7.3: every dataset's size is charged before it is read), and never follows HDF5 links,
external storage or virtual datasets to other files. Every failure is an McnError naming
the file and, where known, the MATLAB path of the value (``net.layers{3}.weights{1}``).
"""

from __future__ import annotations

import codecs
import os
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.mcn import matscan
from harness.mcn.net import Layer, Net, matlab_field, python_field
from harness.mcn.options import MAX_NESTING, McnError, check_budget, memory_budget

__all__ = [
    "Checkpoint",
    "MatlabObject",
    "list_variables",
    "load_checkpoint",
    "load_net",
    "read_variables",
    "save_net",
]

NET_VARIABLES = ("net", "layers", "meta")
CHECKPOINT_VARIABLES = ("net", "layers", "meta", "state", "stats", "info")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class Checkpoint:
    """A cnn_train checkpoint: the net, ``state`` (``solverState`` per layer and
    parameter: arrays, dicts for the solvers, or 0 where never updated) and ``stats``."""

    net: Net
    state: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def solver_state(self) -> list[list[Any]]:
        return self.state.get("solverState", []) or []


# --------------------------------------------------------------------------- reading


class MatlabObject:
    """A MATLAB value the harness cannot represent, kept as its class name only: a
    function handle (``function_handle``), an MCOS object (``gpuArray``, ``string``,
    ``dagnn.DagNN`` ...) or an old-style class instance. Callers refuse it with a clear
    message; the loader never does."""

    __slots__ = ("matlab_class",)

    def __init__(self, matlab_class: str):
        self.matlab_class = _fix_str(str(matlab_class)) or "object"

    def __repr__(self) -> str:
        return f"MatlabObject({self.matlab_class!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MatlabObject) and other.matlab_class == self.matlab_class

    def __hash__(self) -> int:
        return hash(("MatlabObject", self.matlab_class))


def _fix_str(s: str) -> str:
    """MATLAB char data is UTF-16 code units: join surrogate pairs, replace lone
    surrogates with U+FFFD, so the result always encodes as UTF-8."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# scipy decodes miUINT16 char data with ``uint16_codec``; its default (the system codec,
# UTF-8) keeps only the low byte of each unit. This codec maps each UTF-16 unit to one
# code point (lone surrogates included, so the lengths match the declared dimensions);
# _fix_str then pairs them up.
_UNITS_CODECS = {"<": "mcn_harness_utf16_units_le", ">": "mcn_harness_utf16_units_be"}


def _search_units_codec(name: str) -> codecs.CodecInfo | None:
    order = {v: k for k, v in _UNITS_CODECS.items()}.get(name)
    if order is None:
        return None
    utf16 = "utf-16-le" if order == "<" else "utf-16-be"

    def decode(data: Any, errors: str = "strict") -> tuple[str, int]:
        raw = bytes(data)
        units = np.frombuffer(raw, dtype=order + "u2", count=len(raw) // 2)
        return units.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass"), len(raw)

    def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
        return text.encode(utf16, "surrogatepass"), len(text)

    return codecs.CodecInfo(encode, decode, name=name)


codecs.register(_search_units_codec)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def _unreadable(path: str, detail: str, kind: str = "") -> McnError:
    return McnError(f"Expected a readable MATLAB {kind}.mat file. Received path={path!r} ({detail})")


def _check_path(path: str | os.PathLike) -> tuple[Path, str]:
    p = Path(path)
    if not p.exists():
        raise McnError(f"Expected an existing .mat file. Received path={str(p)!r} (no such file)")
    if p.is_dir():
        raise McnError(f"Expected a .mat file. Received path={str(p)!r} (a directory)")
    if not p.is_file():  # a FIFO would block the read below, a device never end
        raise McnError(f"Expected a .mat file. Received path={str(p)!r} (not a regular file)")
    try:
        with open(p, "rb") as fh:
            head = fh.read(1024)
    except OSError as err:
        raise _unreadable(str(p), f"cannot open: {err.strerror}") from None
    if len(head) < 128:
        raise McnError(
            f"Expected a MATLAB .mat file. Received path={str(p)!r} (truncated: {len(head)} bytes)"
        )
    kind = "hdf5" if head[512:520] == _HDF5_SIGNATURE or head[:8] == _HDF5_SIGNATURE else "v5"
    return p, kind


def read_variables(path: str | os.PathLike, wanted: Collection[str] | None = None) -> dict[str, Any]:
    """The top-level variables of a .mat file (v5/v7 or v7.3), converted by the rules at
    the top of this module; only those named in ``wanted`` (all when None) are read, the
    others are skipped without being decompressed. Hostile or damaged files raise
    McnError naming the file and the MATLAB path of the offending value: nesting deeper
    than ``MAX_NESTING``, declared sizes above ``memory_budget()``, HDF5 links, external
    or virtual storage, malformed or truncated data."""
    p, kind = _check_path(path)
    wanted = None if wanted is None else frozenset(wanted)
    if kind == "hdf5":
        return _read_hdf5(p, wanted)
    return _read_v5(p, wanted)


_read_variables = read_variables  # the historical name (harness.data, tests.golden)


def list_variables(path: str | os.PathLike) -> list[str]:
    """Names of the top-level variables of a .mat file, without reading any of them."""
    p, kind = _check_path(path)
    if kind == "v5":
        scan = matscan.scan_v5(p, wanted=())
        return [v.name for v in scan.variables if v.name and not v.name.startswith("__")]
    h5py, f = _open_hdf5(p)
    with f:
        try:
            names = [n.decode("utf-8", "replace") for n in f.id]
        except Exception as err:
            raise _unreadable(str(p), _one_line(err), "v7.3 ") from None
    return [_fix_str(n) for n in names if not n.startswith("#")]


# ---- v5 / v7 (scipy.io after matscan)


def _read_v5(path: Path, wanted: frozenset[str] | None) -> dict[str, Any]:
    import scipy.io

    spath = str(path)
    scan = matscan.scan_v5(spath, wanted)  # every check happens here, before scipy
    chosen = [v for v in scan.variables if v.selected]
    to_scipy = [v for v in chosen if v.scanned]
    raw: dict[str, Any] = {}
    if to_scipy:
        segments = [(v.offset, v.size) for v in to_scipy]
        try:
            with matscan.SegmentReader(spath, scan.clean_header(), segments) as stream:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    raw = scipy.io.loadmat(
                        stream,
                        variable_names=[v.name for v in to_scipy],
                        squeeze_me=False,
                        struct_as_record=True,
                        uint16_codec=_UNITS_CODECS[scan.byte_order],
                    )
        except McnError:
            raise
        except Exception as err:  # scipy raises several unrelated types for damaged files
            raise _unreadable(spath, _one_line(err)) from None
        for w in caught:
            if "Unreadable variable" in str(w.message):
                raise _unreadable(spath, " ".join(str(w.message).split())[:300])
    out: dict[str, Any] = {}
    for v in chosen:
        name = _fix_str(v.name)
        if not v.scanned:  # function handle or MCOS object at top level: never parsed
            out[name] = MatlabObject(v.class_name)
        elif v.name not in raw:
            raise _unreadable(spath, f"{matscan._label(v.name)}: scipy did not return the variable")
        else:
            try:
                out[name] = _from_scipy(raw[v.name], matscan._label(v.name), spath)
            except McnError:
                raise
            except Exception as err:  # scipy returned something unexpected
                raise _unreadable(spath, f"{matscan._label(v.name)}: {_one_line(err)}") from None
    return out


def _from_scipy(v: Any, mpath: str, path: str) -> Any:
    from scipy.io.matlab import MatlabFunction, MatlabOpaque
    from scipy.io.matlab import MatlabObject as ScipyObject

    if isinstance(v, MatlabFunction):
        return MatlabObject("function_handle")
    if isinstance(v, MatlabOpaque):
        return MatlabObject(_opaque_class(v))
    if isinstance(v, ScipyObject):
        return MatlabObject(getattr(v, "classname", None) or "object")
    if isinstance(v, np.ndarray):
        if v.dtype.names is not None:
            names = v.dtype.names
            items = []
            for i, e in enumerate(v.ravel(order="F")):
                at = mpath if v.size == 1 else f"{mpath}({i + 1})"
                items.append(
                    {_fix_str(n): _from_scipy(e[n], f"{at}.{matscan._label(n)}", path) for n in names}
                )
            return items[0] if v.size == 1 else items
        if v.dtype == object:
            if v.size and all(e is None for e in v.flat):  # scipy's struct without fields
                empty: list[dict] = [{} for _ in range(v.size)]
                return empty[0] if v.size == 1 else empty
            return [_from_scipy(e, f"{mpath}{{{i + 1}}}", path) for i, e in enumerate(v.ravel(order="F"))]
        if v.dtype.kind == "U":
            return _fix_str("".join(v.ravel().tolist())) if v.size else ""
        if v.dtype.kind == "c":
            return v  # complex stays an array, whatever its size, so callers can refuse it
        if v.size == 1:
            return v.item()
        return v
    if _is_sparse(v):
        return _checked_sparse(v, mpath, path, "")
    return v


def _opaque_class(v: Any) -> str:
    try:
        cls = v.ravel()[0]["s2"]
        cls = cls.item() if isinstance(cls, np.ndarray) else cls
        return cls.decode("latin1") if isinstance(cls, bytes) else str(cls)
    except Exception:
        return "opaque"


def _is_sparse(v: Any) -> bool:
    import scipy.sparse

    return scipy.sparse.issparse(v)


def _checked_sparse(v: Any, mpath: str, path: str, kind: str) -> Any:
    """A scipy.sparse.csc_matrix whose indices were checked (out-of-range indices would
    make later scipy operations read out of bounds)."""
    import scipy.sparse

    try:
        m = scipy.sparse.csc_matrix(v)
        m.check_format(full_check=True)
    except Exception as err:
        raise _unreadable(path, f"{mpath}: invalid sparse matrix ({_one_line(err)})", kind) from None
    return m


# ---- v7.3 (HDF5 via h5py)

_H5_KNOWN_CLASSES = {"char", "cell", "struct", "canonical empty"}  # plus _H5_DTYPES
# HDF5 filters read: deflate, shuffle, fletcher32 (MATLAB writes deflate only). Others
# (plugins above all: HDF5 loads them as shared libraries) are refused.
_H5_FILTERS = {1, 2, 3}
_DEFLATE_MAX_RATIO = 1032  # zlib cannot expand one byte into more


def _open_hdf5(path: Path) -> tuple[Any, Any]:
    import h5py

    try:
        return h5py, h5py.File(path, "r")
    except Exception as err:
        raise _unreadable(str(path), _one_line(err), "v7.3 ") from None


def _read_hdf5(path: Path, wanted: frozenset[str] | None) -> dict[str, Any]:
    h5py, f = _open_hdf5(path)
    try:
        with f:
            ctx = _H5Reader(h5py, f, str(path))
            out: dict[str, Any] = {}
            for raw_name in f.id:
                name = raw_name.decode("utf-8", "replace")
                if name.startswith("#") or (wanted is not None and name not in wanted):
                    continue  # '#refs#', '#subsystem#' and unwanted variables: never opened
                label = matscan._label(name)
                out[_fix_str(name)] = _from_h5(ctx, ctx.member(f, raw_name, label), label, 0)
            return out
    except McnError:
        raise
    except Exception as err:
        raise _unreadable(str(path), _one_line(err), "v7.3 ") from None


class _H5Reader:
    """State of one v7.3 load: the file, the bytes charged against the memory budget and
    the objects already converted (each may be read once: a second visit is a cycle or
    a shared object, neither of which MATLAB writes)."""

    def __init__(self, h5py: Any, f: Any, path: str):
        self.h5py, self.f, self.path = h5py, f, path
        self.total = 0
        self.budget = memory_budget()
        self.seen: set[Any] = set()
        self.heaps_checked = False

    def fail(self, mpath: str, reason: str) -> McnError:
        return _unreadable(self.path, f"{mpath}: {reason}", "v7.3 ")

    def charge(self, nbytes: int, mpath: str) -> None:
        self.total += int(nbytes)
        if self.total > self.budget:
            check_budget(self.total, f"{self.path}: {mpath}")

    def visit(self, obj: Any, mpath: str) -> None:
        key = obj.id
        if key in self.seen:
            if isinstance(obj, self.h5py.Dataset) and self.has_attr(obj, "MATLAB_empty"):
                return  # MATLAB shares its canonical empty array
            raise self.fail(
                mpath, "refers back to an object already read (a reference cycle or a shared object)"
            )
        self.seen.add(key)

    # -- objects

    def wrap(self, oid: Any, mpath: str) -> Any:
        h5py = self.h5py
        if oid.fileno != self.f.id.fileno:
            raise self.fail(mpath, "resolves to an object outside the file")
        kind = h5py.h5i.get_type(oid)
        if kind == h5py.h5i.DATASET:
            return h5py.Dataset(oid)
        if kind == h5py.h5i.GROUP:
            return h5py.Group(oid)
        raise self.fail(mpath, "is neither a dataset nor a group")

    def member(self, group: Any, name: bytes, mpath: str) -> Any:
        """``group[name]`` through a hard link only (soft and external links, which could
        reach other objects or files, are refused); None if there is no such member."""
        h5py = self.h5py
        if not name or b"/" in name or name == b".":
            raise self.fail(mpath, f"member name {name!r} is not a plain name")
        try:
            info = group.id.links.get_info(name)
        except KeyError:
            return None
        if info.type != h5py.h5l.TYPE_HARD:
            kinds = {h5py.h5l.TYPE_SOFT: "soft", h5py.h5l.TYPE_EXTERNAL: "external"}
            kind = kinds.get(info.type, "user-defined")
            raise self.fail(mpath, f"is a {kind} link; only hard links are read (MATLAB writes no others)")
        return self.wrap(self.h5py.h5o.open(group.id, name), mpath)

    def deref(self, ref: Any, mpath: str) -> Any:
        if not ref:
            raise self.fail(mpath, "null object reference")
        return self.wrap(self.h5py.h5r.dereference(ref, self.f.id), mpath)

    # -- attributes

    def has_attr(self, obj: Any, name: str) -> bool:
        return bool(self.h5py.h5a.exists(obj.id, name.encode()))

    def attr(self, obj: Any, name: str, mpath: str) -> Any:
        """A MATLAB_* attribute, its HDF5 type checked first against the exact encodings
        MATLAB writes: libhdf5 and h5py crash converting some malformed types (a
        variable-length sequence of region references, a bad variable-length kind)."""
        if not self.has_attr(obj, name):
            return None
        aid = self.h5py.h5a.open(obj.id, name.encode())
        try:
            stored = aid.get_storage_size()
        except RuntimeError:  # h5py reports the 0 of an empty attribute as an error
            stored = 0
        if stored > 1 << 20 or aid.shape is None or int(np.prod(aid.shape)) > 1 << 16:
            raise self.fail(mpath, f"attribute {name} is too large")
        encoded = aid.get_type().encode()
        kind = _H5_ATTR_KINDS.get(name, "int")
        types = _h5_types(self.h5py)
        if kind == "str":  # fixed-length string: class 3, padding 0-2, ASCII or UTF-8
            ok = encoded[:3] == b"\x03\x00\x13" and encoded[3] in _H5_STR_FLAGS and encoded[4:6] == b"\0\0"
        elif kind == "int":
            ok = encoded in types["int"]
        else:
            ok = encoded in types["fields"]
            if ok and not self.heaps_checked:
                problem = _check_global_heaps(self.path)
                if problem:
                    raise self.fail(mpath, problem)
                self.heaps_checked = True
        if not ok:
            raise self.fail(mpath, f"attribute {name} has an HDF5 type MATLAB does not write")
        return obj.attrs[name]

    def attr_str(self, obj: Any, name: str, mpath: str) -> str | None:
        v = self.attr(obj, name, mpath)
        if v is None:
            return None
        if isinstance(v, np.ndarray) and v.size == 1:
            v = v.ravel()[0]
        return _fix_str(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))

    # -- datasets

    def check_dataset(self, ds: Any, mpath: str) -> None:
        """Refuse storage that reads other files or runs plugins, and non-MATLAB types."""
        h5py = self.h5py
        dcpl = ds.id.get_create_plist()
        if dcpl.get_external_count():
            raise self.fail(mpath, "stores its data in an external file; refused (MATLAB never does)")
        if dcpl.get_layout() == h5py.h5d.VIRTUAL:
            raise self.fail(mpath, "is a virtual dataset (data mapped from other datasets or files); refused")
        filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
        if any(code not in _H5_FILTERS for code in filters):
            raise self.fail(mpath, f"uses HDF5 filters {filters}; only deflate, shuffle, fletcher32 are read")
        if ds.shape is None:
            raise self.fail(mpath, "has a null dataspace")
        tid = ds.id.get_type()
        types = _h5_types(h5py)
        encoded = tid.encode()
        if encoded in types["numeric"] or encoded == types["ref"]:
            return
        if tid.get_class() == h5py.h5t.COMPOUND and tid.get_nmembers() == 2:  # complex
            names = {tid.get_member_name(i) for i in range(2)}
            parts = [tid.get_member_type(i) for i in range(2)]
            offsets = [tid.get_member_offset(i) for i in range(2)]
            if (
                names == {b"real", b"imag"}
                and all(t.encode() in types["numeric"] for t in parts)
                and all(o + t.get_size() <= tid.get_size() for o, t in zip(offsets, parts, strict=True))
            ):
                return
        raise self.fail(mpath, f"has an HDF5 type (class {tid.get_class()}) that MATLAB does not write")

    def read(self, ds: Any, mpath: str) -> np.ndarray:
        """``ds[()]`` after charging its declared size (cumulative) against the budget."""
        nbytes = int(ds.size) * ds.dtype.itemsize
        self.charge(nbytes, mpath)
        if ds.chunks is not None and nbytes:
            self.check_chunks(ds, mpath)
        return np.asarray(ds[()])

    def check_chunks(self, ds: Any, mpath: str) -> None:
        """A deflated chunk inflates to at most 1032x its stored size, however small
        the chunk is declared: bound that before HDF5 decompresses it."""
        dcpl = ds.id.get_create_plist()
        if 1 not in [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]:
            return
        sizes = [0]
        if hasattr(ds.id, "chunk_iter"):  # one pass (get_chunk_info(i) walks the index each time)
            ds.id.chunk_iter(lambda info: sizes.append(info.size))
        else:  # pragma: no cover - h5py < 3.8
            sizes += [ds.id.get_chunk_info(i).size for i in range(ds.id.get_num_chunks())]
        largest = max(sizes)
        worst = self.total + largest * _DEFLATE_MAX_RATIO
        check_budget(worst, f"{self.path}: {mpath} (its largest compressed chunk)")


_H5_ATTR_KINDS = {"MATLAB_class": "str", "MATLAB_fields": "fields"}
_H5_STR_FLAGS = {pad | cset for pad in (0, 1, 2) for cset in (0x00, 0x10)}
_H5_TYPES: dict[str, Any] = {}


def _h5_types(h5py: Any) -> dict[str, Any]:
    """Serialized (H5Tencode) HDF5 types MATLAB writes: standard integers and IEEE
    floats, object references, and MATLAB_fields' variable-length sequences of one-byte
    characters. Anything else is refused before HDF5 or h5py converts a value of it."""
    if not _H5_TYPES:
        h5t = h5py.h5t
        ints = [getattr(h5t, f"STD_{s}{n}{e}") for s in "IU" for n in (8, 16, 32, 64) for e in ("LE", "BE")]
        floats = [getattr(h5t, f"IEEE_F{n}{e}") for n in (32, 64) for e in ("LE", "BE")]
        chars = [h5t.C_S1.copy() for _ in range(2)] + [h5t.STD_U8LE, h5t.STD_I8LE]
        chars[0].set_strpad(h5t.STR_NULLTERM)
        chars[1].set_strpad(h5t.STR_NULLPAD)
        _H5_TYPES.update(
            int={t.encode() for t in ints},
            numeric={t.encode() for t in ints + floats},
            ref=h5t.STD_REF_OBJ.encode(),
            fields={h5t.vlen_create(c).encode() for c in chars},
        )
    return _H5_TYPES


def _check_global_heaps(path: str) -> str | None:
    """Check every HDF5 global heap collection in the file before HDF5 parses one (it
    does to read MATLAB_fields): libhdf5 loops forever on a heap object whose size field
    is 0 or wraps around, and allocates whatever a corrupt object index asks for.
    A collection starts with "GCOL", version 1, 3 reserved bytes and its 8-byte size;
    then objects: 2-byte index, 2-byte reference count, 4 reserved bytes, 8-byte size,
    data padded to 8 bytes (index 0: free space, whose size includes its header)."""
    import struct

    try:
        with open(path, "rb") as fh:
            fsize = os.fstat(fh.fileno()).st_size
            starts, tail, pos = [], b"", 0
            while chunk := fh.read(1 << 20):
                data = tail + chunk
                i = data.find(b"GCOL")
                while i != -1:
                    starts.append(pos - len(tail) + i)
                    i = data.find(b"GCOL", i + 1)
                tail, pos = data[-3:], pos + len(chunk)
            for start in starts:
                fh.seek(start)
                head = fh.read(16)
                if len(head) < 16 or head[4] != 1 or head[5:8] != b"\x00\x00\x00":
                    continue  # not a collection HDF5 would accept
                (size,) = struct.unpack("<Q", head[8:16])
                if size < 4096 or start + size > fsize:
                    continue
                fh.seek(start)
                heap = fh.read(size)
                p = 16
                while p + 16 <= size:
                    index, _refs, _reserved, length = struct.unpack_from("<HHIQ", heap, p)
                    need = length if index == 0 else 16 + length + (-length % 8)
                    if need < 16 or p + need > size:
                        return f"corrupt HDF5 global heap at byte {start} (object {index} of {length} bytes)"
                    p += need
    except OSError as err:
        return f"cannot read the file ({err.strerror})"
    return None


def _from_h5(ctx: _H5Reader, obj: Any, mpath: str, depth: int = 0) -> Any:
    """Convert one HDF5 object of a v7.3 file; ``depth`` counts the structs and cells
    around it (refused above MAX_NESTING, which also ends reference cycles)."""
    h5py = ctx.h5py
    if depth > MAX_NESTING:
        raise ctx.fail(mpath, f"nested deeper than {MAX_NESTING} levels (MAX_NESTING)")
    ctx.visit(obj, mpath)
    ctx.charge(matscan.OBJECT_OVERHEAD, mpath)
    cls = ctx.attr_str(obj, "MATLAB_class", mpath)
    is_object = ctx.has_attr(obj, "MATLAB_object_decode")
    if isinstance(obj, h5py.Group):
        if ctx.has_attr(obj, "MATLAB_sparse"):
            return _h5_sparse(ctx, obj, cls, mpath)
        if is_object or cls not in (None, "struct"):
            return MatlabObject(cls or "object")  # function handles, old-style objects
        return _h5_struct(ctx, obj, mpath, depth)
    ds = obj
    ctx.check_dataset(ds, mpath)
    if is_object or (cls is not None and cls not in _H5_KNOWN_CLASSES and cls not in _H5_DTYPES):
        return MatlabObject(cls or "object")  # MCOS objects (gpuArray, string ...): never read
    is_ref = h5py.check_ref_dtype(ds.dtype) is h5py.Reference
    empty = ctx.attr(ds, "MATLAB_empty", mpath)
    if empty is not None and np.asarray(empty).any():
        return _h5_read_empty(ctx, ds, cls, mpath)
    if is_ref:
        if cls not in (None, "cell"):
            raise ctx.fail(mpath, f"holds object references but has class {cls!r}")
        refs = ctx.read(ds, mpath).T  # HDF5 stores MATLAB arrays with dimensions reversed
        out = []
        for i, r in enumerate(refs.ravel(order="F")):
            at = f"{mpath}{{{i + 1}}}"
            out.append(_from_h5(ctx, ctx.deref(r, at), at, depth + 1))
        return out
    if cls == "cell":
        raise ctx.fail(mpath, "cell array without object references")
    data = ctx.read(ds, mpath)
    if cls == "char":
        if data.dtype.kind not in "iu":
            raise ctx.fail(mpath, f"char data of type {data.dtype}")
        units = data.T.ravel(order="F").astype("<u2")
        return _fix_str(units.tobytes().decode("utf-16-le", errors="replace"))
    arr = data.T
    if arr.dtype.names is not None:  # complex: compound {real, imag}
        single = arr.dtype["real"] == np.float32 and cls in (None, "single")
        out_c = np.empty(arr.shape, np.complex64 if single else np.complex128)
        out_c.real, out_c.imag = arr["real"], arr["imag"]
        return out_c
    if cls == "logical":
        arr = arr.astype(bool)
    elif cls in _H5_DTYPES:
        arr = arr.astype(_H5_DTYPES[cls], copy=False)
    return arr.item() if arr.size == 1 else arr


def _h5_read_empty(ctx: _H5Reader, ds: Any, cls: str | None, mpath: str) -> Any:
    data = ctx.read(ds, mpath)
    if data.dtype.kind not in "iu" or data.size > 32:
        raise ctx.fail(mpath, "empty array whose dimensions are not a short integer vector")
    shape = tuple(int(s) for s in data.ravel()[::-1]) if data.size else (0, 0)
    numel = int(np.prod(shape, dtype=object))
    if any(s < 0 or s >= 2**31 for s in shape) or (numel and cls != "struct"):
        raise ctx.fail(mpath, f"empty array declares dimensions {shape}")
    if cls == "struct":  # no data: no fields (MATLAB writes a 1x1 struct() this way), or 0 elements
        ctx.charge(numel * matscan.OBJECT_OVERHEAD, mpath)
        items: list[dict] = [{} for _ in range(numel)]
        return items[0] if numel == 1 else items
    if cls == "cell":
        return []
    if cls == "char":
        return ""
    return np.zeros(shape, dtype=_H5_DTYPES.get(cls or "", np.float64))


def _h5_struct(ctx: _H5Reader, group: Any, mpath: str, depth: int) -> Any:
    h5py = ctx.h5py
    names_attr = ctx.attr(group, "MATLAB_fields", mpath)
    if names_attr is not None:
        try:
            entries = np.asarray(names_attr).ravel()
            names = [b"".join(np.asarray(n, dtype="S1").ravel().tolist()) for n in entries]
        except Exception:
            raise ctx.fail(mpath, "MATLAB_fields is not a list of names") from None
    else:
        names = []
        for raw in group.id:
            ctx.charge(matscan.OBJECT_OVERHEAD, mpath)
            names.append(raw)
    members: list[tuple[str, Any]] = []
    for raw in names:
        label = raw.decode("utf-8", "replace")
        member = ctx.member(group, raw, f"{mpath}.{matscan._label(label)}")
        if member is not None:
            members.append((_fix_str(label), member))
    # a struct array: one classless dataset of references per field, all the same shape
    if members and all(
        isinstance(m, h5py.Dataset)
        and h5py.check_ref_dtype(m.dtype) is h5py.Reference
        and not ctx.has_attr(m, "MATLAB_class")
        for _, m in members
    ):
        shapes = {m.shape for _, m in members}
        if len(shapes) != 1:
            raise ctx.fail(mpath, f"struct array fields of different shapes {sorted(shapes)}")
        columns = []
        for key, m in members:
            at = f"{mpath}.{matscan._label(key)}"
            ctx.visit(m, at)
            ctx.check_dataset(m, at)
            columns.append(ctx.read(m, at).T.ravel(order="F"))
        n = columns[0].size
        ctx.charge(n * len(members) * (8 + matscan.OBJECT_OVERHEAD), mpath)
        items = []
        for i in range(n):
            item = {}
            for (key, _), col in zip(members, columns, strict=True):
                at = f"{mpath}({i + 1}).{matscan._label(key)}"
                item[key] = _from_h5(ctx, ctx.deref(col[i], at), at, depth + 1)
            items.append(item)
        return items[0] if n == 1 else items
    return {key: _from_h5(ctx, m, f"{mpath}.{matscan._label(key)}", depth + 1) for key, m in members}


def _h5_sparse(ctx: _H5Reader, group: Any, cls: str | None, mpath: str) -> Any:
    import scipy.sparse

    rows = ctx.attr(group, "MATLAB_sparse", mpath)
    try:
        m = int(np.asarray(rows).ravel()[0])
    except Exception:
        raise ctx.fail(mpath, "MATLAB_sparse is not a row count") from None
    parts = {}
    for key in ("jc", "ir", "data"):
        ds = ctx.member(group, key.encode(), f"{mpath}.{key}")
        if ds is None:
            continue
        if not isinstance(ds, ctx.h5py.Dataset):
            raise ctx.fail(mpath, f"sparse part {key} is not a dataset")
        ctx.visit(ds, f"{mpath}.{key}")
        ctx.check_dataset(ds, f"{mpath}.{key}")
        parts[key] = ctx.read(ds, f"{mpath}.{key}").ravel()
    if "jc" not in parts:
        raise ctx.fail(mpath, "sparse matrix without column starts (jc)")
    jc, ir, data = parts["jc"], parts.get("ir"), parts.get("data")
    n = jc.size - 1
    if m < 0 or n < 0 or jc.dtype.kind not in "iu" or (ir is not None and ir.dtype.kind not in "iu"):
        raise ctx.fail(mpath, "sparse matrix with invalid dimensions or index types")
    nnz = int(jc[-1]) if jc.size else 0
    if ir is None:
        ir = np.zeros(0, np.int64)
    if data is None:
        data = np.zeros(0, bool if cls == "logical" else np.float64)
    elif data.dtype.names is not None:
        real, imag = data["real"], data["imag"]
        data = real.astype(np.complex128)
        data.imag = imag
    elif cls == "logical":
        data = data.astype(bool)
    if nnz < 0 or nnz > min(ir.size, data.size) or np.any(jc.astype(np.int64) < 0):
        raise ctx.fail(
            mpath, f"sparse matrix declares {nnz} non-zeros for {ir.size} indices and {data.size} values"
        )
    ctx.charge(3 * (ir.nbytes + jc.nbytes + data.nbytes), mpath)
    try:
        mat = scipy.sparse.csc_matrix(
            (data[:nnz], ir[:nnz].astype(np.int64), jc.astype(np.int64)), shape=(m, n)
        )
    except Exception as err:
        raise ctx.fail(mpath, f"invalid sparse matrix ({_one_line(err)})") from None
    return _checked_sparse(mat, mpath, ctx.path, "v7.3 ")


_H5_DTYPES = {
    "double": np.float64,
    "single": np.float32,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "logical": bool,
}


# --------------------------------------------------------------------------- to Net


def _net_from_struct(s: Any, source: str) -> Net:
    if not isinstance(s, dict) or "layers" not in s:
        raise McnError(f"Expected {source} to be a simplenn net struct with a 'layers' field.")
    layers_raw = s["layers"]
    if isinstance(layers_raw, dict):  # a single layer stored as a struct, not a cell
        layers_raw = [layers_raw]
    if not isinstance(layers_raw, list):
        raise McnError(f"Expected {source}.layers to be a cell array of layer structs.")
    layers = []
    for i, raw in enumerate(layers_raw):
        if not isinstance(raw, dict) or "type" not in raw:
            raise McnError(f"{source}.layers{{{i + 1}}}: Expected a struct with a 'type' field.")
        fields = {}
        for key, value in raw.items():
            if key == "weights":
                value = [_as_weight(w) for w in _as_list(value)]
            elif key == "precious":
                try:
                    value = bool(np.asarray(value).any()) if np.size(value) else False
                except (ValueError, TypeError):
                    raise McnError(
                        f"{source}.layers{{{i + 1}}}.precious: Expected a logical value. "
                        f"Received {type(value).__name__}"
                    ) from None
            elif key == "opts":
                value = _as_list(value)
            fields[python_field(key)] = value
        layer_type = fields.pop("type")
        name = fields.pop("name", None)
        weights = fields.pop("weights", None)
        layers.append(Layer(layer_type, name, weights, **fields))
    meta = s.get("meta", {})
    if not isinstance(meta, dict):
        meta = {}
    return Net(layers, meta)


def _as_weight(w: Any) -> Any:
    """A weight as an array (1x1 numbers come back as Python numbers); sparse matrices,
    MATLAB objects and anything NumPy cannot stack are kept as they are, for the caller
    to refuse with its own message."""
    if isinstance(w, np.ndarray | MatlabObject) or _is_sparse(w):
        return w
    try:
        return np.asarray(w)
    except (ValueError, TypeError):
        return w


def _as_list(v: Any) -> list:
    if isinstance(v, list):
        return v
    if isinstance(v, np.ndarray) and v.size == 0:
        return []
    return [v]


def _find_net(variables: dict[str, Any], path: str) -> tuple[Net, dict[str, Any]]:
    if "net" in variables:
        return _net_from_struct(variables["net"], f"{path}: variable 'net'"), variables
    if "layers" in variables:
        return _net_from_struct(variables, path), variables
    names = ", ".join(sorted(list_variables(path))) or "none"
    raise McnError(
        f"Expected {path} to hold a MatConvNet simplenn net (a 'net' variable or 'layers' at top level). "
        f"Received variables: {names}"
    )


def load_net(path: str | os.PathLike) -> Net:
    """Load a simplenn net from a .mat file (v5/v7 or v7.3): a ``net`` variable, the
    struct's fields at top level, or a cnn_train checkpoint. The net is returned as
    stored (call ``vl_simplenn_tidy`` to fill MatConvNet's defaults)."""
    net, _ = _find_net(read_variables(path, NET_VARIABLES), str(path))
    return net


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a cnn_train checkpoint (``net-epoch-N.mat``): net, state (solverState) and
    stats (older cnn_train versions saved them as ``info``)."""
    variables = read_variables(path, CHECKPOINT_VARIABLES)
    net, _ = _find_net(variables, str(path))
    state = variables.get("state", {})
    stats = variables.get("stats", variables.get("info", {}))
    return Checkpoint(net, state if isinstance(state, dict) else {}, stats if isinstance(stats, dict) else {})


# --------------------------------------------------------------------------- writing


def _net_to_struct(net: Net) -> dict[str, Any]:
    layers = []
    for layer in net.layers:
        d: dict[str, Any] = {}
        for key, value in layer.fields():
            d[matlab_field(key)] = _cell(value) if key in ("weights", "opts") else value
        layers.append(d)
    return {"layers": _cell(layers), "meta": net.meta}


def _cell(items: list) -> np.ndarray:
    out = np.empty((1, len(items)) if items else (0, 0), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


def save_net(path: str | os.PathLike, net: Net, *, version: str = "7", variable: str | None = "net") -> None:
    """Save ``net`` as a MATLAB .mat file loadable by MatConvNet (``load(path)`` gives
    ``net``, or the fields at top level with ``variable=None``). ``version`` "7" (scipy,
    v5 format) or "7.3" (HDF5)."""
    if not isinstance(net, Net):
        raise McnError(f"Expected net to be a harness.mcn.Net. Received net={type(net).__name__}")
    if version not in ("7", "7.3"):
        raise McnError(f"Expected version '7' or '7.3'. Received version={version!r}")
    try:
        struct = _net_to_struct(net)
        variables = {variable: struct} if variable else struct
        if version == "7":
            import scipy.io

            scipy.io.savemat(str(path), variables, do_compression=True, oned_as="row")
        else:
            _write_hdf5(Path(path), variables)
    except McnError:
        raise
    except (TypeError, ValueError, IndexError, OverflowError) as err:  # a value MATLAB cannot hold
        raise McnError(
            f"Cannot save the net as a v{version} .mat file ({type(err).__name__}: {err}). "
            "Expected layers whose fields are numbers, arrays, strings, cells or structs."
        ) from None


def _write_hdf5(path: Path, variables: dict[str, Any]) -> None:
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        counter = [0]
        for key, value in variables.items():
            _h5_write(f, refs, counter, key, value)
    header = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {time.strftime('%c')} HDF5 schema 1.00 ."
    block = header.encode().ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM"
    with open(path, "r+b") as fh:
        fh.write(block.ljust(512, b"\x00"))


def _h5_write(parent: Any, refs: Any, counter: list[int], name: str, value: Any) -> Any:
    import h5py

    if isinstance(value, dict):
        g = parent.create_group(name)
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        names = np.empty(len(value), dtype=object)
        for n, k in enumerate(value):
            names[n] = np.array(list(k), dtype="S1")
        g.attrs.create("MATLAB_fields", names, dtype=h5py.vlen_dtype(np.dtype("S1")))
        for k, v in value.items():
            _h5_write(g, refs, counter, k, v)
        return g
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = list(value.ravel(order="F")) if value.size else []
    if isinstance(value, list | tuple):
        if not value:
            return _h5_empty(parent, name, "cell")
        ref_list = []
        for item in value:
            counter[0] += 1
            obj = _h5_write(refs, refs, counter, f"r{counter[0]}", item)
            ref_list.append(obj.ref)
        ds = parent.create_dataset(name, data=np.array([ref_list], dtype=h5py.ref_dtype).T)
        ds.attrs["MATLAB_class"] = np.bytes_("cell")
        return ds
    if isinstance(value, str):
        if not value:
            return _h5_empty(parent, name, "char")
        ds = parent.create_dataset(name, data=np.array([[ord(c)] for c in value], dtype=np.uint16))
        ds.attrs["MATLAB_class"] = np.bytes_("char")
        ds.attrs["MATLAB_int_decode"] = np.int32(2)
        return ds
    arr = np.asarray(value)
    if arr.dtype == bool:
        cls, arr = "logical", arr.astype(np.uint8)
    else:
        if arr.dtype.kind in "iu" and arr.ndim == 0:
            arr = arr.astype(np.float64)  # MATLAB numbers are doubles unless asked otherwise
        cls = {np.dtype(v): k for k, v in _H5_DTYPES.items() if k != "logical"}.get(arr.dtype)
        if cls is None:
            raise McnError(f"Expected numeric, string, list or dict values. Received {name}={value!r}")
    if arr.ndim < 2:
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr.reshape(1, 1)
    if arr.size == 0:
        return _h5_empty(parent, name, cls, arr.shape)
    ds = parent.create_dataset(name, data=arr.T)
    ds.attrs["MATLAB_class"] = np.bytes_(cls)
    if cls == "logical":
        ds.attrs["MATLAB_int_decode"] = np.int32(1)
    return ds


def _h5_empty(parent: Any, name: str, cls: str, shape: tuple = (0, 0)) -> Any:
    ds = parent.create_dataset(name, data=np.array(shape[::-1], dtype=np.uint64))
    ds.attrs["MATLAB_class"] = np.bytes_(cls)
    ds.attrs["MATLAB_empty"] = np.uint8(1)
    return ds
