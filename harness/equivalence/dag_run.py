"""Compare a MatConvNet DagNN network with a Keras model on one batch, var by var:
``compare_dag()``.

The reference runs ``DagNet.eval`` (LRN with the exact power, as ``compare``; DropOut masks
drawn from ``np.random.default_rng(seed)`` and handed to the Keras side in mode normal).
Its derivatives are those of the objective MatConvNet's ``cnn_train_dag`` seeds: 1 on
the output of every ``dagnn.Loss`` of type softmaxlog (classerror/topkerror layers are
metrics: no seed, as cnn_train_dag); a net without Loss layers is seeded with ones on
each of its output vars (vars nothing reads, so that one backward pass gives the
derivative of the sum of its outputs).

The Keras model is called as the user calls it and observed under one tape
(``observe``; through a float64 copy, ``precision``), its loss being MatConvNet's: the
softmaxlog of each Loss computed on the model's output with the Loss's labels, summed (a
net without Loss layers: the sum of the output). Every layer's output var, in execution
order, is found among the observed tensors by value (``match``; the Keras layer of the
same name is the hint). Rows (``Report``/``Row``, the records of ``compare``):

- per data input var: its derivative (``dzdx``);
- per layer output var, in execution order: its value (``x``) and derivative (``dzdx``);
  ``x+`` when a Keras layer with no DagNN counterpart changes the var before a layer
  reads it;
- per param, after the first layer that uses it: with ``weights="model"`` its value
  (``w{j}``, Keras layout) and its derivative (``dzdw{j}``, Keras layout; a param shared
  by several layers is one Keras variable, whose gradient is already the sum);
- the model's output against the Loss's score var, and the loss.

``Row.layer`` names the var (or param); ``Row.type`` the DagNN block that computes it; the
first Divergence's ``culprit`` is a DagNN layer name: forward, the earliest var (in
execution order) that differs, blamed on the layer computing it (or, for a Keras layer
inserted after it, on the layer it follows); else the backward pass read from the loss
down: a var derivative that differs first is blamed on the layer reading the var, a
param derivative that differs while its layer's output derivative agrees on that layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.equivalence.keras_pass import keras_batch_loss
from harness.equivalence.match import Match, match_outputs, to_mcn_view
from harness.equivalence.metrics import measure, nonfinite_summary
from harness.equivalence.observe import discover, observe
from harness.equivalence.precision import float64_copy
from harness.equivalence.report import LIMITATIONS, Divergence, Limitation, Report, Row
from harness.equivalence.rows import bias_scale, filter_scale, gain_scale, measure_row
from harness.equivalence.tolerance import Tolerance, tolerance_for
from harness.mcn.dagnn import MODES, DagLayer, DagNet
from harness.mcn.options import McnError, as_4d
from harness.translate.build import TranslationError, keras_name
from harness.translate.dag_build import (
    dag_inputs,
    dag_keras_layers,
    dag_outputs,
    dag_weights_to_keras,
    scale_weights,
)
from harness.translate.weights import conv_to_keras, to_hwcn, to_nhwc

if TYPE_CHECKING:
    import keras

__all__ = ["DAG_CONVENTION", "DAG_LIMITATIONS", "compare_dag"]

LOSS = "dagnn.Loss"
# Loss types that are metrics, never seeded (cnn_train_dag reports them, derives nothing)
METRIC_LOSSES = ("classerror", "topkerror")

DAG_CONVENTION = (
    "DagNN: the objective is the sum of the outputs of the softmaxlog Loss layers (each summed "
    "over pixels, divided by the batch size N unless its opts set normalise false), seeded with "
    "derOutputs 1 as cnn_train_dag; a net without Loss layers: the sum of its outputs"
)

DAG_LIMITATIONS = {
    "bnorm-test-mode-backward": Limitation(
        "bnorm-test-mode-backward",
        "test mode with BatchNorm: MatConvNet's DagNN backward pass through BatchNorm in test mode "
        "raises (vl_nnbnorm has no derivative with given moments), so only the forward pass is compared",
    ),
    "bnorm-moments-derivative": Limitation(
        "bnorm-moments-derivative",
        "BatchNorm moments params: MatConvNet's 'derivative' is the batch moments (trainMethod "
        "'average'), Keras' moving statistics have no gradient: not compared",
    ),
}


def compare_dag(
    net: DagNet,
    model: keras.Model,
    inputs: dict[str, np.ndarray],
    *,
    dtype: str = "float64",
    mode: str = "normal",
    weights: str = "net",
    seed: int = 0,
) -> Report:
    """Compare the DagNN ``net`` with a Keras ``model`` on one batch, var by var.

    ``inputs`` maps the net's input var names to ``H x W x C x N`` arrays (labels, 1-based,
    included for Loss layers: ``1 x 1 x 1 x N``, ``1 x N`` or ``H x W x 1 x N``). The model
    takes the data input as ``N x H x W x C`` and returns the net's output
    (``dag_outputs(net)``: a Loss's score var). With ``weights="net"`` the net's params are
    loaded into the model's layers of the same names (``dag_weights_to_keras``: models from
    ``to_keras_dag`` or with their layer names); ``weights="model"`` keeps the model's own,
    and compares them too (rows ``w{j}``). ``net`` itself is not changed (a copy runs).
    """
    if not isinstance(net, DagNet):
        raise McnError(
            f"Expected a DagNN network (harness.mcn.dagnn.DagNet). Received {type(net).__name__}: "
            "use harness.equivalence.compare for a simplenn net"
        )
    if weights not in ("net", "model"):
        raise McnError(f"Expected weights 'net' or 'model'. Received weights={weights!r}")
    if mode not in MODES:
        raise McnError(f"Expected mode to be one of {MODES}. Received mode={mode!r}")
    tolerance_for(dtype)  # raises for another dtype
    net = net.copy()
    order = net.execution_order()
    losses = _seeded_losses(net)
    data_vars = dag_inputs(net)
    outputs = dag_outputs(net)
    _check_inputs(net, inputs, data_vars)
    if len(data_vars) != 1:
        raise McnError(
            f"Expected a net with one data input (the observation engine calls the model on one tensor). "
            f"Received {len(data_vars)} data inputs: {', '.join(data_vars)}"
        )
    if len(outputs) != 1:
        raise McnError(
            f"Expected a net with one output var (the observation engine reads one model output). "
            f"Received {len(outputs)}: {', '.join(outputs)}; cut the others off with net.remove_layer"
        )
    for loss in losses:
        if loss.inputs[0] != outputs[0]:  # pragma: no cover - one output: every Loss reads it
            raise McnError(f"Loss layer '{loss.name}' reads '{loss.inputs[0]}', not the model's output")
    data = data_vars[0]
    x = as_4d(np.asarray(inputs[data], dtype=np.float64), data)
    bad_x = nonfinite_summary(x, f"input var '{data}'")
    if bad_x:
        raise McnError(f"{bad_x}: a comparison on non-finite input cannot tell anything apart")
    n = x.shape[3]

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
    for p in net.params:
        if isinstance(p.value, np.ndarray) and p.value.dtype.kind == "f":
            p.value = p.value.astype(np_dtype)
    if weights == "net":
        try:
            dag_weights_to_keras(net, run_model)
        except TranslationError as err:
            raise McnError(
                f"Could not load the net's params into the model by layer name ({err}). The model's "
                "layers are not named as to_keras_dag names them: compare with weights='model' to keep "
                "the model's own weights"
            ) from None
    problems = _nonfinite_parameters(net, run_model)

    # ---- the reference
    bnorm = any(l.type == "dagnn.BatchNorm" for l in net.layers)
    backward = not (mode == "test" and bnorm)
    limitations: list[Limitation] = []
    if not backward:
        limitations.append(DAG_LIMITATIONS["bnorm-test-mode-backward"])
    if any(l.type == "dagnn.LRN" for l in net.layers):
        limitations.append(LIMITATIONS["lrn-exact-power"])
    feed = {
        name: np.asarray(value, dtype=np_dtype if name in data_vars else np.float64)
        for name, value in inputs.items()
    }
    rng = np.random.default_rng(seed)
    net.reset()
    net.eval(feed, mode=mode, rng=rng, lrn_exact=True)
    drops = [net.layers[i] for i in order if net.layers[i].type == "dagnn.DropOut"]
    masks = {l.name: l.state["mask"] for l in drops if mode == "normal" and l.state.get("mask") is not None}
    if backward:
        if losses:
            seeds = {l.outputs[0]: 1.0 for l in losses}
        else:
            seeds = {v: np.ones_like(net.var(v).value) for v in outputs}
        net.reset()
        net.eval(feed, seeds, mode=mode, masks=masks, lrn_exact=True)

    # ---- the Keras side
    x_nhwc = to_nhwc(x.astype(np_dtype))
    found = discover(run_model, x_nhwc, training=mode == "normal")
    params = _param_variables(net, run_model, notes)
    variables = [v for entry in params.values() for v in [entry[0]] if v is not None]
    normalise = [_normalise(l) for l in losses]
    labels = [np.asarray(inputs[l.inputs[1]], dtype=np.float64) for l in losses]

    def loss(out):
        import tensorflow as tf

        if not losses:
            return tf.reduce_sum(out)
        total = 0
        for lab, norm in zip(labels, normalise, strict=True):
            total = total + keras_batch_loss(out, lab, n, "master" if norm else "beta25", False)
        return total

    obs = observe(
        run_model,
        x_nhwc,
        training=mode == "normal",
        loss=loss,
        masks=[to_nhwc(masks[l.name]) for l in drops if l.name in masks],
        weights=variables,
        eager=found.eager,
    )
    notes += obs.notes
    side = _Side(obs)

    # ---- matching, var by var
    layers = [net.layers[i] for i in order if net.layers[i].type != LOSS]
    refs = [net.var(l.outputs[0]).value for l in layers]
    hints = [keras_name(l.name) if keras_name(l.name) in side.labels else None for l in layers]
    runs = [{h, *(f"{h}_{s}" for s in ("pad", "subsample", "crop"))} if h else set() for h in hints]
    matches = _match(refs, side, tol, hints, runs)
    paired = {label for run in runs for label in run}

    # ---- rows
    rows: list[Row] = []
    where: dict[int, tuple[float, str]] = {}  # id(row) -> (position in execution order, culprit)
    pos = {l.name: k for k, l in enumerate(layers)}
    producer = {l.outputs[0]: l for l in layers}
    readers = _readers(net, [net.layers[i] for i in order])

    # a derivative that cancels to ~0 holds rounding noise of the derivatives it was summed
    # from: its scale is the largest derivative later in the execution order
    downstream = [0.0] * (len(layers) + 1)
    for k in range(len(layers) - 1, -1, -1):
        d = net.var(layers[k].outputs[0]).der if backward else None
        m = float(np.max(np.abs(d), initial=0.0)) if d is not None and np.size(d) else 0.0
        downstream[k] = max(downstream[k + 1], m if np.isfinite(m) else 0.0)

    def add(row: Row, at: float, culprit: str) -> None:
        rows.append(row)
        where[id(row)] = (at, culprit)

    if backward:
        for v in data_vars:
            ref = net.var(v).der
            if ref is None:
                continue
            got = None if obs.input_grad is None else to_hwcn(obs.input_grad)
            row = measure_row(
                layer=v,
                type="input",
                keras="input",
                tensor="dzdx",
                ref=ref,
                got=got,
                tolerance=tol.backward,
                scale=downstream[0],
            )
            add(row, -1.0, (readers.get(v) or [v])[0])
    seen_params: set[str] = set()
    for k, (layer, match) in enumerate(zip(layers, matches, strict=True)):
        var = layer.outputs[0]
        this = {"layer": var, "type": layer.type}
        for j, p in enumerate(layer.params):
            if weights == "model" and p not in seen_params and p in params:
                row = _weight_row(net, p, params[p], layer, j, tol)
                if row is not None:
                    add(row, k - 0.5, layer.name)
        hwc = tuple(as_4d(refs[k]).shape[:3])
        got = grad = None
        klabel = "-"
        if match.capture is not None:
            got, grad = side.in_mcn_layout(match, hwc)
            klabel = side.labels[match.capture]
        note = "; ".join(s for s in (f"output of layer '{layer.name}'", _match_note(match, side.labels)) if s)
        add(
            measure_row(
                **this, keras=klabel, tensor="x", ref=refs[k], got=got, tolerance=tol.forward, note=note
            ),
            k,
            layer.name,
        )
        for row in _extra_rows(k, layers, matches, side, tol, paired, this):
            add(row, k + 0.25, layer.name)
        ref_der = net.var(var).der if backward else None
        if ref_der is not None:
            if grad is None and match.capture is not None and side.grads[match.capture] is None:
                grad = np.zeros_like(np.asarray(ref_der, dtype=np.float64))  # no path to the loss
            d_row = measure_row(
                **this,
                keras=klabel,
                tensor="dzdx",
                ref=ref_der,
                got=grad,
                tolerance=tol.backward,
                scale=downstream[k + 1],
            )
            culprits = readers.get(var) or [layer.name]
            add(d_row, k + 0.5, culprits[0])
        if backward:
            for j, p in enumerate(layer.params):
                if p in seen_params or p not in params:
                    continue
                users = readers_of_param(net, p)
                scale = sum(_der_scale(net, net.layer(u), u_j) for u in users for u_j in _indexes(net, u, p))
                row = _param_der_row(net, p, params[p], layer, j, side, tol, users, scale)
                if row is not None:
                    add(row, k, layer.name)
        seen_params.update(layer.params)
    if backward and any(l.type == "dagnn.BatchNorm" for l in net.layers):
        limitations.append(DAG_LIMITATIONS["bnorm-moments-derivative"])

    # the model's output and the loss
    out_var = outputs[0]
    out_layer = producer.get(out_var)
    ref_out = as_4d(net.var(out_var).value)
    out_match = match_outputs([ref_out], [side.output], [side.output_label], tol.forward, layouts="own")[0]
    got_out = None
    if out_match.capture is not None:
        got_out = (
            to_hwcn(side.output) if out_match.view is None and side.output.ndim in (2, 4) else side.output
        )
        if out_match.view is not None:
            got_out = to_mcn_view(side.output, out_match.view, tuple(ref_out.shape[:3]))
    last = len(layers) - 1 if out_layer is None else pos[out_layer.name]
    culprit = out_layer.name if out_layer is not None else (layers[-1].name if layers else "-")
    add(
        measure_row(
            layer=out_var,
            type="output",
            keras=side.output_label,
            tensor="output",
            ref=ref_out,
            got=got_out,
            tolerance=tol.forward,
            note="the model's output",
        ),
        last + 0.75,
        culprit,
    )
    if losses:
        ref_loss = sum(float(np.asarray(net.var(l.outputs[0]).value).ravel()[0]) for l in losses)
        add(
            measure_row(
                layer="+".join(l.outputs[0] for l in losses),
                type=LOSS,
                keras="loss",
                tensor="loss",
                ref=ref_loss,
                got=side.loss,
                tolerance=tol.forward,
                note="sum of " + ", ".join(f"'{l.name}'" for l in losses),
            ),
            len(layers) + 1.0,
            losses[0].name,
        )
    for l in net.layers:
        if l.type == LOSS and l not in losses:
            notes.append(f"Loss layer '{l.name}' ({_loss_type(l)}) is a metric: no derivative, not compared")
    report = Report(
        rows=rows,
        dtype=run_dtype,
        mode=mode,
        dialect="master",
        convention=DAG_CONVENTION,
        notes=notes,
        limitations=limitations,
        problems=problems,
    )
    report.first_divergence = _first_divergence(rows, where)
    report.observed = {
        layers[k].outputs[0]: to_mcn_view(side.values[m.capture], m.view, tuple(as_4d(refs[k]).shape[:3]))
        for k, m in enumerate(matches)
        if m.capture is not None and m.view is not None
    }
    return report


# ------------------------------------------------------------------------------ checks


def _loss_type(layer: DagLayer) -> str:
    loss = layer.block.get("loss", "softmaxlog")
    return loss.lower() if isinstance(loss, str) else repr(loss)


def _seeded_losses(net: DagNet) -> list[DagLayer]:
    """The Loss layers whose output is seeded (softmaxlog); metrics (classerror, topkerror)
    are left out; any other loss type raises McnError naming the layer."""
    out = []
    for i in net.execution_order():
        layer = net.layers[i]
        if layer.type != LOSS:
            continue
        kind = _loss_type(layer)
        if kind in METRIC_LOSSES:
            continue
        if kind != "softmaxlog":
            raise McnError(
                f"layer '{layer.name}' (dagnn.Loss): loss {kind!r} is not supported by compare_dag yet "
                "(softmaxlog only; classerror/topkerror are skipped as metrics): remove it with "
                f"net.remove_layer({layer.name!r}) to compare the rest"
            )
        if len(layer.inputs) != 2:
            raise McnError(
                f"layer '{layer.name}' (dagnn.Loss): Expected 2 inputs (scores, labels). Received "
                f"{layer.inputs} (instance weights are not supported by compare_dag)"
            )
        opts = [o.lower() if isinstance(o, str) else o for o in list(layer.block.get("opts") or [])]
        if any(o in ("instanceweights", "classweights") for o in opts):
            raise McnError(
                f"layer '{layer.name}' (dagnn.Loss): instance or class weights are not supported "
                "by compare_dag"
            )
        out.append(layer)
    return out


def _normalise(layer: DagLayer) -> bool:
    opts = list(layer.block.get("opts") or [])
    for k in range(0, len(opts) - 1, 2):
        if isinstance(opts[k], str) and opts[k].lower() == "normalise":
            return bool(np.asarray(opts[k + 1]).ravel()[0])
    return True


def _check_inputs(net: DagNet, inputs: dict, data_vars: list[str]) -> None:
    if not isinstance(inputs, dict):
        raise McnError(f"Expected inputs as a dict of var name -> array. Received {type(inputs).__name__}")
    unknown = [k for k in inputs if k not in net.get_inputs()]
    if unknown:
        raise McnError(
            f"Expected inputs to name input vars of the net ({', '.join(net.get_inputs())}). "
            f"Received {', '.join(map(str, unknown))}"
        )
    needed = set(data_vars) | {l.inputs[1] for l in net.layers if l.type == LOSS and len(l.inputs) > 1}
    needed &= set(net.get_inputs())
    missing = [v for v in net.get_inputs() if v in needed and v not in inputs]
    if missing:
        raise McnError(f"Expected a value for input var(s) {', '.join(missing)} (labels included)")


def _nonfinite_parameters(net: DagNet, model) -> list[str]:
    out = []
    for p in net.params:
        if p.value is not None:
            text = nonfinite_summary(p.value, f"DagNN param '{p.name}'")
            if text:
                out.append(text)
    for v in model.weights:
        text = nonfinite_summary(np.asarray(v.numpy()), f"Keras variable '{getattr(v, 'path', v.name)}'")
        if text:
            out.append(text)
    return out


def _readers(net: DagNet, layers: list[DagLayer]) -> dict[str, list[str]]:
    """var -> the layers reading it, in execution order."""
    out: dict[str, list[str]] = {}
    for layer in layers:
        for v in layer.inputs:
            if layer.name not in out.setdefault(v, []):
                out[v].append(layer.name)
    return out


def readers_of_param(net: DagNet, p: str) -> list[str]:
    return [net.layers[i].name for i in net.execution_order() if p in net.layers[i].params]


# ------------------------------------------------------------------------------ the Keras side


class _Side:
    """The observed call as the rows read it."""

    def __init__(self, obs):
        self.obs = obs
        self.values = [np.asarray(c.tensor.numpy(), dtype=np.float64) for c in obs.captures]
        self.labels = [c.label for c in obs.captures]
        self.named = [c.layer is not None for c in obs.captures]
        self.op_types = [c.op_type for c in obs.captures]
        self.inside = [c.inside for c in obs.captures]
        self.layout_ops = [
            c.op_type in ("Transpose", "Reshape", "Squeeze", "ExpandDims") for c in obs.captures
        ]
        self.leaf_ids = {id(l) for l in obs.leaves}
        self.grads = obs.grads
        self.output = np.asarray(obs.output.numpy(), dtype=np.float64)
        self.loss = float(np.asarray(obs.loss.numpy()))
        self.output_label = next(
            (c.label for c in obs.captures if c.tensor is obs.output), getattr(obs.output, "name", "output")
        )

    def in_mcn_layout(self, match: Match, hwc: tuple) -> tuple[np.ndarray, np.ndarray | None]:
        value, g = self.values[match.capture], self.grads[match.capture]
        if match.view is None:
            as_is = to_hwcn(value) if value.ndim in (2, 4) else value
            return as_is, None if g is None else (to_hwcn(g) if np.ndim(g) in (2, 4) else g)
        return to_mcn_view(value, match.view, hwc), None if g is None else to_mcn_view(g, match.view, hwc)


def _match(refs: list, side: _Side, tol: Tolerance, hints: list, runs: list) -> list[Match]:
    """``match_outputs`` in execution order; a var it cannot place after the previous match
    (Keras may run parallel branches in another order than DagNN) is looked for again
    among every capture."""
    kw = {"named": side.named, "inside": side.inside, "layout_ops": side.layout_ops}
    matches = match_outputs(refs, side.values, side.labels, tol.forward, hints=hints, runs=runs, **kw)
    for k, m in enumerate(matches):
        if m.exact:
            continue
        again = match_outputs(
            [refs[k]], side.values, side.labels, tol.forward, hints=[hints[k]], runs=[runs[k]], **kw
        )[0]
        if again.exact:
            matches[k] = again
    return matches


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


def _extra_rows(
    k: int,
    layers: list[DagLayer],
    matches: list[Match],
    side: _Side,
    tol: Tolerance,
    paired: set[str],
    this: dict,
) -> list[Row]:
    """A Keras layer with no DagNN counterpart that changes var ``k`` (matched exactly)
    before a DagNN layer reads it: a leaf Keras layer's output of the same shape, computed
    from the var's tensor, that feeds the tensor compared with a reader's output."""
    m = matches[k]
    if not m.exact or m.capture is None:
        return []
    a = m.capture
    var = layers[k].outputs[0]
    matched = {x.capture for x in matches if x.exact}
    targets = [
        matches[r].capture
        for r, l in enumerate(layers)
        if var in l.inputs and matches[r].capture is not None and matches[r].capture != a
    ]
    obs, rows = side.obs, []
    for c in range(a + 1, len(side.values)):
        cap = obs.captures[c]
        if cap.layer is None or id(cap.layer) not in side.leaf_ids or c in matched:
            continue
        if side.labels[c] in paired:
            continue  # the Keras layer named after a DagNN layer: its counterpart, not an extra
        if side.values[c].shape != side.values[a].shape or cap.inside is not None:
            continue
        ta, tc = obs.captures[a].tensor, cap.tensor
        if not obs.feeds(ta, tc) or not any(obs.feeds(tc, obs.captures[b].tensor) for b in targets):
            continue
        diff = measure(side.values[a], side.values[c], tol.forward)
        what = "changes this var"
        if diff.ok:
            ga, gc = side.grads[a], side.grads[c]
            if ga is None or gc is None:
                continue
            diff = measure(gc, ga, tol.backward)
            what = "passes a different derivative through this var"
        if diff.ok:
            continue
        rows.append(
            Row(
                **this,
                keras=side.labels[c],
                tensor="x+",
                ok=False,
                numel=diff.numel,
                mismatches=diff.mismatches,
                max_abs=diff.max_abs,
                max_rel=diff.max_rel,
                tolerance=tol.forward,
                note=f"Keras layer '{side.labels[c]}' ({side.op_types[c]}) {what} before the next layer "
                "reads it; the DagNN net has no such layer",
            )
        )
        break
    return rows


# ------------------------------------------------------------------------------ params


@dataclass
class _ParamVar:
    variable: Any  # the Keras variable holding it (None: no Keras counterpart)
    layout: str  # "filters", "vector", "scale"
    klayer: str


def _param_variables(net: DagNet, model, notes: list[str]) -> dict[str, tuple]:
    """param name -> (Keras variable, layout, Keras layer name), for the params a Keras
    layer of the name ``dag_keras_layers`` gives holds (BatchNorm moments: None)."""
    try:
        names = dag_keras_layers(net)
    except TranslationError as err:
        notes.append(f"param derivatives not compared: {err}")
        return {}
    out: dict[str, tuple] = {}
    missing = []
    for i in net.execution_order():
        layer = net.layers[i]
        if not layer.params or any(p in out for p in layer.params):
            continue
        try:
            klayer = model.get_layer(names.get(layer.name, keras_name(layer.name)))
        except ValueError:
            missing.append(layer.name)
            continue
        if layer.type in ("dagnn.Conv", "dagnn.ConvTranspose"):
            held = [getattr(klayer, "kernel", None), getattr(klayer, "bias", None)]
            for p, v, how in zip(layer.params, held, ("filters", "vector"), strict=False):
                out[p] = (v, how, klayer.name)
        elif layer.type == "dagnn.BatchNorm":
            held = [getattr(klayer, "gamma", None), getattr(klayer, "beta", None), None]
            for p, v in zip(layer.params, held, strict=False):
                out[p] = (v, "vector", klayer.name)
        elif layer.type == "dagnn.Scale":
            held = list(klayer.trainable_variables)
            for p, v in zip(scale_weights(layer), held, strict=False):
                out[p] = (v, "scale", klayer.name)
    if missing:
        notes.append(
            f"no Keras layer named after DagNN layer(s) {', '.join(missing[:6])}: "
            "their params are not compared"
        )
    return out


def _keras_layout(value, how: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if how == "filters":
        return conv_to_keras(value)
    if how == "scale":
        return to_nhwc(as_4d(value))
    return value.ravel()


def _fit(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    return ref.reshape(got.shape) if ref.size == got.size else ref


def _weight_row(net: DagNet, p: str, entry: tuple, layer: DagLayer, j: int, tol: Tolerance) -> Row | None:
    variable, how, klabel = entry
    value = net.param(p).value
    if variable is None or value is None:
        return None
    got = np.asarray(variable.numpy(), dtype=np.float64)
    ref = _fit(_keras_layout(value, how), got)
    return measure_row(
        layer=p,
        type="param",
        keras=klabel,
        tensor=f"w{{{j + 1}}}",
        ref=ref,
        got=got,
        tolerance=tol.forward,
        same_layout=True,
        note=f"param '{p}' of layer '{layer.name}', Keras layout",
    )


def _param_der_row(
    net: DagNet,
    p: str,
    entry: tuple,
    layer: DagLayer,
    j: int,
    side: _Side,
    tol: Tolerance,
    users: list[str],
    scale: float = 0.0,
) -> Row | None:
    variable, how, klabel = entry
    der = net.param(p).der
    if variable is None or der is None:
        return None
    g = side.obs.weight_grads.get(id(variable))
    note = f"param '{p}' of layer '{layer.name}', Keras layout"
    if len(users) > 1:
        note += f"; shared by {', '.join(users)}: derivatives summed"
    got = None if g is None else np.asarray(g, dtype=np.float64)
    ref = _keras_layout(der, how)
    if got is not None:
        ref = _fit(ref, got)
    return measure_row(
        layer=p,
        type="param",
        keras=klabel,
        tensor=f"dzdw{{{j + 1}}}",
        ref=ref,
        got=got,
        tolerance=tol.parameter,
        same_layout=True,
        note=note,
        scale=scale if np.isfinite(scale) else 0.0,
    )


def _indexes(net: DagNet, layer: str, p: str) -> list[int]:
    return [j for j, q in enumerate(net.layer(layer).params) if q == p]


def _der_scale(net: DagNet, layer: DagLayer, j: int) -> float:
    """The size of the rounding noise of param ``j``'s derivative in ``layer`` where it
    cancels to ~0 (a bias or filters followed by BatchNorm, a gain followed by another
    BatchNorm): ``rows.bias_scale``/``filter_scale``/``gain_scale``."""
    x = net.var(layer.inputs[0]).value if layer.inputs else None
    dzdy = net.var(layer.outputs[0]).der if layer.outputs else None
    if x is None or dzdy is None:
        return 0.0
    if layer.type in ("dagnn.Conv", "dagnn.ConvTranspose"):
        return bias_scale(dzdy) if j == 1 else filter_scale(x, dzdy)
    if layer.type == "dagnn.BatchNorm":
        return gain_scale(x, dzdy, layer.block.get("epsilon", 1e-5)) if j == 0 else bias_scale(dzdy)
    return 0.0


# ------------------------------------------------------------------------------ blame


def _first_divergence(rows: list[Row], where: dict[int, tuple[float, str]]) -> Divergence | None:
    """Forward: the earliest differing var (or param value) in execution order; else the
    backward pass read from the loss down (the latest differing derivative)."""
    bad = [r for r in rows if not r.ok and not r.limitation]
    if not bad:
        return None
    forward = [r for r in bad if r.tensor in ("x", "x+", "output", "loss") or r.tensor.startswith("w{")]
    if forward:
        r = min(forward, key=lambda r: where[id(r)][0])
    else:
        r = max(bad, key=lambda r: where[id(r)][0])
    return Divergence(layer=r.layer, keras=r.keras, tensor=r.tensor, culprit=where[id(r)][1])
