"""Iterative pre-scanner for MATLAB v5 (``-v6``/``-v7``) .mat files.

scipy.io.loadmat trusts the file: a cell nested 20,000 deep overflows its (C) stack, a
data element with an unknown type code makes it dereference a null pointer, a header
declaring 2^31 x 2^31 elements makes it allocate before it notices the data is missing.
``scan_v5`` walks the same bytes scipy will read, without recursion and without
allocating anything the file declares, and refuses (McnError naming the file and the
MATLAB path of the value) anything scipy would mis-handle, anything nested deeper than
``MAX_NESTING`` and anything whose declared sizes exceed ``memory_budget()``. Only the
top-level variables asked for are walked; the others are skipped by their element
length (a compressed one is decompressed only as far as its name). ``SegmentReader``
(harness.mcn.mat_v5_streams, with the byte sources the scanner reads) then hands scipy a
stream made of a clean header and the scanned variables only, so scipy never sees a byte
that was not checked.

Format (MATLAB "MAT-File Format", and scipy/io/matlab/_mio5*.py which this follows):
a 128-byte header (text, subsystem offset, version 0x0100, endian indicator ``IM``),
then data elements: an 8-byte tag (type, byte count; a "small data element" packs the
count into the upper 16 bits of the first word and up to 4 bytes of data in the second)
and the data padded to 8 bytes. Top-level elements are miMATRIX (14) or miCOMPRESSED
(15, a zlib stream holding one miMATRIX). A miMATRIX holds the array flags, the
dimensions, the name, then per class: numeric/char data (real, imaginary); sparse ir,
jc, pr (pi); a cell's elements; a struct's field-name length, field names and one
miMATRIX per field per element (objects put a class name first); a function handle one
miMATRIX; an opaque (MCOS) object three int8 strings and one miMATRIX.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

from harness.mcn.mat_v5_streams import FileSource, Malformed, MalformedAt, ZlibSource
from harness.mcn.mat_values import safe_label, unreadable
from harness.mcn.options import MAX_NESTING, check_budget, memory_budget

__all__ = ["OBJECT_OVERHEAD", "V5Scan", "V5Variable", "read_v5_header", "scan_v5"]

# data types (mi*) and array classes (mx*)
miINT8, miUINT8, miINT16, miUINT16, miINT32, miUINT32 = 1, 2, 3, 4, 5, 6
miMATRIX, miCOMPRESSED, miUTF8, miUTF16, miUTF32 = 14, 15, 16, 17, 18
mxCELL, mxSTRUCT, mxOBJECT, mxCHAR, mxSPARSE = 1, 2, 3, 4, 5
mxFUNCTION, mxOPAQUE = 16, 17

# types scipy reads numeric data from (bytes per element); anything else makes its
# reader index an unset dtype table entry
_NUMERIC_MI = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
# types scipy decodes char data from (bytes per character unit)
_CHAR_MI = {miINT8: 1, miUINT8: 1, miUINT16: 2, miUTF8: 1, miUTF16: 2, miUTF32: 4}
CLASS_NAMES = {
    1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse", 6: "double", 7: "single",
    8: "int8", 9: "uint8", 10: "int16", 11: "uint16", 12: "int32", 13: "uint32",
    14: "int64", 15: "uint64", 16: "function_handle", 17: "opaque",
}  # fmt: skip
_CLASS_ITEMSIZE = {6: 8, 7: 4, 8: 1, 9: 1, 10: 2, 11: 2, 12: 4, 13: 4, 14: 8, 15: 8}

# Bytes charged against the memory budget for every array the file holds, on top of
# its data: a NumPy array object plus the dict/list/number it is converted to. Cells and
# structs are charged for all their elements up front, so a cell declaring 10^9 empty
# elements is refused before any of them is read.
OBJECT_OVERHEAD = 128
MAX_NAME_BYTES = 4096  # variable and class names (MATLAB allows 63 characters)
MAX_FIELD_NAME_LENGTH = 4096  # per field (MATLAB writes 32 or 64)
MAX_FIELD_NAMES_BYTES = 1 << 22
# scipy compares every field name with every earlier one (to rename duplicates): a
# struct declaring 10^6 one-byte field names would keep it busy for hours.
MAX_FIELDS = 16384


# --------------------------------------------------------------------------- results


@dataclass
class V5Variable:
    """One top-level element of a v5 file."""

    name: str
    offset: int  # file offset of the element's tag
    size: int  # bytes of the whole element (tag included)
    compressed: bool
    mclass: int
    class_name: str  # MATLAB class: "double", "struct", "function_handle", "gpuArray" ...
    dims: tuple[int, ...] | None
    selected: bool = False  # wanted (first of its name): to be returned
    scanned: bool = False  # walked completely (selected, and neither function handle nor object)
    nbytes: int = 0  # memory charged for it (scanned variables only)


@dataclass
class V5Scan:
    path: str
    byte_order: str  # "<" or ">"
    version: int
    variables: list[V5Variable] = field(default_factory=list)
    total_bytes: int = 0  # memory charged for the scanned variables

    def clean_header(self) -> bytes:
        """A header scipy reads as v5 with this file's byte order (the original text and
        subsystem offset are not needed and are not passed on)."""
        text = b"MATLAB 5.0 MAT-file, checked by harness.mcn.matscan".ljust(116, b" ")
        return (
            text
            + b"\x00" * 8
            + struct.pack(self.byte_order + "H", 0x0100)
            + (b"IM" if self.byte_order == "<" else b"MI")
        )


@dataclass
class _Header:
    end: int  # source position just after the matrix
    mclass: int
    is_complex: bool
    dims: tuple[int, ...] | None
    name: str
    class_name: str  # for opaque: the MCOS class name


@dataclass
class _Frame:
    kind: str  # cell, struct, function, opaque
    mpath: str
    depth: int
    end: int
    remaining: int
    count: int = 0  # children read so far
    fields: tuple[str, ...] = ()  # struct field names (or the object class), as labels
    numel: int = 1


# --------------------------------------------------------------------------- scanner


class _Scanner:
    def __init__(self, path: str, byte_order: str):
        self.path = path
        self.e = byte_order
        self.total = 0
        self.budget = memory_budget()

    def charge(self, nbytes: int, mpath: str) -> None:
        self.total += nbytes
        if self.total > self.budget:
            check_budget(self.total, f"{self.path}: {mpath}")

    # ---- elements

    def tag(self, src: Any, limit: int) -> tuple[int, int, bytes | None]:
        """A data element tag: (type, byte count, small-element data or None)."""
        if src.pos + 8 > limit:
            raise Malformed("element tag overruns its enclosing matrix")
        w0, w1 = struct.unpack(self.e + "II", src.read(8))
        if w0 >> 16:  # small data element
            count = w0 >> 16
            if count > 4:
                raise Malformed(f"small data element declares {count} bytes (at most 4)")
            raw = struct.pack(self.e + "I", w1)
            return w0 & 0xFFFF, count, raw[:count]
        return w0, w1, None

    def data(self, src: Any, limit: int, count: int, small: bytes | None, keep: bool) -> bytes:
        if small is not None:
            return small
        padded = count + (-count % 8)
        if src.pos + padded > limit:
            raise Malformed(f"data element of {count} bytes overruns its enclosing matrix")
        if not keep:
            src.skip(padded)
            return b""
        out = src.read(count)
        src.skip(padded - count)
        return out

    def int8_string(self, src: Any, limit: int, what: str, cap: int = MAX_NAME_BYTES) -> bytes:
        mdtype, count, small = self.tag(src, limit)
        if mdtype not in (miINT8, miUTF8):
            raise Malformed(f"{what}: expected an int8 string (type 1), found type {mdtype}")
        if count > cap:
            raise Malformed(f"{what}: {count} bytes long (at most {cap})")
        raw = self.data(src, limit, count, small, True)
        if mdtype == miUTF8 and not raw.isascii():
            raise Malformed(f"{what}: non-ASCII characters")
        return raw

    def int32s(self, src: Any, limit: int, what: str, max_count: int) -> tuple[int, ...]:
        mdtype, count, small = self.tag(src, limit)
        if mdtype not in (miINT32, miUINT32):
            raise Malformed(f"{what}: expected int32 values (type 5), found type {mdtype}")
        if count % 4 or count > 4 * max_count:
            raise Malformed(f"{what}: {count} bytes (a multiple of 4, at most {4 * max_count})")
        raw = self.data(src, limit, count, small, True)
        values = struct.unpack(f"{self.e}{count // 4}i", raw)
        if any(v < 0 for v in values):
            raise Malformed(f"{what}: negative value {min(values)}")
        return values

    def numeric(self, src: Any, limit: int, what: str, numel: int | None, mpath: str) -> int:
        """Skip one numeric data element; returns its byte count (charged)."""
        mdtype, count, small = self.tag(src, limit)
        if mdtype not in _NUMERIC_MI:
            raise Malformed(f"{what}: data type {mdtype} is not numeric")
        if numel is not None and count != numel * _NUMERIC_MI[mdtype]:
            raise Malformed(
                f"{what}: {count} bytes of type {mdtype} for {numel} elements "
                f"(expected {numel * _NUMERIC_MI[mdtype]})"
            )
        self.charge(count, mpath)
        self.data(src, limit, count, small, False)
        return count

    # ---- matrices

    def header(self, src: Any, limit: int, mpath: str, depth: int) -> _Header | None:
        """Read a miMATRIX tag and its header (flags, dims, name); None for an empty one."""
        if src.pos + 8 > limit:
            raise Malformed("matrix tag overruns its enclosing matrix")
        mdtype, count = struct.unpack(self.e + "II", src.read(8))
        if mdtype != miMATRIX:
            raise Malformed(f"expected a matrix element (type 14), found type {mdtype}")
        end = src.pos + count
        if end > limit:
            raise Malformed(f"matrix of {count} bytes overruns its enclosing element")
        if count == 0:
            return None
        if depth > MAX_NESTING:
            raise Malformed(f"nested deeper than {MAX_NESTING} levels (MAX_NESTING)")
        if src.pos + 16 > end:
            raise Malformed("matrix too short for its array flags")
        ftype, fcount, flags, _nzmax = struct.unpack(self.e + "IIII", src.read(16))
        if ftype not in (miUINT32, miINT32) or fcount != 8:
            raise Malformed(f"bad array flags element (type {ftype}, {fcount} bytes)")
        mclass = flags & 0xFF
        is_complex = bool(flags >> 11 & 1)
        if mclass not in CLASS_NAMES:
            raise Malformed(f"unknown MATLAB array class {mclass}")
        if mclass == mxOPAQUE:
            name = self.int8_string(src, end, "name")
            self.int8_string(src, end, "type system")
            cls = self.int8_string(src, end, "class name")
            return _Header(end, mclass, False, None, name.decode("latin1"), cls.decode("latin1"))
        dims = self.int32s(src, end, "dimensions", 32)
        if len(dims) < 2:
            raise Malformed(f"{len(dims)} dimensions (MATLAB arrays have at least 2)")
        name = self.int8_string(src, end, "name")
        return _Header(end, mclass, is_complex, dims, name.decode("latin1"), CLASS_NAMES[mclass])

    def body(self, src: Any, h: _Header, mpath: str, depth: int) -> _Frame | None:
        """Walk a matrix's contents after its header: leaves completely (returns None),
        containers up to their first child (returns the frame that walks the children)."""
        end, mc = h.end, h.mclass
        numel = 1
        for d in h.dims or ():
            numel *= d
        if mc in _CLASS_ITEMSIZE:
            for part in ("real part", "imaginary part") if h.is_complex else ("data",):
                self.numeric(src, end, part, numel, mpath)
            if h.is_complex:  # scipy builds a complex copy
                self.charge(numel * 16, mpath)
        elif mc == mxCHAR:
            mdtype, count, small = self.tag(src, end)
            if mdtype not in _CHAR_MI:
                raise Malformed(f"char data of type {mdtype}")
            unit = _CHAR_MI[mdtype]
            if count and mdtype != miUTF8 and count != numel * unit:
                raise Malformed(f"char data of {count} bytes for {numel} characters")
            self.charge(count + numel * 12, mpath)  # the decoded str and the U1 array
            raw = self.data(src, end, count, small, mdtype == miUTF8)
            if count and mdtype == miUTF8:
                chars = len(raw.decode("utf-8", "replace"))
                if chars < numel:  # scipy's reader would fail ("buffer is too small")
                    raise Malformed(
                        f"UTF-8 char data holds {chars} characters for {numel} declared "
                        "(characters outside the Basic Multilingual Plane are not supported in v5 files)"
                    )
        elif mc == mxSPARSE:
            if len(h.dims or ()) != 2:
                raise Malformed("sparse array with more than 2 dimensions")
            nbytes = self.numeric(src, end, "row indices (ir)", None, mpath)
            nbytes += self.numeric(src, end, "column starts (jc)", None, mpath)
            for part in ("real part", "imaginary part") if h.is_complex else ("data",):
                nbytes += self.numeric(src, end, part, None, mpath)
            self.charge(nbytes * 2, mpath)  # csc conversion copies
        elif mc == mxCELL:
            self.charge(numel * (8 + OBJECT_OVERHEAD), mpath)
            return _Frame("cell", mpath, depth, end, numel, numel=numel)
        elif mc in (mxSTRUCT, mxOBJECT):
            if mc == mxOBJECT:
                self.int8_string(src, end, "class name")
            (namelength,) = self.int32s(src, end, "field name length", 1) or (0,)
            if not 1 <= namelength <= MAX_FIELD_NAME_LENGTH:
                raise Malformed(f"field name length {namelength} (1 to {MAX_FIELD_NAME_LENGTH})")
            raw = self.int8_string(src, end, "field names", MAX_FIELD_NAMES_BYTES)
            if len(raw) % namelength:
                raise Malformed(f"{len(raw)} bytes of field names is not a multiple of {namelength}")
            if len(raw) // namelength > MAX_FIELDS:
                raise Malformed(f"{len(raw) // namelength} fields (at most {MAX_FIELDS})")
            names = []
            for i in range(0, len(raw), namelength):
                slot = raw[i : i + namelength]
                if b"\x00" not in slot:
                    raise Malformed(f"field name {len(names) + 1} is not NUL-terminated")
                try:
                    names.append(slot[: slot.index(b"\x00")].decode("utf-8"))
                except UnicodeDecodeError:
                    raise Malformed(f"field name {len(names) + 1} is not UTF-8") from None
            self.charge(numel * (len(names) * (8 + OBJECT_OVERHEAD) + OBJECT_OVERHEAD), mpath)
            labels = tuple(safe_label(n) for n in names)
            return _Frame("struct", mpath, depth, end, numel * len(names), fields=labels, numel=numel)
        elif mc == mxFUNCTION:
            return _Frame("function", mpath, depth, end, 1)
        elif mc == mxOPAQUE:
            return _Frame("opaque", mpath, depth, end, 1, fields=(safe_label(h.class_name),))
        if src.pos != end:
            raise Malformed(f"{end - src.pos} unexpected bytes at the end of the matrix")
        return None

    def child_path(self, fr: _Frame) -> str:
        i = fr.count
        if fr.kind == "cell":
            return f"{fr.mpath}{{{i + 1}}}"
        if fr.kind == "struct":
            name = fr.fields[i % len(fr.fields)]
            return f"{fr.mpath}.{name}" if fr.numel == 1 else f"{fr.mpath}({i // len(fr.fields) + 1}).{name}"
        if fr.kind == "opaque":
            return f"{fr.mpath}<{fr.fields[0]} object data>"
        return f"{fr.mpath}<function handle data>"

    def walk(self, src: Any, h: _Header, mpath: str) -> None:
        """Walk a top-level matrix whose header was read, iteratively (explicit stack)."""
        stack: list[_Frame] = []
        where = mpath
        try:
            top = self.body(src, h, mpath, 0)
            if top is not None:
                stack.append(top)
            while stack:
                fr = stack[-1]
                if fr.remaining == 0:
                    where = fr.mpath
                    if src.pos != fr.end:
                        raise Malformed(
                            f"contents end {fr.end - src.pos:+d} bytes away from the declared matrix end"
                        )
                    stack.pop()
                    continue
                where = self.child_path(fr)
                fr.remaining -= 1
                fr.count += 1
                ch = self.header(src, fr.end, where, fr.depth + 1)
                if ch is None:
                    continue  # empty matrix: charged with its parent
                child = self.body(src, ch, where, fr.depth + 1)
                if child is not None:
                    stack.append(child)
        except Malformed as err:
            raise MalformedAt(f"{where}: {err.args[0]}") from None


# --------------------------------------------------------------------------- entry point


def read_v5_header(path: str, head: bytes) -> tuple[str, int]:
    """(byte order, version) of a v5 header, or McnError."""
    if len(head) < 128:
        raise unreadable(path, f"truncated: {len(head)} bytes, shorter than the 128-byte header")
    endian = head[126:128]
    if endian not in (b"IM", b"MI"):
        raise unreadable(
            path,
            "header: no MATLAB v5 endian indicator 'IM' at byte 126 "
            "(not a v5/v7 or v7.3 MAT-file; MATLAB v4 files are not supported)",
        )
    order = "<" if endian == b"IM" else ">"
    (version,) = struct.unpack(order + "H", head[124:126])
    if version != 0x0100:
        raise unreadable(path, f"header: version 0x{version:04x} (expected 0x0100 for v5/v7)")
    return order, version


def scan_v5(path: str | os.PathLike, wanted: Any = None) -> V5Scan:
    """Scan a v5 .mat file. Every top-level element's header is checked and listed;
    the variables named in ``wanted`` (all when None; the first of duplicates) are walked
    completely: nesting depth, every tag and size, and the memory they declare
    (cumulative, against ``memory_budget()``). Raises McnError naming the file and the
    MATLAB path of the first problem."""
    spath = str(path)
    want = None if wanted is None else set(wanted)
    try:
        fh = open(spath, "rb")
    except OSError as err:
        raise unreadable(spath, f"cannot open: {err.strerror}") from None
    with fh:
        fsize = os.fstat(fh.fileno()).st_size
        order, version = read_v5_header(spath, fh.read(128))
        scan = V5Scan(spath, order, version)
        sc = _Scanner(spath, order)
        seen: set[str] = set()
        pos = 128
        while pos < fsize:
            where = f"top-level element at byte {pos}"
            try:
                if fsize - pos < 8:
                    raise Malformed(f"truncated: {fsize - pos} stray bytes at the end of the file")
                fh.seek(pos)
                mdtype, count = struct.unpack(order + "II", fh.read(8))
                end = pos + 8 + count
                if count == 0:
                    raise Malformed("empty element")
                if end > fsize:
                    raise Malformed(f"truncated: declares {count} bytes, the file has {fsize - pos - 8} left")
                if mdtype == miCOMPRESSED:
                    src: Any = ZlibSource(fh, pos + 8, count)
                    limit = 8 + 2**32
                elif mdtype == miMATRIX:
                    src = FileSource(fh, pos, end)
                    limit = 8 + count
                else:
                    raise Malformed(f"element type {mdtype} (expected 14 matrix or 15 compressed)")
                h = sc.header(src, limit, where, 0)
                if h is None:
                    raise Malformed("empty matrix")
                where = safe_label(h.name) or "<unnamed variable>"
                var = V5Variable(
                    h.name, pos, 8 + count, mdtype == miCOMPRESSED, h.mclass, h.class_name, h.dims
                )
                take = (
                    h.name not in seen
                    and h.name
                    and not h.name.startswith("__")
                    and (want is None or h.name in want)
                )
                var.selected = bool(take)
                if take and h.mclass not in (mxFUNCTION, mxOPAQUE):
                    before = sc.total
                    src.lazy = False
                    sc.charge(OBJECT_OVERHEAD, where)
                    sc.walk(src, h, where)
                    if not src.exhausted():
                        raise Malformed("data after the matrix inside its element")
                    var.scanned, var.nbytes = True, sc.total - before
                seen.add(h.name)
                scan.variables.append(var)
            except MalformedAt as err:
                raise unreadable(spath, err.args[0]) from None
            except Malformed as err:
                raise unreadable(spath, f"{where}: {err.args[0]}") from None
            pos = end
        scan.total_bytes = sc.total
        return scan
