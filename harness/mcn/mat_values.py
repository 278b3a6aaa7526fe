"""Values a .mat file holds that both readers share, and the failure they report.

``MatlabObject`` stands for what the harness cannot represent (function handles, MCOS and
old-style objects); ``fix_str`` makes MATLAB's UTF-16 char data valid text; sparse
matrices are checked before anyone indexes them; ``unreadable`` is the McnError of a file
that cannot be read, naming it.
"""

from __future__ import annotations

from typing import Any

from harness.mcn.options import McnError

__all__ = ["MatlabObject", "checked_sparse", "fix_str", "is_sparse", "one_line", "safe_label", "unreadable"]


class MatlabObject:
    """A MATLAB value the harness cannot represent, kept as its class name only: a
    function handle (``function_handle``), an MCOS object (``gpuArray``, ``string``,
    ``dagnn.DagNN`` ...) or an old-style class instance. Callers refuse it with a clear
    message; the loader never does."""

    __slots__ = ("matlab_class",)

    def __init__(self, matlab_class: str):
        self.matlab_class = fix_str(str(matlab_class)) or "object"

    def __repr__(self) -> str:
        return f"MatlabObject({self.matlab_class!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MatlabObject) and other.matlab_class == self.matlab_class

    def __hash__(self) -> int:
        return hash(("MatlabObject", self.matlab_class))


def fix_str(s: str) -> str:
    """MATLAB char data is UTF-16 code units: join surrogate pairs, replace lone
    surrogates with U+FFFD, so the result always encodes as UTF-8."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def safe_label(text: str, limit: int = 64) -> str:
    """A file-supplied name made safe for a one-line message."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    out = "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else "?" for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def unreadable(path: str, detail: str, kind: str = "") -> McnError:
    return McnError(f"Expected a readable MATLAB {kind}.mat file. Received path={path!r} ({detail})")


def is_sparse(v: Any) -> bool:
    import scipy.sparse

    return scipy.sparse.issparse(v)


def checked_sparse(v: Any, mpath: str, path: str, kind: str) -> Any:
    """A scipy.sparse.csc_matrix whose indices were checked (out-of-range indices would
    make later scipy operations read out of bounds)."""
    import scipy.sparse

    try:
        m = scipy.sparse.csc_matrix(v)
        m.check_format(full_check=True)
    except Exception as err:
        raise unreadable(path, f"{mpath}: invalid sparse matrix ({one_line(err)})", kind) from None
    return m
