"""Argument normalisation and validation shared by the MatConvNet reference.

Every public function of ``harness.mcn`` accepts MatConvNet's option forms
(scalars or short vectors) and turns them into tuples here, so that each op
validates its arguments the same way and names the bad one in its error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "McnError",
    "MAX_NESTING",
    "as_4d",
    "check_budget",
    "format_bytes",
    "memory_budget",
    "float_dtype",
    "is_empty",
    "pad4",
    "pair",
    "positive_integer",
]


class McnError(ValueError):
    """Bad input to the reference: the message names the argument (or layer and field)."""


# Deepest nesting of structs and cells a .mat file may hold (a real net needs about 6:
# net.layers{i}.weights{j}, net.meta.normalization.averageImage ...).
MAX_NESTING = 32

DEFAULT_MEMORY_BUDGET = 4 * 2**30
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def memory_budget() -> int:
    """Bytes any one load or run may allocate: ``MCN_HARNESS_MEMORY_BUDGET`` (a number of
    bytes, or with a K/M/G/T suffix: ``8G``), else 4 GiB. Work above it is refused up front
    with an McnError instead of exhausting the machine."""
    import os

    raw = os.environ.get("MCN_HARNESS_MEMORY_BUDGET", "").strip().upper().removesuffix("B")
    if not raw:
        return DEFAULT_MEMORY_BUDGET
    unit = raw[-1] if raw[-1] in _UNITS and not raw[-1].isdigit() else ""
    try:
        value = float(raw[: len(raw) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise McnError(
            f"Expected MCN_HARNESS_MEMORY_BUDGET to be a size such as 8G or 1073741824. Received {raw!r}"
        ) from None
    if not np.isfinite(value) or value <= 0:
        raise McnError(f"Expected MCN_HARNESS_MEMORY_BUDGET > 0. Received {raw!r}")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_budget(nbytes: float, what: str) -> None:
    """Refuse (McnError naming ``what``) work whose memory exceeds ``memory_budget()``."""
    budget = memory_budget()
    if not nbytes <= budget:  # also refuses NaN
        raise McnError(
            f"{what}: needs {format_bytes(nbytes)}, above the memory budget of {format_bytes(budget)} "
            "(set MCN_HARNESS_MEMORY_BUDGET to raise it)"
        )


def is_empty(a: Any) -> bool:
    """MATLAB's ``isempty``: None or an array with no elements."""
    return a is None or np.size(a) == 0


def float_dtype(x: np.ndarray, name: str = "x") -> np.dtype:
    """The floating dtype of ``x`` (float32 or float64); the input decides the precision."""
    dt = np.asarray(x).dtype
    if dt not in (np.float32, np.float64):
        raise McnError(f"Expected {name} to be float32 or float64. Received {name}.dtype={dt}")
    return dt


def as_4d(x: Any, name: str = "x", dtype: np.dtype | None = None) -> np.ndarray:
    """Restore MATLAB's dropped trailing singleton dimensions: H x W x C x N.

    MATLAB stores an ``H x W x C x 1`` array as 3-D; adding trailing size-1 axes never
    reorders elements. More than four dimensions is an error naming ``name``.
    """
    a = np.asarray(x)
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    if a.ndim > 4:
        raise McnError(
            f"Expected {name} to have at most 4 dimensions (H x W x C x N). Received {name}.shape={a.shape}"
        )
    return a.reshape(a.shape + (1,) * (4 - a.ndim))


_NUMBERS = (int, float)


def _ints(value: Any, name: str) -> tuple[int, ...]:
    # The common forms first (a Python int, a short real ndarray or list of numbers), in
    # plain Python: the general path costs tens of microseconds, paid per layer and pass.
    if type(value) is int:
        return (value,)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf" and 0 < value.size <= 4:
        items = value.ravel().tolist()
    elif isinstance(value, list | tuple) and 0 < len(value) <= 4 and all(type(v) in _NUMBERS for v in value):
        items = list(value)
    else:
        items = None
    if items is not None:
        if not all(math.isfinite(v) and v == round(v) for v in items):
            raise _not_integers(name, value)
        return tuple(int(v) for v in items)
    if isinstance(value, str | dict) or np.iscomplexobj(value):
        raise _not_integers(name, value)
    try:
        arr = np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):
        raise McnError(
            f"Expected {name} to be integers. Received {name} of type {type(value).__name__}"
        ) from None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise _not_integers(name, value)
    return tuple(int(v) for v in arr)


def _not_integers(name: str, value: Any) -> McnError:
    return McnError(f"Expected {name} to be integers. Received {name}={value!r}")


def pair(value: Any, name: str, minimum: int = 1) -> tuple[int, int]:
    """A MatConvNet ``[Y X]`` option (stride, dilate, pool, upsample): scalar or two values."""
    v = _ints(value, name)
    if len(v) == 1:
        v = (v[0], v[0])
    if len(v) != 2:
        raise McnError(f"Expected {name} to be a scalar or [Y X]. Received {name}={value!r}")
    if min(v) < minimum:
        raise McnError(f"Expected {name} >= {minimum}. Received {name}={value!r}")
    return v  # type: ignore[return-value]


def positive_integer(value: Any, name: str) -> int:
    """A MatConvNet count option (``numGroups``): one integer >= 1."""
    if np.size(value) != 1:
        raise McnError(f"Expected {name} to be a positive integer. Received {name}={value!r}")
    return pair(value, name)[0]


def pad4(value: Any, name: str = "pad") -> tuple[int, int, int, int]:
    """A MatConvNet ``[TOP BOTTOM LEFT RIGHT]`` option (pad, crop): scalar or four values."""
    v = _ints(value, name)
    if len(v) == 1:
        v = v * 4
    if len(v) != 4:
        raise McnError(
            f"Expected {name} to be a scalar or [TOP BOTTOM LEFT RIGHT]. Received {name}={value!r}"
        )
    if min(v) < 0:
        raise McnError(f"Expected {name} >= 0. Received {name}={value!r}")
    return v  # type: ignore[return-value]
