"""Guarded access to a v7.3 (HDF5) .mat file: every object, attribute and dataset of an
untrusted file passes the checks here before HDF5 or h5py touches its contents.

``H5Reader`` holds one load's state: the memory charged against ``memory_budget()``, the
objects already converted (a second visit is a cycle or a shared object), and the checks:
hard links only (no soft or external links), objects inside the file, attribute and
dataset types exactly those MATLAB writes, no external or virtual storage, no filters but
deflate/shuffle/fletcher32 (plugins are shared libraries), compressed chunks bounded
before they are inflated, and the file's global heaps sound before HDF5 parses one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from harness.mcn.mat_values import fix_str, one_line, unreadable
from harness.mcn.options import McnError, check_budget, memory_budget

__all__ = ["H5Reader", "open_hdf5"]

# HDF5 filters read: deflate, shuffle, fletcher32 (MATLAB writes deflate only). Others
# (plugins above all: HDF5 loads them as shared libraries) are refused.
_H5_FILTERS = {1, 2, 3}
_DEFLATE_MAX_RATIO = 1032  # zlib cannot expand one byte into more


def open_hdf5(path: Path) -> tuple[Any, Any]:
    import h5py

    try:
        return h5py, h5py.File(path, "r")
    except Exception as err:
        raise unreadable(str(path), one_line(err), "v7.3 ") from None


class H5Reader:
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
        return unreadable(self.path, f"{mpath}: {reason}", "v7.3 ")

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
        return fix_str(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))

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
