"""What leaves the harness as text: names made safe for a terminal, strict JSON, and
report files written whole or not at all.

Names come from files the user did not necessarily write (a .mat file, a .keras file):
they may carry terminal escape sequences, newlines that forge report lines, or lone
UTF-16 surrogates that no encoder accepts. Every name printed goes through
``safe_text``; every JSON document goes through ``json_dumps`` (JSON has no NaN or
Infinity: non-finite numbers are written as null); every report file through
``write_atomic``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["clean_text", "json_dumps", "json_safe", "safe_text", "write_atomic"]


def safe_text(text: Any) -> str:
    """``text`` as one printable line: control characters (escape sequences, newlines,
    carriage returns), lone surrogates and other unprintable characters become '?'."""
    return "".join(ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else "?" for ch in str(text))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (Python or NumPy) replaced by None, NumPy
    scalars and arrays turned into Python numbers and lists, tuples into lists, and
    strings cleared of lone surrogates; dict keys become strings."""
    import numpy as np

    if isinstance(value, dict):
        return {clean_text(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, complex):
        return json_safe([value.real, value.imag])
    if isinstance(value, str):
        return _clean(value)
    return _clean(str(value))


def clean_text(value: Any) -> str:
    """``str(value)`` with lone surrogates (which no UTF-8 writer accepts) as U+FFFD."""
    return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in str(value))


_clean = clean_text


def json_dumps(value: Any, indent: int | None = 2) -> str:
    """Strict JSON (RFC 8259): no NaN/Infinity tokens; non-finite numbers are null."""
    return json.dumps(json_safe(value), indent=indent, sort_keys=True, allow_nan=False)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole: a temporary file in the same folder,
    then a rename. An existing file is untouched if anything fails before the rename."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
