"""The rows of a Report: one MatConvNet tensor measured against its Keras counterpart.

``measure_row`` compares element for element (``harness.equivalence.metrics.measure``);
the ``*_scale`` functions give the size of the rounding noise of a parameter derivative
that cancels to about zero (a bias or filter followed by bnorm, a gain followed by
another bnorm), which is what such a derivative is measured against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.equivalence.match import Match, match_outputs, to_mcn_view
from harness.equivalence.metrics import measure
from harness.equivalence.report import LIMITATIONS, Row
from harness.mcn.options import as_4d
from harness.translate.weights import keras_index, to_hwcn

if TYPE_CHECKING:
    from harness.equivalence.align import Alignment
    from harness.equivalence.keras_pass import KerasSide
    from harness.equivalence.tolerance import Tolerance
    from harness.mcn.net import Net
    from harness.mcn.simplenn import Res
    from harness.translate.weights import WeightMap

__all__ = [
    "bias_scale",
    "build_rows",
    "extra_layer_row",
    "filter_scale",
    "gain_scale",
    "match_note",
    "measure_row",
    "own_output",
]


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


# a parameter stored in float32 agrees with the net's to float32 rounding (a few ulps)
F32_WEIGHT_TOLERANCE = 2.0**-22


def build_rows(
    net: Net,
    alignment: Alignment,
    params: WeightMap,
    res: list[Res],
    side: KerasSide,
    matches: list[Match],
    tol: Tolerance,
    alt: list[Res] | None,
    stored: str,
) -> list[Row]:
    """Every compared tensor, in order: the input's derivative, then per layer its
    parameters (weights="model"), output, output derivative and parameter derivatives;
    last the model's own output and the loss."""
    downstream = _downstream_scales(res, side.has_loss)
    rows = [
        measure_row(
            layer="input",
            type="data",
            keras="input",
            tensor="dzdx",
            ref=res[0].dzdx,
            got=None if side.obs.input_grad is None else to_hwcn(side.obs.input_grad),
            tolerance=tol.backward,
            scale=downstream[1] if len(downstream) > 1 else 0.0,
        )
    ]
    if alt is not None and side.obs.input_grad is not None:
        floor = downstream[1] if len(downstream) > 1 else 0.0
        _explain(rows[0], alt[0].dzdx, to_hwcn(side.obs.input_grad), tol.backward, floor)
    for idx, match in enumerate(matches):
        pair = alignment.pairs[idx] if idx < len(alignment.pairs) else None
        layer = net.layers[idx]
        this = {"layer": layer.name, "type": layer.type}
        for kidx, wname, ref_w, keras_w in params.kept:
            if kidx == idx:
                rows.append(_weight_row(this, pair.param_layer, wname, ref_w, keras_w, tol, stored))
        hwc = tuple(as_4d(res[idx + 1].x).shape[:3])
        got = grad = None
        klabel = "-"
        if match.capture is not None:
            got, grad = side.in_mcn_layout(match, hwc)
            klabel = side.labels[match.capture]
        note = match_note(match)
        x_row = measure_row(
            **this, keras=klabel, tensor="x", ref=res[idx + 1].x, got=got, tolerance=tol.forward, note=note
        )
        # a derivative that cancels to ~0 (summed over pooling windows feeding a bnorm) holds
        # rounding noise of the terms it was summed from: its scale is the largest
        # derivative on the backward path down to it
        floor = downstream[idx + 2] if idx + 2 < len(downstream) else 0.0
        d_row = measure_row(
            **this,
            keras=klabel,
            tensor="dzdx",
            ref=res[idx + 1].dzdx,
            got=grad,
            tolerance=tol.backward,
            scale=floor if np.isfinite(floor) else 0.0,
        )
        if alt is not None:
            _explain(x_row, alt[idx + 1].x, got, x_row.tolerance)
            _explain(d_row, alt[idx + 1].dzdx, grad, d_row.tolerance, floor)
        rows += [x_row, d_row, *_extra_layer_rows(idx, matches, side, tol, this)]
        if pair is not None and pair.param_layer:
            klayer = alignment.layer(pair.param_layer)
            floor = downstream[idx + 1] * max(1.0, float(np.max(np.abs(res[idx].x), initial=0.0)))
            rows += _parameter_rows(layer, klayer, params, res, idx, side, tol, alt, floor)
    rows += _output_rows(net, res, side, tol, alt)
    return rows


def _extra_layer_rows(
    idx: int, matches: list[Match], side: KerasSide, tol: Tolerance, this: dict
) -> list[Row]:
    """A Keras layer between two matched outputs that changes the first before the second
    is computed from it, with no MatConvNet counterpart: an extra layer, even when the
    layers after it happen not to read what it changed on this batch (a ReLU whose zeroed
    elements a strided conv skips)."""
    if idx + 1 >= len(matches) or not (matches[idx].exact and matches[idx + 1].exact):
        return []
    a, b = matches[idx].capture, matches[idx + 1].capture
    matched = {m.capture for m in matches}
    obs, rows = side.obs, []
    for c in range(a + 1, b):
        layer = obs.captures[c].layer
        if layer is None or id(layer) not in side.leaf_ids or c in matched:
            continue  # not a layer of the model's own (an op inside a layer, or a tensor op)
        if side.values[c].shape != side.values[a].shape:
            continue  # a reshape, a pad, a flatten: a layout move
        ta, tb, tc = (obs.captures[k].tensor for k in (a, b, c))
        if not obs.feeds(ta, tc) or obs.feeds(ta, tb, avoiding=tc):
            continue
        if side.labels[c] in side.paired:
            continue  # the Keras layer the structure pairs with a MatConvNet layer
        row = extra_layer_row(side, a, c, tol, this, noun="output", net="MatConvNet")
        if row is not None:
            rows.append(row)
    return rows


def extra_layer_row(
    side: KerasSide, a: int, c: int, tol: Tolerance, this: dict, *, noun: str, net: str
) -> Row | None:
    """The ``x+`` Row of capture ``c``, a Keras layer computed from capture ``a`` that has
    no counterpart in the ``net``: what it changes in the value, else (the same values)
    in the derivative passing through it (a ReLU at zeros; finite derivatives only);
    None when it changes neither."""
    m = measure(side.values[a], side.values[c], tol.forward)
    what = f"changes this {noun}"
    ga, gc = side.grads[a], side.grads[c]
    finite = ga is not None and gc is not None and np.all(np.isfinite(ga)) and np.all(np.isfinite(gc))
    if m.ok and finite:
        m = measure(gc, ga, tol.backward)
        what = f"passes a different derivative through this {noun}"
    if m.ok:
        return None
    return Row(
        **this,
        keras=side.labels[c],
        tensor="x+",
        ok=False,
        numel=m.numel,
        mismatches=m.mismatches,
        max_abs=m.max_abs,
        max_rel=m.max_rel,
        tolerance=tol.forward,
        note=f"Keras layer '{side.labels[c]}' ({side.op_types[c]}) {what} before the next layer "
        f"reads it; {net} has no such layer",
    )


def _downstream_scales(res: list[Res], has_loss: bool = True) -> list[float]:
    """``out[k]``: the largest |derivative| at ``res[k:]``'s outputs, a loss's own
    ``dzdy`` left out (a net without a loss: the ones its outputs' sum gives, kept): the
    scale of the rounding noise a derivative at ``k`` can hold."""
    out = [0.0] * (len(res) + 1)
    for k in range(len(res) - (2 if has_loss else 1), -1, -1):
        d = res[k].dzdx
        m = float(np.max(np.abs(d), initial=0.0)) if d is not None and np.size(d) else 0.0
        out[k] = max(out[k + 1], m if np.isfinite(m) else 0.0)
    return out


def _parameter_rows(
    layer,
    klayer,
    params: WeightMap,
    res: list[Res],
    idx: int,
    side: KerasSide,
    tol: Tolerance,
    alt,
    floor: float = 0.0,
) -> list[Row]:
    """The rows of a layer's parameter derivatives (and of a kernel's entries off
    MatConvNet's filter groups)."""
    gk = side.param_grads[idx]
    mapped = params.grads_to_mcn(layer, klayer, gk) if gk and all(g is not None for g in gk) else []
    this = {"layer": layer.name, "type": layer.type, "keras": klayer.name, "tolerance": tol.parameter}
    rows = []
    for name, g, off in mapped:
        j = int(name[5]) - 1
        scale = bias_scale(res[idx + 1].dzdx) if j == 1 else 0.0
        if j == 0 and layer.type == "bnorm":
            scale = gain_scale(res[idx].x, res[idx + 1].dzdx, layer.epsilon)
        elif j == 0 and layer.type == "conv":
            scale = filter_scale(res[idx].x, res[idx + 1].dzdx)
        scale = max(scale, floor)
        row = measure_row(**this, tensor=name, ref=res[idx].dzdw[j], got=g, scale=scale)
        if alt is not None:
            _explain(row, alt[idx].dzdw[j], g, tol.parameter, scale)
        rows.append(row)
        if off is not None:
            rows.append(
                measure_row(
                    **this,
                    tensor="dzdw{1}*",
                    ref=np.zeros(off.shape),
                    got=off,
                    note="Keras-only weights off MatConvNet's group blocks (MatConvNet has none)",
                    # the reference is all zeros here: measure against the real gradient
                    scale=float(np.max(np.abs(res[idx].dzdw[0]))),
                )
            )
    return rows


def _weight_row(this: dict, keras: str, name: str, ref_w, keras_w, tol: Tolerance, stored: str) -> Row:
    """A parameter the port transferred itself (weights="model"), in Keras' layout. A
    value the model stores in float32 is also compared with the net's value rounded to
    float32: agreeing to float32 rounding is a note, not a divergence."""
    row = measure_row(
        **this, keras=keras, tensor=name, ref=ref_w, got=keras_w, tolerance=tol.forward, same_layout=True
    )
    if not row.ok and stored == "float32" and tol.forward < F32_WEIGHT_TOLERANCE:
        rounded = np.asarray(ref_w, dtype=np.float64).astype(np.float32).astype(np.float64)
        _explain(row, rounded, keras_w, F32_WEIGHT_TOLERANCE)
    return row


def _explain(row: Row, ref, got, tolerance: float, scale: float = 0.0) -> None:
    """Mark a differing, finite ``row`` as explained by float32 rounding when ``got``
    matches ``ref`` (the reference with the port's float32 roundings)."""
    if row.ok or got is None or row.nonfinite_ref or row.nonfinite_keras:
        return
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.size != got.size:
        return
    m = measure(ref, got.reshape(ref.shape), tolerance, floor=scale)
    if m.ok:
        row.limitation = LIMITATIONS["float32-rounding"].text


def match_note(match: Match) -> str:
    """How ``match`` was made, for a row's note: the layout Keras holds the tensor in; for
    a tensor no capture reproduces, why, and what Keras computed since the last match."""
    parts = []
    if match.layout:
        parts.append(f"Keras holds it {match.layout}")
    if not match.exact:
        if match.capture is None:
            parts.append("no Keras tensor of a fitting shape")
        else:
            parts.append("no Keras tensor reproduces it (nearest shown)")
        if match.between:
            shown = ", ".join(match.between[:8]) + (" ..." if len(match.between) > 8 else "")
            parts.append(f"Keras computed since the last match: {shown}")
    return "; ".join(parts)


def _output_rows(net: Net, res: list[Res], side: KerasSide, tol: Tolerance, alt) -> list[Row]:
    """The model's own output against the reference (scores, or their softmax when the
    model ends in one), and the loss: whatever the alignment found, a model whose output
    differs is never equivalent."""
    if not net.layers:
        return []
    if side.has_loss:
        layer = net.layers[-1]
        scores = as_4d(res[-2].x)
        ref = _softmax(scores) if side.probabilities else scores
        alt_ref = (
            None if alt is None else (_softmax(as_4d(alt[-2].x)) if side.probabilities else as_4d(alt[-2].x))
        )
    else:
        layer = net.layers[-1]
        ref = as_4d(res[-1].x)
        alt_ref = None if alt is None else as_4d(alt[-1].x)
    this = {"layer": layer.name, "type": layer.type}
    got = own_output(ref, side.output, side.output_label, tol)
    what = "the model's output" + (" (softmax probabilities)" if side.probabilities else "")
    row = measure_row(
        **this, keras=side.output_label, tensor="output", ref=ref, got=got, tolerance=tol.forward, note=what
    )
    if alt_ref is not None:
        _explain(row, alt_ref, got, tol.forward)
    rows = [row]
    if side.has_loss:
        loss_row = measure_row(
            **this, keras="loss", tensor="loss", ref=res[-1].x, got=side.loss, tolerance=tol.forward
        )
        if alt is not None:
            _explain(loss_row, alt[-1].x, side.loss, tol.forward)
        rows.append(loss_row)
    return rows


def own_output(ref: np.ndarray, output: np.ndarray, label: str, tol: Tolerance) -> np.ndarray | None:
    """The model's own ``output`` in MatConvNet's layout, to compare with ``ref`` (H x W x C
    x N): the loss reads it as N x H x W x K (or N x K), so no other layout is the model's;
    None when its shape fits none of those."""
    match = match_outputs([ref], [output], [label], tol.forward, layouts="own")[0]
    if match.capture is None:
        return None
    if match.view is not None:
        return to_mcn_view(output, match.view, tuple(ref.shape[:3]))
    return to_hwcn(output) if output.ndim in (2, 4) else output


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=2, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=2, keepdims=True)
