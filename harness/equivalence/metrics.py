"""The one comparison kernel: how far one tensor is from another, and where.

Both the layer comparison (``compare``) and the training comparison
(``compare_training``) measure through ``measure``. The rule for non-finite values is
the point of this module: a NaN or an Inf never compares equal to anything, on either
side, and never switches a check off.

- The difference of two elements is ``|got - ref|``, with NaN read as +Inf: a NaN on
  either side, an Inf against a finite value, and even Inf against Inf of the same sign
  (which IEEE arithmetic would call equal) all count as mismatches.
- The scale of the normwise error is taken from the finite elements only, so that one
  NaN cannot turn ``diff > tol * scale`` into ``diff > nan`` (always False).
- A reference that is not finite is not trusted: its elements are mismatches whatever
  the other side holds, and the counts on each side are returned so that the report can
  say which side went non-finite first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Measure", "measure", "nonfinite_summary", "nonfinite_weights"]


@dataclass
class Measure:
    ok: bool
    numel: int
    mismatches: int
    max_abs: float  # +inf when a non-finite element is involved
    max_rel: float
    scale: float
    worst: tuple[int, ...]  # index of the largest difference, in ``ref``'s shape
    ref_value: float
    got_value: float
    nonfinite_ref: int
    nonfinite_got: int

    def note(self) -> str:
        """What the non-finite counts mean, for the report ("" when all finite)."""
        parts = []
        if self.nonfinite_ref:
            parts.append(
                f"MatConvNet reference not finite ({self.nonfinite_ref} NaN/Inf: the net itself "
                "produces them, so this tensor cannot be vouched for)"
            )
        if self.nonfinite_got:
            parts.append(f"Keras not finite ({self.nonfinite_got} NaN/Inf)")
        return "; ".join(parts)


def measure(ref, got, tol: float, *, floor: float = 0.0, symmetric: bool = False) -> Measure:
    """Compare ``got`` with ``ref`` (same shape, any float dtype) elementwise.

    An element is a mismatch when ``|got - ref| > tol * scale`` or when it is not finite
    on either side; ``scale`` is the largest finite ``|ref|`` (with ``symmetric``, the
    largest finite ``|got|`` too, so that zeros against non-zeros diverge), at least
    ``floor`` and 1e-300. Empty tensors compare equal.
    """
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"measure: shapes differ, {ref.shape} vs {got.shape}")
    if ref.size == 0:
        return Measure(True, 0, 0, 0.0, 0.0, 0.0, (), 0.0, 0.0, 0, 0)
    fin_ref = np.isfinite(ref)
    fin_got = np.isfinite(got)
    scale = float(np.max(np.abs(ref), where=fin_ref, initial=0.0))
    if symmetric:
        scale = max(scale, float(np.max(np.abs(got), where=fin_got, initial=0.0)))
    scale = max(scale, float(floor) if np.isfinite(floor) else 0.0, 1e-300)
    with np.errstate(invalid="ignore", over="ignore"):
        # NaN - NaN, Inf - Inf, x - NaN: never equal
        diff = np.where(fin_ref & fin_got, np.abs(got - ref), np.inf)
    bad = diff > tol * scale
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    max_abs = float(diff[worst])
    return Measure(
        ok=not bool(bad.any()),
        numel=int(ref.size),
        mismatches=int(bad.sum()),
        max_abs=max_abs,
        max_rel=max_abs / scale,
        scale=scale,
        worst=tuple(int(i) for i in worst),
        ref_value=float(ref[worst]),
        got_value=float(got[worst]),
        nonfinite_ref=int(ref.size - fin_ref.sum()),
        nonfinite_got=int(got.size - fin_got.sum()),
    )


def nonfinite_summary(values, name: str) -> str | None:
    """``"<name> holds 2 NaN, 1 Inf (first at index (0, 3))"`` or None when all finite."""
    a = np.asarray(values)
    if a.dtype.kind not in "fc" or a.size == 0:
        return None
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    nan = int(np.isnan(a).sum())
    inf = int(bad.sum()) - nan
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
    return f"{name} holds {nan} NaN, {inf} Inf (first at index {first})"


def nonfinite_weights(model) -> list[str]:
    """``nonfinite_summary`` of every variable of the Keras ``model`` that holds NaN or Inf."""
    out = []
    for v in model.weights:
        text = nonfinite_summary(np.asarray(v.numpy()), f"Keras variable '{getattr(v, 'path', v.name)}'")
        if text:
            out.append(text)
    return out
