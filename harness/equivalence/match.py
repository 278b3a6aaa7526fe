"""Align by value: which tensor the Keras model computed reproduces each MatConvNet output.

The structure of the model is only a hint. Each MatConvNet layer output (``H x W x C x
N``) is looked for among the tensors the observed call computed (``observe.Capture``),
in execution order after the last one matched: a tensor matches when, seen in one of the
layouts a port may use, it equals the reference within tolerance. The layouts are
Keras' ``N x H x W x C``, any order of the three inner axes (``Permute``), and any
flattening order of ``H, W, C`` (``Flatten`` row-major, MATLAB's column-major ``F(:)``).
So fused activations, ``keras.ops`` and ``Lambda`` layers, Permute heads and extra or
missing layers need no type table.

The first MatConvNet output no tensor reproduces is where the two sides part. Its row
shows the nearest tensor of a fitting shape, and the Keras operations computed between
the last match and it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import permutations

import numpy as np

from harness.mcn.options import as_4d

__all__ = ["Match", "match_outputs", "to_mcn_view"]

_AXES = "HWC"


@dataclass
class Match:
    """The Keras tensor compared with one MatConvNet output."""

    capture: int | None  # index into the observation's captures (None: no tensor fits)
    view: tuple[str, tuple[int, int, int]] | None  # ("nhwc"|"flat", order of H, W, C); None: no fit
    exact: bool  # reproduces the reference within tolerance
    max_rel: float = float("inf")
    between: list[str] = field(default_factory=list)  # captures since the last match

    @property
    def layout(self) -> str:
        """How the Keras tensor holds the MatConvNet one ("" for N x H x W x C)."""
        if self.view is None:
            return "in another shape"
        kind, order = self.view
        names = "".join(_AXES[i] for i in order)
        if kind == "flat":
            return f"flattened {'row-major (H, W, C)' if order == (0, 1, 2) else 'in order ' + names}"
        return "" if order == (0, 1, 2) else f"permuted to N x {' x '.join(names)}"


def _views(shape: tuple[int, ...], hwc: tuple[int, int, int]) -> Iterator[tuple[str, tuple[int, int, int]]]:
    """The layouts in which a Keras tensor of ``shape`` (batch first) can hold an
    ``H x W x C`` image per batch element, most usual first."""
    orders = [(0, 1, 2), *[p for p in permutations(range(3)) if p != (0, 1, 2)]]
    if len(shape) == 4:
        for order in orders:
            if tuple(hwc[i] for i in order) == tuple(shape[1:]):
                yield ("nhwc", order)
    elif len(shape) == 2 and shape[1] == hwc[0] * hwc[1] * hwc[2]:
        ones = sum(1 for d in hwc if d == 1)
        for order in orders:
            # orders that move only singleton axes give the same flattening: keep one
            if (
                ones
                and order != (0, 1, 2)
                and [hwc[i] for i in order if hwc[i] > 1] == [d for d in hwc if d > 1]
            ):
                continue
            yield ("flat", order)


def usual_view(shape: tuple[int, ...], hwc: tuple[int, int, int]) -> tuple[str, tuple[int, int, int]] | None:
    """The most usual layout in which a tensor of ``shape`` holds an ``H x W x C`` image
    per batch element (None: it cannot)."""
    return next(iter(_views(tuple(shape), hwc)), None)


def to_mcn_view(
    value: np.ndarray, view: tuple[str, tuple[int, int, int]], hwc: tuple[int, ...]
) -> np.ndarray:
    """A Keras tensor held in ``view`` as MatConvNet's ``H x W x C x N``."""
    kind, order = view
    value = np.asarray(value, dtype=np.float64)
    n = value.shape[0]
    if kind == "flat":
        value = value.reshape((n, *(hwc[i] for i in order)))
    back = [0] + [1 + order.index(i) for i in range(3)]  # to N x H x W x C
    return value.transpose(back).transpose(1, 2, 3, 0)


def _rel(ref: np.ndarray, got: np.ndarray, scale: float) -> float:
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got - ref)
    if not np.all(np.isfinite(diff)):
        return float("inf")
    return float(diff.max(initial=0.0)) / scale


def match_outputs(
    refs: list[np.ndarray],
    captures: list[np.ndarray],
    labels: list[str],
    tol: float,
    *,
    alt: list[np.ndarray] | None = None,
    named: list[bool] | None = None,
    hints: list[str | None] | None = None,
    layouts: str = "any",
    inside: list[str | None] | None = None,
    layout_ops: list[bool] | None = None,
    runs: list[set[str]] | None = None,
) -> list[Match]:
    """One ``Match`` per reference output ``refs[i]`` (``H x W x C x N``) among
    ``captures`` (Keras tensors, batch first, in execution order). With ``alt`` (the
    same outputs of another reference, such as one with float32 roundings), a tensor
    that reproduces either one matches. Among consecutive tensors that all match, the
    first a Keras layer returned (``named``) in its own layout is taken, else the first.
    An output no tensor reproduces is shown against the tensor of the Keras layer the
    structure pairs with it (``hints``: labels), else the closest later tensor, else the
    last match (a layer Keras leaves out passes that tensor on). ``layouts="own"`` allows
    only N x H x W x C and its row-major flattening. A tensor computed inside a Keras
    layer (``inside``: its name) is a candidate only for the MatConvNet layer the structure
    pairs with that layer (a conv's pre-activation): a mean inside a BatchNormalization
    is no ReLU's output, whatever its values. An output whose elements are all equal is
    looked for only among the Keras layers the structure pairs with it (``hints``, and
    ``runs``: the labels of each layer's Keras run)."""
    out: list[Match] = []
    cursor = -1  # the capture of the last exact match
    for k, ref in enumerate(refs):
        ref = as_4d(np.asarray(ref, dtype=np.float64))
        other = None if alt is None else as_4d(np.asarray(alt[k], dtype=np.float64))
        hwc = tuple(int(d) for d in ref.shape[:3])
        finite = np.abs(ref[np.isfinite(ref)])
        scale = max(float(finite.max(initial=0.0)), 1e-300)
        best = Match(None, ("nhwc", (0, 1, 2)), False)
        found = None
        # strictly later tensors first; then the last match again (a layer that is the
        # identity on this batch: a ReLU of positive values, dropout in test mode)
        hint = hints[k] if hints else None
        # ... but not when the Keras layer the structure pairs with it computed something
        # after the last match: then that is its counterpart, identity or not
        again = cursor >= 0 and (hint is None or hint not in labels[cursor + 1 :])
        order = list(range(cursor + 1, len(captures))) + ([cursor] if again else [])
        # an output whose elements are all equal (zero filters, a bnorm of one value) tells
        # no tensor apart: only the Keras layer the structure pairs with it may hold it
        own = {hint, *(runs[k] if runs and k < len(runs) else ())} - {None}
        constant = bool(own) and ref.size > 1 and bool(np.all(ref == ref.flat[0]))
        for j in order:
            cap = captures[j]
            if cap.shape[0] != ref.shape[3] or inside and inside[j] is not None and inside[j] != hint:
                continue
            if constant and j != cursor and labels[j].split(":")[0] not in own:
                continue
            for view in _views(cap.shape, hwc):
                moved = layout_ops is not None and not layout_ops[j]
                if view[1] != (0, 1, 2) and (layouts == "own" or moved):
                    continue  # only a layout op (Permute, Flatten) holds another order
                value = to_mcn_view(cap, view, hwc)
                rel = _rel(ref, value, scale)
                if other is not None and other.shape == ref.shape:
                    rel = min(rel, _rel(other, value, scale))
                if rel <= tol and np.all(np.isfinite(ref)):
                    found = Match(j, view, True, rel)
                    break
                if rel < best.max_rel and j > cursor:
                    best = Match(j, view, False, rel)
            if found:
                break
        if found is not None and found.capture > cursor:
            found = _prefer_named(found, ref, other, captures, hwc, scale, tol, named, inside, labels)
        if found is None:
            best = _nearest(best, ref, captures, labels, hwc, scale, cursor, hint)
        match = found or best
        start = cursor + 1
        stop = match.capture if match.capture is not None else len(captures)
        match.between = labels[start:stop] if stop >= start else []
        if found:
            cursor = found.capture
        out.append(match)
    return out


def _prefer_named(
    found: Match, ref, other, captures, hwc, scale: float, tol: float, named, inside=None, labels=None
) -> Match:
    """The tensor a layer returned, in N x H x W x C, among the run of matching tensors
    that starts at ``found`` (a conv's op output and the layer's output are equal when
    its bias is zero; a pooling layer may compute through transposes). A tensor computed
    inside a Keras layer gives way to that layer's own output when it matches too,
    however many tensors in between do not (a batch norm's mean equals its output on a
    batch whose normalised values are all zero)."""
    if named is None:
        return found

    def hit_at(j: int) -> Match | None:
        cap = captures[j]
        if cap.shape[0] != ref.shape[3]:
            return None
        for view in _views(cap.shape, hwc):
            value = to_mcn_view(cap, view, hwc)
            rel = _rel(ref, value, scale)
            if other is not None and other.shape == ref.shape:
                rel = min(rel, _rel(other, value, scale))
            if rel <= tol:
                return Match(j, view, True, rel)
        return None

    host = inside[found.capture] if inside is not None and labels is not None else None
    if host is not None:
        for j in range(found.capture + 1, len(captures)):
            if labels[j] == host and inside[j] is None and named[j]:
                hit = hit_at(j)
                if hit is not None and hit.view == ("nhwc", (0, 1, 2)):
                    return hit
                break
    run: list[Match] = []
    j = found.capture
    while j < len(captures):
        if captures[j].shape[0] != ref.shape[3] or next(iter(_views(captures[j].shape, hwc)), None) is None:
            j += 1  # a tensor of another shape (a kernel's side output) does not end the run
            continue
        hit = hit_at(j)
        if hit is None:
            break
        run.append(hit)
        j += 1
    own = [m for m in run if inside is None or inside[m.capture] is None]  # a layer's own output
    for m in [*own, *run]:
        if named[m.capture] and m.view == ("nhwc", (0, 1, 2)):
            return m
    return found


def _nearest(best: Match, ref, captures, labels, hwc, scale: float, cursor: int, hint: str | None) -> Match:
    """The tensor a layer's unreproduced output is shown against (see ``match_outputs``)."""

    def fitting(j: int):
        cap = captures[j]
        if cap.shape[0] != ref.shape[3]:
            return None
        return next(iter(_views(cap.shape, hwc)), None)

    if hint is not None:
        for j in range(cursor + 1, len(captures)):
            if labels[j] != hint:
                continue
            view = fitting(j)
            if view is None:  # the paired layer computed another shape: show that
                return Match(j, None, False)
            return Match(j, view, False, _rel(ref, to_mcn_view(captures[j], view, hwc), scale))
    if best.capture is not None:
        return best
    for j in [*range(cursor + 1, len(captures)), *([cursor] if cursor >= 0 else [])]:
        view = fitting(j)
        if view is not None:
            return Match(j, view, False, _rel(ref, to_mcn_view(captures[j], view, hwc), scale))
    return best
