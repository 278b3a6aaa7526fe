"""Reading MATLAB v5/v7 .mat files: scipy.io.loadmat, after ``matscan`` has checked
every byte it will read, and the conversion of what scipy returns (the rules are at the
top of harness.mcn.matfile)."""

from __future__ import annotations

import codecs
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from harness.mcn import matscan
from harness.mcn.mat_v5_streams import SegmentReader
from harness.mcn.mat_values import (
    MatlabObject,
    checked_sparse,
    fix_str,
    is_sparse,
    one_line,
    safe_label,
    unreadable,
)
from harness.mcn.options import McnError

__all__ = ["read_v5", "v5_variable_names"]

# scipy decodes miUINT16 char data with ``uint16_codec``; its default (the system codec,
# UTF-8) keeps only the low byte of each unit. This codec maps each UTF-16 unit to one
# code point (lone surrogates included, so the lengths match the declared dimensions);
# fix_str then pairs them up.
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


def v5_variable_names(path: str | Path) -> list[str]:
    """Names of the top-level variables of a v5 file, without reading any of them."""
    scan = matscan.scan_v5(path, wanted=())
    return [v.name for v in scan.variables if v.name and not v.name.startswith("__")]


def read_v5(path: Path, wanted: frozenset[str] | None) -> dict[str, Any]:
    import scipy.io

    spath = str(path)
    scan = matscan.scan_v5(spath, wanted)  # every check happens here, before scipy
    chosen = [v for v in scan.variables if v.selected]
    to_scipy = [v for v in chosen if v.scanned]
    raw: dict[str, Any] = {}
    if to_scipy:
        segments = [(v.offset, v.size) for v in to_scipy]
        try:
            with SegmentReader(spath, scan.clean_header(), segments) as stream:
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
            raise unreadable(spath, one_line(err)) from None
        for w in caught:
            if "Unreadable variable" in str(w.message):
                raise unreadable(spath, " ".join(str(w.message).split())[:300])
    out: dict[str, Any] = {}
    for v in chosen:
        name = fix_str(v.name)
        if not v.scanned:  # function handle or MCOS object at top level: never parsed
            out[name] = MatlabObject(v.class_name)
        elif v.name not in raw:
            raise unreadable(spath, f"{safe_label(v.name)}: scipy did not return the variable")
        else:
            try:
                out[name] = _from_scipy(raw[v.name], safe_label(v.name), spath)
            except McnError:
                raise
            except Exception as err:  # scipy returned something unexpected
                raise unreadable(spath, f"{safe_label(v.name)}: {one_line(err)}") from None
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
                items.append({fix_str(n): _from_scipy(e[n], f"{at}.{safe_label(n)}", path) for n in names})
            return items[0] if v.size == 1 else items
        if v.dtype == object:
            if v.size and all(e is None for e in v.flat):  # scipy's struct without fields
                empty: list[dict] = [{} for _ in range(v.size)]
                return empty[0] if v.size == 1 else empty
            return [_from_scipy(e, f"{mpath}{{{i + 1}}}", path) for i, e in enumerate(v.ravel(order="F"))]
        if v.dtype.kind == "U":
            return fix_str("".join(v.ravel().tolist())) if v.size else ""
        if v.dtype.kind == "c":
            return v  # complex stays an array, whatever its size, so callers can refuse it
        if v.size == 1:
            return v.item()
        return v
    if is_sparse(v):
        return checked_sparse(v, mpath, path, "")
    return v


def _opaque_class(v: Any) -> str:
    try:
        cls = v.ravel()[0]["s2"]
        cls = cls.item() if isinstance(cls, np.ndarray) else cls
        return cls.decode("latin1") if isinstance(cls, bytes) else str(cls)
    except Exception:
        return "opaque"
