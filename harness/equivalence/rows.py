"""The rows of a Report: one MatConvNet tensor measured against its Keras counterpart.

``measure_row`` compares element for element (``harness.equivalence.metrics.measure``);
the ``*_scale`` functions give the size of the rounding noise of a parameter derivative
that cancels to about zero (a bias or filter followed by bnorm, a gain followed by
another bnorm), which is what such a derivative is measured against.
"""

from __future__ import annotations

import numpy as np

from harness.equivalence.metrics import measure
from harness.equivalence.report import Row
from harness.mcn.options import as_4d
from harness.translate.weights import keras_index

__all__ = ["bias_scale", "filter_scale", "gain_scale", "measure_row"]


def measure_row(
    *,
    layer: str,
    type: str,
    keras: str,
    tensor: str,
    ref,
    got,
    tolerance: float,
    note: str = "",
    scale: float = 0.0,
    same_layout: bool = False,
) -> Row:
    """The Row of MatConvNet's ``ref`` against Keras' ``got`` (None: Keras has no such
    tensor), both in MatConvNet's layout (``same_layout``: a parameter compared in Keras'
    layout); ``scale`` is a floor for the relative error's denominator."""
    name = {"layer": layer, "type": type, "keras": keras, "tensor": tensor}
    ref = np.asarray(ref, dtype=np.float64)
    if got is None:
        return Row(**name, ok=False, numel=int(ref.size), mismatches=int(ref.size), note=note or "missing")
    got = np.asarray(got, dtype=np.float64)
    if ref.size == got.size and ref.shape != got.shape:
        # MatConvNet drops trailing singleton dimensions; compare element for element
        if ref.ndim != 4 or got.ndim != 4 or ref.shape[:3] != got.shape[:3]:
            got = got.reshape(ref.shape)
    if ref.shape != got.shape:
        return Row(
            **name,
            ok=False,
            numel=int(ref.size),
            mismatches=int(ref.size),
            note=f"shape mismatch: MatConvNet {ref.shape} (H x W x C x N) vs Keras {got.shape}",
        )
    m = measure(ref, got, tolerance, floor=scale)
    if m.numel == 0:
        return Row(**name, ok=True, numel=0, mismatches=0, tolerance=tolerance, note=note)
    worst = [int(i) for i in m.worst]
    if same_layout:
        keras_idx = list(worst)
    else:
        keras_idx = keras_index(worst) if ref.ndim == 4 else None
    return Row(
        **name,
        ok=m.ok,
        numel=m.numel,
        mismatches=m.mismatches,
        max_abs=m.max_abs,
        max_rel=m.max_rel,
        tolerance=tolerance,
        worst_index_mcn=worst,
        worst_index_keras=keras_idx,
        ref_value=m.ref_value,
        keras_value=m.got_value,
        note="; ".join(n for n in (note, m.note()) if n),
        nonfinite_ref=m.nonfinite_ref,
        nonfinite_keras=m.nonfinite_got,
    )


def bias_scale(dzdy: np.ndarray) -> float:
    """A bias derivative sums dzdy over H, W and N; where it cancels to ~0 (a bias
    followed by bnorm, whose output ignores it) both sides hold rounding noise of that
    sum, so its scale is the largest per-channel sum of |dzdy|, not its own size."""
    d = np.abs(as_4d(np.asarray(dzdy, dtype=np.float64)))
    return float(d.sum(axis=(0, 1, 3)).max())


def filter_scale(x: np.ndarray, dzdy: np.ndarray) -> float:
    """A filter derivative sums x .* dzdy over positions and images; where it cancels to ~0
    (filters followed by bnorm, whose output ignores their scale) both sides hold rounding
    noise of those products, bounded by max|x| times the largest per-filter sum of |dzdy|."""
    return bias_scale(dzdy) * float(np.max(np.abs(np.asarray(x, dtype=np.float64)), initial=0.0))


def gain_scale(x: np.ndarray, dzdy: np.ndarray, epsilon) -> float:
    """A bnorm gain derivative is ``(sum(dzdy .* x) - mu * sum(dzdy)) / sigma`` per channel;
    where the layers after it ignore the scale (another bnorm) it cancels to ~0 and both
    sides hold rounding noise of those terms, so its scale is theirs, not its own size."""
    x = as_4d(np.asarray(x, dtype=np.float64))
    d = np.abs(as_4d(np.asarray(dzdy, dtype=np.float64)))
    mu = x.mean(axis=(0, 1, 3))
    sigma = np.sqrt(x.var(axis=(0, 1, 3)) + float(np.asarray(epsilon, dtype=float).ravel()[0]))
    terms = (d * np.abs(x)).sum(axis=(0, 1, 3)) + np.abs(mu) * d.sum(axis=(0, 1, 3))
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma 0: epsilon 0 on a constant channel
        return float((terms / sigma).max())
