"""Byte streams over a v5 .mat file: what ``matscan`` walks, and what scipy is handed.

``FileSource`` reads a byte range of the file and ``ZlibSource`` the decompressed bytes of
a miCOMPRESSED element, in bounded chunks (never the whole element at once); both raise
``Malformed`` where the file ends or the data is corrupt. ``SegmentReader`` is the file
scipy.io.loadmat reads instead of the real one: a clean header followed by the byte
ranges of the variables ``matscan`` checked.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import Any

__all__ = ["FileSource", "Malformed", "MalformedAt", "SegmentReader", "ZlibSource"]

_ZLIB_IN_CHUNK = (1 << 12, 1 << 16)  # first and largest compressed read
_ZLIB_OUT_CHUNK = 1 << 20
_SKIP_CHUNK = 1 << 20


class Malformed(Exception):
    """The bytes are not a valid MATLAB v5 file (reason in args[0]); the scanner turns it
    into an McnError naming the file and the MATLAB path."""


class MalformedAt(Malformed):
    """As Malformed, the reason already starting with the MATLAB path."""


class FileSource:
    """Bytes [start, end) of the file; ``pos`` counts from ``start``."""

    def __init__(self, fh: Any, start: int, end: int):
        self.fh, self.start, self.size, self.pos = fh, start, end - start, 0
        self.lazy = True  # unused: a file source reads only what it is asked for

    def read(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise Malformed(f"truncated: needs {n} bytes at offset {self.start + self.pos}")
        self.fh.seek(self.start + self.pos)
        data = self.fh.read(n)
        if len(data) != n:
            raise Malformed(f"truncated: file ends inside an element at offset {self.start + self.pos}")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise Malformed(f"truncated: needs {n} bytes at offset {self.start + self.pos}")
        self.pos += n

    def exhausted(self) -> bool:
        return self.pos == self.size


class ZlibSource:
    """The decompressed bytes of a miCOMPRESSED element, produced as a stream in bounded
    chunks (never the whole element at once); ``pos`` counts decompressed bytes."""

    def __init__(self, fh: Any, start: int, length: int):
        self.fh, self.next_in, self.left_in = fh, start, length
        self.dec = zlib.decompressobj()
        self.buf, self.bpos, self.pos = b"", 0, 0
        self.in_chunk = _ZLIB_IN_CHUNK[0]  # grows: reading a name costs a few KiB at most
        # While lazy, inflate only the bytes asked for: the header of a variable that is
        # then skipped is all that is ever decompressed of it.
        self.lazy = True

    def _produce(self, want: int) -> bytes:
        while True:
            if self.dec.eof:
                return b""
            data = self.dec.unconsumed_tail
            if not data and self.left_in > 0:
                self.fh.seek(self.next_in)
                data = self.fh.read(min(self.in_chunk, self.left_in))
                self.in_chunk = min(2 * self.in_chunk, _ZLIB_IN_CHUNK[1])
                if not data:
                    raise Malformed("truncated: file ends inside a compressed element")
                self.next_in += len(data)
                self.left_in -= len(data)
            try:
                out = self.dec.decompress(data, want if self.lazy else max(want, 1 << 16))
            except zlib.error as err:
                raise Malformed(f"corrupt compressed data ({err})") from None
            if out:
                return out
            if not data:
                return b""

    def _take(self, n: int, keep: bool) -> bytes:
        parts = []
        while n > 0:
            if self.bpos >= len(self.buf):
                self.buf, self.bpos = self._produce(min(n, _ZLIB_OUT_CHUNK)), 0
                if not self.buf:
                    raise Malformed("truncated: compressed element ends inside an element")
            k = min(n, len(self.buf) - self.bpos)
            if keep:
                parts.append(self.buf[self.bpos : self.bpos + k])
            self.bpos += k
            self.pos += k
            n -= k
        return b"".join(parts)

    def read(self, n: int) -> bytes:
        if self.bpos + n <= len(self.buf):  # the common case: a tag or header in the buffer
            out = self.buf[self.bpos : self.bpos + n]
            self.bpos += n
            self.pos += n
            return out
        return self._take(n, True)

    def skip(self, n: int) -> None:
        while n > 0:  # bounded steps: a huge skip never holds more than one chunk
            k = min(n, _SKIP_CHUNK)
            self._take(k, False)
            n -= k

    def exhausted(self) -> bool:
        if self.bpos < len(self.buf):
            return False
        self.buf, self.bpos = self._produce(1), 0
        return not self.buf


# --------------------------------------------------------------------------- for scipy


class SegmentReader(io.RawIOBase):
    """A read-only, seekable file made of ``head`` followed by byte ranges of the file
    at ``path``: what scipy.io.loadmat is given instead of the whole file."""

    def __init__(self, path: str | os.PathLike, head: bytes, segments: list[tuple[int, int]]):
        super().__init__()
        self._fh = open(path, "rb")
        self._parts: list[tuple[int, int, int | None, bytes]] = []  # (start, length, file offset, bytes)
        at = 0
        self._parts.append((0, len(head), None, head))
        at = len(head)
        for offset, length in segments:
            self._parts.append((at, length, offset, b""))
            at += length
        self._size = at
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = 0
        while n < len(view) and self._pos < self._size:
            for start, length, offset, data in self._parts:
                if start <= self._pos < start + length:
                    k = min(len(view) - n, start + length - self._pos)
                    if offset is None:
                        view[n : n + k] = data[self._pos - start : self._pos - start + k]
                    else:
                        self._fh.seek(offset + self._pos - start)
                        got = self._fh.readinto(view[n : n + k])
                        if not got:
                            return n
                        k = got
                    n += k
                    self._pos += k
                    break
        return n

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()
