"""Compare a MatConvNet net with a Keras model on one batch: run both sides, build the Report.

The reference runs ``vl_simplenn`` (``reference_pass``: LRN with the exact power, since
Keras has no ``fast_pow``, ``dzdy = 1``); the Keras model runs layer by layer under one
GradientTape (``keras_pass``). Weights are loaded from the net into the Keras layers the
alignment names (``harness.translate.weights.WeightMap``); a Keras Conv2D/Dense without
MatConvNet's filter groups gets the filters embedded block-diagonally (so the forward
pass can still be compared) and the off-diagonal parameter derivatives are reported.
Each tensor pair becomes a Row (``rows``); known, accepted differences are Limitations;
the first Divergence names the layer to blame.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.equivalence.align import align
from harness.equivalence.keras_pass import LOSS_TYPES, keras_batch_loss
from harness.equivalence.match import Match, match_outputs, to_mcn_view, usual_view
from harness.equivalence.metrics import measure, nonfinite_summary
from harness.equivalence.observe import discover, observe
from harness.equivalence.precision import float64_copy, model_dtype, rounded_reference_net
from harness.equivalence.reference_pass import cast_net, dropout_masks, run_reference
from harness.equivalence.report import Divergence, Limitation, Report, Row
from harness.equivalence.rows import bias_scale, filter_scale, gain_scale, measure_row
from harness.equivalence.tolerance import tolerance_for
from harness.mcn.geometry import layer_output_shapes
from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d, check_budget, memory_budget
from harness.mcn.simplenn import Res, vl_simplenn, vl_simplenn_tidy
from harness.translate import weights as layout
from harness.translate.weights import WeightMap, to_hwcn, to_nhwc

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment
    from harness.equivalence.tolerance import Tolerance

__all__ = ["CONVENTIONS", "LIMITATIONS", "compare", "keras_parameters", "matlab_labels"]

# TensorFlow ops a softmax (of any axis, in log form) is computed with
SOFTMAX_OPS = frozenset(
    {"Softmax", "LogSoftmax", "Transpose", "Reshape", "Identity", "Exp", "Log", "Sub", "Max", "Sum"}
    | {"RealDiv", "Squeeze", "ExpandDims", "Neg", "Mean"}
)

# a parameter stored in float32 agrees with the net's to float32 rounding (a few ulps)
F32_WEIGHT_TOLERANCE = 2.0**-22

CONVENTIONS = {
    "master": "loss summed over pixels, divided by the batch size N (MatConvNet master); "
    "derivatives are those of that loss on both sides",
    "beta25": "loss summed over pixels and over the batch (MatConvNet v1.0-beta25); "
    "derivatives are those of that loss on both sides",
}

# The known, accepted differences between the two sides, by kind.
LIMITATIONS = {
    "lrn-exact-power": Limitation(
        "lrn-exact-power",
        "LRN compared with the exact power (MatConvNet's CPU fast_pow differs by up to 3.3e-3)",
    ),
    "float32-rounding": Limitation(
        "float32-rounding",
        "differences explained by float32 rounding in the port: it matches the reference whose "
        "constants (ReLU leak, LRN parameters, bnorm epsilon) and transferred weights are rounded "
        "to float32 as the port holds them",
    ),
    "bnorm-test-mode-backward": Limitation(
        "bnorm-test-mode-backward",
        "test mode: MatConvNet's backward pass through bnorm uses batch statistics (vl_simplenn "
        "calls vl_nnbnorm without 'moments'), Keras differentiates through the stored moments",
    ),
}


def compare(
    net: Net,
    model: keras.Model,
    x: np.ndarray,
    labels: Any,
    *,
    dtype: str = "float64",
    mode: str = "normal",
    dialect: str = "master",
    mapping: dict[str, list[str]] | None = None,
    seed: int = 0,
    weights: str = "net",
) -> Report:
    """Compare ``net`` (MatConvNet reference) with a Keras ``model`` on one batch.

    ``x`` is ``H x W x C x N`` (MatConvNet layout), ``labels`` 1-based (0 = ignore), in
    MATLAB's shapes (``1 x N``, ``1 x 1 x 1 x N``, ``H x W x 1 x N``) or Python's (``N``).
    The model is called as the user calls it and every tensor it computes is observed
    (``observe``); each layer's output is then found among them by value (``match``).
    In float64 (the default) a float32 model is compared through a float64 copy of it
    (``precision``), or in its own dtype with a note when it cannot be copied. The
    net's weights are loaded into the Keras layers the structural alignment names; with
    ``weights="model"`` the model keeps its own weights, and each parameter is compared
    too (rows ``w{j}``, in Keras' layout).
    """
    if weights not in ("net", "model"):
        raise McnError(f"Expected weights 'net' or 'model'. Received weights={weights!r}")
    tidy = vl_simplenn_tidy(net)
    x = as_4d(np.asarray(x, dtype=np.float64), "x")
    bad_x = nonfinite_summary(x, "x (the input batch)")
    if bad_x:
        raise McnError(f"{bad_x}: a comparison on non-finite input cannot tell anything apart")
    labels_arr = matlab_labels(labels, x.shape[3])
    _check_memory(tidy, x, dtype)
    notes: list[str] = []
    run_model, run_dtype = model, dtype
    if dtype == "float64":
        copy, why = float64_copy(model, to_nhwc(x))
        if copy is None:
            run_dtype = "float32"
            notes.append(
                f"compared in float32, the model's own precision, at float32 tolerance: it could not be "
                f"copied to float64 ({why})"
            )
        else:
            run_model = copy
    tol = tolerance_for(run_dtype)
    np_dtype = np.float64 if run_dtype == "float64" else np.float32
    net = cast_net(tidy, np_dtype)
    x = x.astype(np_dtype)
    x_nhwc = to_nhwc(x)
    found = discover(run_model, x_nhwc, training=mode == "normal")
    alignment = align(net, run_model, mapping, layers=found.leaves)
    params = WeightMap(net, run_model, alignment, run_dtype, load=weights == "net")
    problems = _nonfinite_parameters(net, run_model)

    res = run_reference(net, x, labels_arr, mode=mode, dialect=dialect, seed=seed)
    masks = dropout_masks(net, res, mode)
    has_loss = bool(net.layers) and net.layers[-1].type in LOSS_TYPES
    probabilities = found.output_op == "Softmax"
    n = x.shape[3]

    def loss(out):
        if has_loss:
            return keras_batch_loss(out, labels_arr, n, dialect, probabilities)
        import tensorflow as tf

        return tf.reduce_sum(out)

    variables = {
        pair.index: list(alignment.layer(pair.param_layer).trainable_variables)
        for pair in alignment.pairs
        if pair.param_layer
    }
    obs = observe(
        run_model,
        x_nhwc,
        training=mode == "normal",
        loss=loss,
        masks=[to_nhwc(masks[i]) for i in sorted(masks)],
        weights=[v for vs in variables.values() for v in vs],
        eager=found.eager,
    )
    notes += params.notes + obs.notes
    side = _KerasSide(obs, variables, has_loss, probabilities)
    side.runs = [
        {n for n in pair.keras if f"extra Keras layer {n}" not in pair.notes} for pair in alignment.pairs
    ]
    side.paired = {
        name
        for pair in alignment.pairs
        if pair.type not in LOSS_TYPES
        for name in pair.keras
        if f"extra Keras layer {name}" not in pair.notes
    }
    compared = len(net.layers) - (1 if has_loss else 0)
    refs = [res[i + 1].x for i in range(compared)]
    hints = [
        (pair.param_layer or (pair.keras[-1] if pair.keras else None))
        if pair.type not in LOSS_TYPES
        else None
        for pair in alignment.pairs[:compared]
    ]
    hints += [None] * (compared - len(hints))
    matches = match_outputs(
        refs,
        side.values,
        side.labels,
        tol.forward,
        named=side.named,
        hints=hints,
        inside=side.inside,
        layout_ops=side.layout_ops,
    )
    alt = None
    if run_dtype == "float64" and not all(m.exact for m in matches):
        # float32 roundings the port holds (its constants, its own float32 weights)
        keras_net = keras_parameters(net, alignment, params.orders) if weights == "model" else None
        alt = run_reference(
            rounded_reference_net(net, keras_net), x, labels_arr, mode=mode, dialect=dialect, seed=seed
        )
        matches = match_outputs(
            refs,
            side.values,
            side.labels,
            tol.forward,
            alt=[alt[i + 1].x for i in range(compared)],
            named=side.named,
            hints=hints,
            inside=side.inside,
            layout_ops=side.layout_ops,
        )
    rows = _rows(net, alignment, params, res, side, matches, tol, alt, model_dtype(model))
    limitations = []
    if any(l.type in ("lrn", "normalize") for l in net.layers):
        limitations.append(LIMITATIONS["lrn-exact-power"])
    if any(r.limitation == LIMITATIONS["float32-rounding"].text for r in rows):
        limitations.append(LIMITATIONS["float32-rounding"])
    bnorms = [i for i, l in enumerate(net.layers) if l.type == "bnorm"]
    if mode == "test" and bnorms:
        limitation = LIMITATIONS["bnorm-test-mode-backward"]
        limitations.append(limitation)
        _mark_limited(rows, net, bnorms[-1], limitation.text)
    report = Report(
        rows=rows,
        dtype=run_dtype,
        mode=mode,
        dialect=dialect,
        convention=CONVENTIONS[dialect],
        alignment_problems=list(params.problems),
        notes=notes,
        limitations=limitations,
        problems=problems,
    )
    report.first_divergence = _first_divergence(report, net, res, side, matches, mode, dialect)
    if report.first_divergence is not None:
        report.hints = list(alignment.problems)
    report.observed = {
        net.layers[i].name: to_mcn_view(side.values[m.capture], m.view, tuple(as_4d(refs[i]).shape[:3]))
        for i, m in enumerate(matches)
        if m.capture is not None and m.view is not None
    }
    return report


def _check_memory(net: Net, x: np.ndarray, dtype: str) -> None:
    """Refuse up front a batch whose activations, with their derivatives, on both sides
    and in the float64 copy, would not fit the memory budget (instead of exhausting the
    machine inside TensorFlow)."""
    try:
        shapes = layer_output_shapes(net, x.shape[:3])
    except McnError:
        return  # the reference names the layer that does not fit when it runs
    sizes = [math.prod(int(d) for d in s) for s in shapes]  # Python ints: no overflow
    copies = 4 if dtype == "float64" else 2  # reference and Keras (float32 model, float64 copy)
    # name the first layer whose output alone does not fit (else the largest)
    alone = [k for k, size in enumerate(sizes) if 8.0 * size * x.shape[3] > memory_budget()]
    big = alone[0] if alone else int(np.argmax(sizes))
    where = "the input" if big == 0 else f"layer {big} '{net.layers[big - 1].name}'"
    fields = {"conv": "pad, stride", "pool": "pad, stride", "convt": "upsample, crop"}
    if big > 0 and net.layers[big - 1].type in fields:
        where += f" (sized by its fields {fields[net.layers[big - 1].type]})"
    check_budget(
        8.0 * sum(sizes) * x.shape[3] * 2 * copies,
        f"the activations of a batch of {x.shape[3]} images (the largest: {where}'s output, "
        f"{' x '.join(str(d) for d in shapes[big])} per image)",
    )


class _KerasSide:
    """The observed call as the rows read it: every capture as a float64 array, its
    derivative, and the parameter derivatives by pair index."""

    def __init__(self, obs, variables: dict, has_loss: bool, probabilities: bool):
        self.obs = obs
        self.values = [np.asarray(c.tensor.numpy(), dtype=np.float64) for c in obs.captures]
        self.labels = [c.label for c in obs.captures]
        self.named = [c.layer is not None for c in obs.captures]
        self.op_types = [c.op_type for c in obs.captures]
        self.leaf_ids = {id(l) for l in obs.leaves}
        # tensors made by a layout op: the only ones that may hold another axis order
        self.layout_ops = [
            c.op_type in ("Transpose", "Reshape", "Squeeze", "ExpandDims") for c in obs.captures
        ]
        # the leaf Keras layer a capture was computed inside (None: a layer's or the model's own)
        self.inside = [c.inside for c in obs.captures]
        self.grads = obs.grads
        self.param_grads = {i: [obs.weight_grads.get(id(v)) for v in vs] for i, vs in variables.items()}
        self.output = np.asarray(obs.output.numpy(), dtype=np.float64)
        self.loss = float(np.asarray(obs.loss.numpy()))
        self.has_loss = has_loss
        self.probabilities = probabilities
        self.output_label = next(
            (c.label for c in obs.captures if c.tensor is obs.output), getattr(obs.output, "name", "output")
        )

    def in_mcn_layout(self, match: Match, hwc: tuple) -> tuple[np.ndarray, np.ndarray | None]:
        """The matched tensor and its derivative as H x W x C x N (a tensor of another shape
        as it is, moved to MatConvNet's axis order, so that the row shows both shapes)."""
        value, g = self.values[match.capture], self.grads[match.capture]
        if match.view is None:
            as_is = to_hwcn(value) if value.ndim in (2, 4) else value
            return as_is, None if g is None else (to_hwcn(g) if np.ndim(g) in (2, 4) else g)
        return to_mcn_view(value, match.view, hwc), None if g is None else to_mcn_view(g, match.view, hwc)


def matlab_labels(labels: Any, n: int) -> np.ndarray:
    """Labels in MATLAB's shapes (``1 x N``, ``N x 1``, ``1 x 1 x 1 x N``, ``H x W x 1|2 x N``)
    or Python's (``N``) as the reference takes them (``1 x N`` or 4-D)."""
    arr = np.asarray(labels, dtype=np.float64)
    if arr.size == n and sum(d > 1 for d in arr.shape) <= 1:
        return arr.reshape(1, n)  # one label per image, in any of MATLAB's vector shapes
    if arr.ndim in (3, 4) and (arr.ndim == 3 and n == 1 or arr.shape[-1] == n):
        return arr
    raise McnError(
        f"Expected labels of shape (N,), 1 x N, 1 x 1 x 1 x N or H x W x 1 x N with N = {n} images. "
        f"Received labels of shape {arr.shape}"
    )


def _rows(
    net: Net,
    alignment: Alignment,
    params: WeightMap,
    res: list[Res],
    side: _KerasSide,
    matches: list[Match],
    tol: Tolerance,
    alt: list[Res] | None,
    stored: str,
) -> list[Row]:
    """Every compared tensor, in order: the input's derivative, then per layer its
    parameters (weights="model"), output, output derivative and parameter derivatives;
    last the model's own output and the loss."""
    downstream = _downstream_scales(res)
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
        note = _match_note(match, side.labels)
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
    idx: int, matches: list[Match], side: _KerasSide, tol: Tolerance, this: dict
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
        m = measure(side.values[a], side.values[c], tol.forward)
        what = "changes this output"
        ga, gc = side.grads[a], side.grads[c]
        finite = ga is not None and gc is not None and np.all(np.isfinite(ga)) and np.all(np.isfinite(gc))
        if m.ok and finite:
            # the same values, but not the same derivative through it (a ReLU at zeros)
            m = measure(side.grads[c], side.grads[a], tol.backward)
            what = "passes a different derivative through this output"
        if m.ok:
            continue
        rows.append(
            Row(
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
                "reads it; MatConvNet has no such layer",
            )
        )
    return rows


def _downstream_scales(res: list[Res]) -> list[float]:
    """``out[k]``: the largest |derivative| at ``res[k:]``'s outputs, the loss's own
    ``dzdy`` left out: the scale of the rounding noise a derivative at ``k`` can hold."""
    out = [0.0] * (len(res) + 1)
    for k in range(len(res) - 2, -1, -1):
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
    side: _KerasSide,
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


def _match_note(match: Match, labels: list[str]) -> str:
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


def _output_rows(net: Net, res: list[Res], side: _KerasSide, tol: Tolerance, alt) -> list[Row]:
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
    hwc = tuple(ref.shape[:3])
    # the loss reads the output as N x H x W x K (or N x K): no other layout is the model's
    match = match_outputs([ref], [side.output], [side.output_label], tol.forward, layouts="own")[0]
    got = None
    if match.capture is not None:
        got = to_hwcn(side.output) if match.view is None and side.output.ndim in (2, 4) else side.output
        got = got if match.view is None else to_mcn_view(side.output, match.view, hwc)
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


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=2, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=2, keepdims=True)


def keras_parameters(net: Net, alignment: Alignment, orders: dict | None = None) -> Net:
    """A copy of ``net`` holding the parameters the aligned Keras layers hold, in
    MatConvNet's layout (layers whose Keras parameters do not fit keep the net's)."""
    out = net.copy()
    for index, layer, klayer in layout.aligned_parameter_layers(out, None, alignment):
        values = [np.asarray(v, dtype=np.float64) for v in klayer.get_weights()]
        try:
            if layer.type == "bnorm":
                names = [r.variable for r in layout.bnorm_roles(klayer)]
                got = dict(zip(names, values, strict=True))
                g, b, m = layer.weights[:3]
                eps = float(getattr(klayer, "epsilon", 1e-5))
                moments = np.stack([got["moving_mean"], np.sqrt(got["moving_variance"] + eps)], axis=1)
                layer.weights[:3] = [
                    got.get("gamma", np.ones(np.size(g))).reshape(np.shape(g)),
                    got.get("beta", np.zeros(np.size(b))).reshape(np.shape(b)),
                    moments.reshape(np.shape(m)),
                ]
            elif layer.type == "conv" and values:
                f = layer.weights[0]
                order = (orders or {}).get(klayer.name)
                if order is not None and values[0].ndim == 2:
                    layer.weights[0] = layout.dense_kernel_to_filters(
                        values[0], as_4d(f).shape, order
                    ).reshape(np.shape(f))
                else:
                    layer.weights[0] = values[0].reshape(np.shape(f))
                if len(values) > 1 and len(layer.weights) > 1 and np.size(layer.weights[1]):
                    layer.weights[1] = values[1].reshape(np.shape(layer.weights[1]))
        except (ValueError, KeyError):
            out.layers[index] = net.layers[index].copy()
    return out


def _nonfinite_parameters(net: Net, model: keras.Model) -> list[str]:
    """Every parameter that holds NaN or Inf, on either side (after the weights were
    loaded): such a net or model is never called equivalent, whether or not the batch
    happens to reach the bad element."""
    out = []
    for layer in net.layers:
        for j, w in enumerate(layer.weights):
            text = nonfinite_summary(w, f"MatConvNet layer '{layer.name}' weights{{{j + 1}}}")
            if text:
                out.append(text)
    for v in model.weights:
        text = nonfinite_summary(np.asarray(v.numpy()), f"Keras variable '{getattr(v, 'path', v.name)}'")
        if text:
            out.append(text)
    return out


def _mark_limited(rows: list[Row], net: Net, last_bnorm: int, text: str) -> None:
    """Backward rows that the test-mode bnorm quirk changes: every derivative at or before
    the last bnorm layer, except the derivative at that layer's own output."""
    order = {l.name: i for i, l in enumerate(net.layers)}
    for r in rows:
        i = order.get(r.layer, -1)
        backward = r.tensor == "dzdx" or r.tensor.startswith("dzdw")
        if r.nonfinite_ref or r.nonfinite_keras:
            continue  # a known difference never excuses a NaN or an Inf
        if backward and i <= last_bnorm and not (i == last_bnorm and r.tensor == "dzdx"):
            r.limitation = text


def _first_divergence(
    report: Report, net: Net, res: list[Res], side: _KerasSide, matches: list[Match], mode: str, dialect: str
) -> Divergence | None:
    """Forward divergences point at the earliest layer whose output differs; with a
    clean forward pass, the backward pass is read from the loss down: a derivative that
    differs first at the output of layer i was made wrong by layer i+1; a parameter
    derivative that differs while its layer's output derivative agrees, by that layer.

    A layer whose output no Keras tensor reproduces is not blamed when Keras computes it
    faithfully from a tensor that Keras operations with no MatConvNet counterpart made
    after the last match: those extra operations are, and the layer they follow."""
    names = [l.name for l in net.layers]
    bad = [r for r in report.rows if not r.ok and not r.limitation]
    if not bad:
        return None
    order = {n: i for i, n in enumerate(names)}
    order["input"] = -1
    forward = ("x", "x+", "loss", "output")
    fwd = [r for r in bad if r.tensor in forward or r.tensor.startswith("w{")]
    if fwd:
        r = min(fwd, key=lambda r: order[r.layer])
        culprit = r.layer
        i = order[r.layer]
        if r.tensor == "x" and i < len(matches):
            culprit = _extra_operations_culprit(net, i, res, side, matches, mode, dialect) or culprit
        elif r.tensor == "output" and side.has_loss and len(net.layers) >= 2:
            last = len(net.layers) - 2
            # Keras operations after the last scoring layer are to blame, unless they all
            # belong to a softmax: then the loss's own part differs (a second softmax, a
            # log-softmax, a softmax over the wrong axis)
            if last < len(matches) and matches[last].exact:
                after = _ops_after(
                    side, matches[last].capture, side.runs[last] if last < len(side.runs) else None
                )
                if not after or not all(op in SOFTMAX_OPS for op in after):
                    culprit = names[last]
        return Divergence(layer=r.layer, keras=r.keras, tensor=r.tensor, culprit=culprit)
    r = max(bad, key=lambda r: (order[r.layer], r.tensor.startswith("dzdw")))
    culprit = r.layer
    if r.tensor == "dzdx":
        nxt = order[r.layer] + 1
        culprit = names[nxt] if nxt < len(names) else r.layer
        last = len(net.layers) - 2
        if side.has_loss and order[r.layer] == last and _extra_after(side, matches, last):
            culprit = r.layer  # Keras operations after the last scoring layer
    return Divergence(layer=r.layer, keras=r.keras, tensor=r.tensor, culprit=culprit)


def _ops_after(side: _KerasSide, j: int, own: set | None = None) -> list[str]:
    """The TensorFlow ops Keras ran after capture ``j``, outside the Keras layer that
    made it and the layers ``own`` (the run the structure pairs with the same MatConvNet
    layer: a Subsample after a strided conv); a grouped conv's side outputs and function
    calls left out."""
    mine = {side.labels[j].split(":")[0], *(own or ())}
    return [
        op
        for op, label in zip(side.op_types[j + 1 :], side.labels[j + 1 :], strict=True)
        if label.split(":")[0] not in mine and not op.startswith("__")
    ]


def _extra_after(side: _KerasSide, matches: list[Match], last: int) -> bool:
    """Keras ran operations of its own (not a softmax) between the last scoring layer's
    output and the model's output."""
    if last >= len(matches) or not matches[last].exact:
        return False
    after = _ops_after(side, matches[last].capture, side.runs[last] if last < len(side.runs) else None)
    return bool(after) and not all(op in SOFTMAX_OPS for op in after)


def _extra_operations_culprit(
    net: Net, i: int, res: list[Res], side: _KerasSide, matches: list[Match], mode: str, dialect: str
) -> str | None:
    """The layer before ``i`` when MatConvNet's layer ``i``, run on a tensor Keras
    computed after the last match, gives the tensor Keras computed for layer ``i`` (the
    nearest one, or one of the Keras layers the structure pairs with it, such as a
    conv's subsampling): the operations in between are extra."""
    match = matches[i]
    layer = net.layers[i]
    if match.capture is None or layer.type in ("dropout", *LOSS_TYPES):
        return None
    previous = [k for k in range(i) if matches[k].exact]
    if not previous:
        return None
    last = previous[-1]
    start = matches[last].capture
    out_hwc = tuple(as_4d(res[i + 1].x).shape[:3])
    hwc = tuple(as_4d(res[i].x).shape[:3])
    tol = tolerance_for("float64").forward * 1e3

    own = side.runs[i] if i < len(side.runs) else set()
    n = side.values[start].shape[0]
    # the tensors Keras computed for layer i: its nearest one, and its own run's
    targets = {}
    for k in range(start + 1, len(side.values)):
        view = match.view if k == match.capture else None
        if view is None and side.labels[k].split(":")[0] in own and side.values[k].shape[0] == n:
            view = usual_view(side.values[k].shape, out_hwc)
        if view is not None:
            targets[k] = to_mcn_view(side.values[k], view, out_hwc)
    for j in range(start + 1, max(targets, default=start)):
        if side.labels[j].split(":")[0] in own:
            continue  # the layer's own Keras run (its padding): not an extra operation
        value = side.values[j]
        if value.ndim != 4 or tuple(value.shape[1:]) != hwc:
            continue
        try:
            got = vl_simplenn(
                Net([layer.copy()]), to_hwcn(value), mode=mode, dialect=dialect, lrn_exact=True
            )[-1].x
        except Exception:  # a layer that does not run on it does not explain anything
            continue
        got = as_4d(np.asarray(got, dtype=np.float64))
        if any(k > j and t.shape == got.shape and measure(got, t, tol).ok for k, t in targets.items()):
            return net.layers[last].name
    return None
