"""Compare a MatConvNet DagNN network with a Keras model on one batch, var by var:
``compare_dag()``.

The reference runs ``DagNet.eval`` (LRN with the exact power, as ``compare``; DropOut masks
drawn from ``np.random.default_rng(seed)`` and handed to the Keras side in mode normal).
Its derivatives are those of the objective MatConvNet's ``cnn_train_dag`` seeds: 1 on
the output of every ``dagnn.Loss`` of type softmaxlog (classerror/topkerror layers are
metrics: no seed, as cnn_train_dag); a net without Loss layers is seeded with ones on
each of its output vars (vars nothing reads, so that one backward pass gives the
derivative of the sum of its outputs). What each side is fed: ``dag_feed``.

The Keras model is called as the user calls it and observed under one tape
(``observe``; through a float64 copy, ``precision``; a net of several data inputs with
the list of them, several outputs returned as a list), its loss being MatConvNet's: the
softmaxlog of each Loss computed on the model's output of its scores with the Loss's
labels, summed (a net without Loss layers: the sum of the outputs). Every layer's output var, in execution
order, is found among the observed tensors by value (``match``; the Keras layer of the
same name is the hint). The rows and the first divergence: ``dag_rows``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.equivalence.dag_feed import (
    LOSS,
    check_activation_budget,
    check_inputs,
    check_output_count,
    feed_order,
    loss_type,
    model_tensors,
    normalised,
    seeded_losses,
)
from harness.equivalence.dag_rows import DagRows, param_variables
from harness.equivalence.keras_pass import KerasSide, keras_batch_loss
from harness.equivalence.match import Match, match_outputs, to_mcn_view
from harness.equivalence.metrics import nonfinite_summary, nonfinite_weights
from harness.equivalence.observe import discover, observe
from harness.equivalence.precision import comparison_model
from harness.equivalence.report import LIMITATIONS, Limitation, Report
from harness.equivalence.tolerance import Tolerance, tolerance_for
from harness.mcn.dagnn import MODES, DagNet
from harness.mcn.options import McnError, as_4d
from harness.translate.build import TranslationError, keras_name
from harness.translate.dag_build import dag_inputs, dag_outputs, dag_weights_to_keras
from harness.translate.weights import to_nhwc

if TYPE_CHECKING:
    import keras

__all__ = ["DAG_CONVENTION", "DAG_LIMITATIONS", "compare_dag"]

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
    takes the data input as ``N x H x W x C`` (a net of several data inputs: a list, in the
    model's input order, matched to the data vars by name or else by order with the
    shapes checked: ``dag_feed.feed_order``, said in a note) and returns the net's output
    (``dag_outputs(net)``: a Loss's score var; several: a list in that order, every one
    compared, the derivatives seeded on each). With ``weights="net"`` the net's params are
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
    given = net  # the budget's probe is remembered for the caller's net (see check_activation_budget)
    net = net.copy()
    order = net.execution_order()
    losses = seeded_losses(net)
    data_vars = dag_inputs(net)
    outputs = dag_outputs(net)
    check_inputs(net, inputs, data_vars)
    if not outputs:
        raise McnError("Expected a net with output vars (vars no layer reads). Received none")
    for loss in losses:
        if loss.inputs[0] not in outputs:  # pragma: no cover - dag_outputs holds every Loss's scores
            raise McnError(
                f"Loss layer '{loss.name}' reads '{loss.inputs[0]}', not one of the model's outputs"
            )
    xs = {v: as_4d(np.asarray(inputs[v], dtype=np.float64), v) for v in data_vars}
    for v, x in xs.items():
        bad_x = nonfinite_summary(x, f"input var '{v}'")
        if bad_x:
            raise McnError(f"{bad_x}: a comparison on non-finite input cannot tell anything apart")
    sizes = {v: x.shape[3] for v, x in xs.items()}
    if len(set(sizes.values())) > 1:
        raise McnError(f"Expected data inputs of one batch size N. Received {sizes}")
    n = next(iter(sizes.values()))
    check_activation_budget(given, {v: x.shape[:3] for v, x in xs.items()}, n)
    feed_vars, feed_note = feed_order(model, data_vars, {v: x.shape[:3] for v, x in xs.items()})

    def batch(np_dtype):
        """The data as the model takes it: one N x H x W x C array, or a list in its input order."""
        arrays = [to_nhwc(xs[v].astype(np_dtype)) for v in feed_vars]
        return arrays[0] if len(arrays) == 1 else arrays

    several, several_inputs = len(outputs) > 1, len(feed_vars) > 1
    if several and model_tensors(model, "outputs"):  # before the weights are loaded by layer name
        check_output_count(outputs, len(model_tensors(model, "outputs")))
    run_model, run_dtype, notes = comparison_model(model, batch(np.float64), dtype)
    notes += [feed_note] if feed_note else []
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
    problems = [
        nonfinite_summary(p.value, f"DagNN param '{p.name}'") for p in net.params if p.value is not None
    ]
    problems = [text for text in problems if text] + nonfinite_weights(run_model)

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
    # With a loss, one pass, forward and backward (the values are kept: conserveMemory
    # false). Without one, ones are seeded on every output, shaped as a forward pass finds
    # them first. The DropOut masks are drawn from the same seed in every pass, and read
    # afterwards for the Keras side.
    seeds = {l.outputs[0]: 1.0 for l in losses} if backward and losses else None
    if backward and not losses:
        net.reset()
        net.eval(feed, mode=mode, rng=np.random.default_rng(seed), lrn_exact=True)
        seeds = {v: np.ones_like(net.var(v).value) for v in outputs}
    net.reset()
    net.eval(feed, seeds, mode=mode, rng=np.random.default_rng(seed), lrn_exact=True)
    drops = [net.layers[i] for i in order if net.layers[i].type == "dagnn.DropOut"]
    masks = {l.name: l.state["mask"] for l in drops if mode == "normal" and l.state.get("mask") is not None}

    # ---- the Keras side
    x_nhwc = batch(np_dtype)
    found = discover(run_model, x_nhwc, training=mode == "normal", several_outputs=several)
    check_output_count(outputs, found.outputs)
    params = param_variables(net, run_model, notes)
    variables = [v for entry in params.values() for v in [entry[0]] if v is not None]
    normalise = [normalised(l) for l in losses]
    labels = [np.asarray(inputs[l.inputs[1]], dtype=np.float64) for l in losses]

    def loss(out):
        import tensorflow as tf

        outs = out if several else [out]
        if not losses:  # the sum of the outputs: ones seeded on each
            total = tf.reduce_sum(outs[0])
            for o in outs[1:]:
                total = total + tf.reduce_sum(o)
            return total
        total = 0
        for l, lab, norm in zip(losses, labels, normalise, strict=True):
            scores = outs[outputs.index(l.inputs[0])]
            total = total + keras_batch_loss(scores, lab, n, "master" if norm else "beta25", False)
        return total

    obs = observe(
        run_model,
        x_nhwc,
        training=mode == "normal",
        loss=loss,
        masks=[to_nhwc(masks[l.name]) for l in drops if l.name in masks],
        weights=variables,
        eager=found.eager,
        several_outputs=several,
    )
    notes += obs.notes
    side = KerasSide(obs)

    # ---- matching, var by var
    layers = [net.layers[i] for i in order if net.layers[i].type != LOSS]
    refs = [net.var(l.outputs[0]).value for l in layers]
    hints = [keras_name(l.name) if keras_name(l.name) in side.labels else None for l in layers]
    runs = [{h, *(f"{h}_{s}" for s in ("pad", "subsample", "crop"))} if h else set() for h in hints]
    matches = _match(refs, side, tol, hints, runs)

    # ---- rows
    rows = DagRows(net, layers, matches, side, tol, params, backward=backward)
    # the Keras input of one data var is "input"; of several, each its own name
    declared = [str(getattr(t, "name", "input")) for t in model_tensors(model)]
    declared = declared if several_inputs and declared else ["input"] * len(feed_vars)
    kinput = dict(zip(feed_vars, declared, strict=True))
    rows.input_rows({v: (obs.input_grads[feed_vars.index(v)], kinput[v]) for v in data_vars})
    rows.var_rows(refs, {label for run in runs for label in run}, weights=weights)
    if backward and bnorm:
        limitations.append(DAG_LIMITATIONS["bnorm-moments-derivative"])
    rows.output_rows(outputs, losses)
    for l in net.layers:
        if l.type == LOSS and l not in losses:
            notes.append(f"Loss layer '{l.name}' ({loss_type(l)}) is a metric: no derivative, not compared")
    report = Report(
        rows=rows.rows,
        dtype=run_dtype,
        mode=mode,
        dialect="master",
        convention=DAG_CONVENTION,
        notes=notes,
        limitations=limitations,
        problems=problems,
    )
    report.first_divergence = rows.first_divergence()
    report.observed = {
        layers[k].outputs[0]: to_mcn_view(side.values[m.capture], m.view, tuple(as_4d(refs[k]).shape[:3]))
        for k, m in enumerate(matches)
        if m.capture is not None and m.view is not None
    }
    return report


def _match(refs: list, side: KerasSide, tol: Tolerance, hints: list, runs: list) -> list[Match]:
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
