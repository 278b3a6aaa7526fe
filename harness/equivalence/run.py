"""Compare a MatConvNet net with a Keras model on one batch: ``compare()``.

The reference runs ``vl_simplenn`` (``reference_pass``: LRN with the exact power, since
Keras has no ``fast_pow``; ``dzdy = 1``, or ones for a net without a loss layer). The
user's model is called as they call it and observed under one tape (``observe``; through
a float64 copy, ``precision``). Each layer's output is found among the observed tensors
by value (``match``); the structural alignment (``align``) pairs the parameter layers,
whose weights are loaded from the net (``harness.translate.weights.WeightMap``; a Keras
Conv2D/Dense without MatConvNet's filter groups gets the filters embedded
block-diagonally and its off-diagonal derivatives reported), and hints at the rest.
Each tensor pair becomes a Row (``rows``); known, accepted differences are Limitations;
``blame`` names the first Divergence.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.equivalence.align import align
from harness.equivalence.blame import first_divergence
from harness.equivalence.keras_pass import LOSS_TYPES, KerasSide, keras_batch_loss
from harness.equivalence.match import match_outputs, to_mcn_view
from harness.equivalence.metrics import nonfinite_summary, nonfinite_weights
from harness.equivalence.observe import discover, observe
from harness.equivalence.precision import comparison_model, model_dtype, rounded_reference_net
from harness.equivalence.reference_pass import cast_net, dropout_masks, run_reference
from harness.equivalence.report import LIMITATIONS, Report, Row
from harness.equivalence.rows import build_rows
from harness.equivalence.tolerance import tolerance_for
from harness.mcn.geometry import layer_output_shapes
from harness.mcn.matfile import require_simplenn
from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d, check_budget, memory_budget
from harness.mcn.simplenn import vl_simplenn_tidy
from harness.translate import weights as layout
from harness.translate.weights import WeightMap, to_nhwc

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment

__all__ = ["CONVENTIONS", "LIMITATIONS", "compare", "keras_parameters", "matlab_labels"]

CONVENTIONS = {
    "master": "loss summed over pixels, divided by the batch size N (MatConvNet master); "
    "derivatives are those of that loss on both sides",
    "beta25": "loss summed over pixels and over the batch (MatConvNet v1.0-beta25); "
    "derivatives are those of that loss on both sides",
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
    require_simplenn(net, "compare")
    if weights not in ("net", "model"):
        raise McnError(f"Expected weights 'net' or 'model'. Received weights={weights!r}")
    tidy = vl_simplenn_tidy(net)
    x = as_4d(np.asarray(x, dtype=np.float64), "x")
    bad_x = nonfinite_summary(x, "x (the input batch)")
    if bad_x:
        raise McnError(f"{bad_x}: a comparison on non-finite input cannot tell anything apart")
    if labels is None and tidy.layers and tidy.layers[-1].type in LOSS_TYPES:
        raise McnError(f"Expected labels: the net ends in a loss layer ('{tidy.layers[-1].name}')")
    labels_arr = None if labels is None else matlab_labels(labels, x.shape[3])
    _check_memory(tidy, x, dtype)
    run_model, run_dtype, notes = comparison_model(model, to_nhwc(x), dtype)
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
    side = KerasSide(obs, variables, alignment, has_loss, probabilities)
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
        runs=side.runs,
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
            runs=side.runs,
        )
    rows = build_rows(net, alignment, params, res, side, matches, tol, alt, model_dtype(model))
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
    report.first_divergence = first_divergence(report, net, res, side, matches, mode, dialect)
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
    return out + nonfinite_weights(model)


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
