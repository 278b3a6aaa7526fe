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

from typing import TYPE_CHECKING, Any

import numpy as np

from harness.equivalence.align import align
from harness.equivalence.keras_pass import KerasPass, run_keras, with_dtype
from harness.equivalence.metrics import nonfinite_summary
from harness.equivalence.reference_pass import cast_net, dropout_masks, run_reference
from harness.equivalence.report import Divergence, Limitation, Report, Row
from harness.equivalence.rows import bias_scale, filter_scale, gain_scale, measure_row
from harness.equivalence.tolerance import tolerance_for
from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d
from harness.mcn.simplenn import Res, vl_simplenn_tidy
from harness.translate.weights import WeightMap

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment
    from harness.equivalence.tolerance import Tolerance

__all__ = ["CONVENTIONS", "LIMITATIONS", "compare"]

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

    ``x`` is ``H x W x C x N`` (MatConvNet layout), ``labels`` 1-based (0 = ignore).
    The net's weights are loaded into ``model`` (or into a float64 clone of it when it
    computes in another precision than ``dtype``). With ``weights="model"`` the model
    keeps its own weights (to check a port's own weight transfer): each parameter is then
    compared too (rows ``w{j}``, in Keras' layout). Returns a Report with a
    row per aligned layer and tensor.
    """
    tol = tolerance_for(dtype)
    np_dtype = np.float64 if dtype == "float64" else np.float32
    net = cast_net(vl_simplenn_tidy(net), np_dtype)
    x = as_4d(np.asarray(x, dtype=np_dtype), "x")
    bad_x = nonfinite_summary(x, "x (the input batch)")
    if bad_x:
        raise McnError(f"{bad_x}: a comparison on non-finite input cannot tell anything apart")
    labels_arr = np.asarray(labels, dtype=np.float64)
    model = with_dtype(model, dtype)
    alignment = align(net, model, mapping)
    if weights not in ("net", "model"):
        raise McnError(f"Expected weights 'net' or 'model'. Received weights={weights!r}")
    params = WeightMap(net, model, alignment, dtype, load=weights == "net")
    problems = _nonfinite_parameters(net, model)

    # dropout masks drawn by the reference and shared with the Keras side ('normal' mode)
    res = run_reference(net, x, labels_arr, mode=mode, dialect=dialect, seed=seed)
    masks = dropout_masks(net, res, mode)
    kp = run_keras(model, alignment, x, labels_arr, dtype=dtype, mode=mode, dialect=dialect, masks=masks)

    rows = _rows(net, model, alignment, params, res, kp, tol)
    limitations = []
    if any(l.type in ("lrn", "normalize") for l in net.layers):
        limitations.append(LIMITATIONS["lrn-exact-power"])
    bnorms = [i for i, l in enumerate(net.layers) if l.type == "bnorm"]
    if mode == "test" and bnorms:
        limitation = LIMITATIONS["bnorm-test-mode-backward"]
        limitations.append(limitation)
        _mark_limited(rows, net, bnorms[-1], limitation.text)
    report = Report(
        rows=rows,
        dtype=dtype,
        mode=mode,
        dialect=dialect,
        convention=CONVENTIONS[dialect],
        alignment_problems=alignment.problems + params.problems,
        notes=params.notes,
        limitations=limitations,
        problems=problems,
    )
    report.first_divergence = _first_divergence(report, net)
    return report


def _rows(
    net: Net,
    model: keras.Model,
    alignment: Alignment,
    params: WeightMap,
    res: list[Res],
    kp: KerasPass,
    tol: Tolerance,
) -> list[Row]:
    """Every compared tensor, in order: the input's derivative, then per pair its
    parameters (weights="model"), output, output derivative and parameter derivatives;
    last the loss."""
    rows = [
        measure_row(
            layer="input",
            type="data",
            keras="input",
            tensor="dzdx",
            ref=res[0].dzdx,
            got=kp.input_grad,
            tolerance=tol.backward,
        )
    ]
    for idx, (tensor, klabel) in kp.tensors.items():
        pair = alignment.pairs[idx]
        layer = net.layers[idx]
        this = {"layer": layer.name, "type": layer.type}
        for kidx, wname, ref_w, keras_w in params.kept:
            if kidx == idx:
                rows.append(
                    measure_row(
                        **this,
                        keras=pair.param_layer,
                        tensor=wname,
                        ref=ref_w,
                        got=keras_w,
                        tolerance=tol.forward,
                        same_layout=True,
                    )
                )
        rows.append(
            measure_row(
                **this,
                keras=klabel,
                tensor="x",
                ref=res[idx + 1].x,
                got=tensor,
                tolerance=tol.forward,
                note="; ".join(pair.notes),
            )
        )
        rows.append(
            measure_row(
                **this,
                keras=klabel,
                tensor="dzdx",
                ref=res[idx + 1].dzdx,
                got=kp.tensor_grads[idx],
                tolerance=tol.backward,
            )
        )
        if pair.param_layer:
            rows += _parameter_rows(layer, model.get_layer(pair.param_layer), params, res, idx, kp, tol)
    if kp.loss_pair is not None:
        layer = net.layers[kp.loss_pair.index]
        rows.append(
            measure_row(
                layer=layer.name,
                type=layer.type,
                keras=kp.loss_pair.keras_label,
                tensor="loss",
                ref=res[-1].x,
                got=kp.loss,
                tolerance=tol.forward,
            )
        )
    return rows


def _parameter_rows(
    layer, klayer, params: WeightMap, res: list[Res], idx: int, kp: KerasPass, tol: Tolerance
) -> list[Row]:
    """The rows of a layer's parameter derivatives (and of a kernel's entries off
    MatConvNet's filter groups)."""
    gk = kp.param_grads[idx]
    mapped = params.grads_to_mcn(layer, klayer, gk) if all(g is not None for g in gk) else []
    this = {"layer": layer.name, "type": layer.type, "keras": klayer.name, "tolerance": tol.parameter}
    rows = []
    for name, g, off in mapped:
        j = int(name[5]) - 1
        scale = bias_scale(res[idx + 1].dzdx) if j == 1 else 0.0
        if j == 0 and layer.type == "bnorm":
            scale = gain_scale(res[idx].x, res[idx + 1].dzdx, layer.epsilon)
        elif j == 0 and layer.type == "conv":
            scale = filter_scale(res[idx].x, res[idx + 1].dzdx)
        rows.append(measure_row(**this, tensor=name, ref=res[idx].dzdw[j], got=g, scale=scale))
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


def _first_divergence(report: Report, net: Net) -> Divergence | None:
    """Forward divergences point at the earliest layer whose output differs; with a
    clean forward pass, the backward pass is read from the loss down: a derivative that
    differs first at the output of layer i was made wrong by layer i+1; a parameter
    derivative that differs while its layer's output derivative agrees, by that layer."""
    names = [l.name for l in net.layers]
    bad = [r for r in report.rows if not r.ok and not r.limitation]
    if not bad:
        return None
    fwd = [r for r in bad if r.tensor in ("x", "loss") or r.tensor.startswith("w{")]
    if fwd:
        r = min(fwd, key=lambda r: names.index(r.layer))
        return Divergence(layer=r.layer, keras=r.keras, tensor=r.tensor, culprit=r.layer)
    order = {n: i for i, n in enumerate(names)}
    order["input"] = -1
    r = max(bad, key=lambda r: (order[r.layer], r.tensor.startswith("dzdw")))
    culprit = r.layer
    if r.tensor == "dzdx":
        nxt = order[r.layer] + 1
        culprit = names[nxt] if nxt < len(names) else r.layer
    return Divergence(layer=r.layer, keras=r.keras, tensor=r.tensor, culprit=culprit)
