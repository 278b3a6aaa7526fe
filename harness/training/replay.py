"""compare_training: cnn_train's steps (NumPy reference) against a Keras training set-up.

Both sides start from the net's weights and see the same batches. After every step each
parameter and each optimizer state is mapped to MatConvNet's layout and compared; the
TrainingReport names the first step, parameter and state that part and by how much.

The reference is ``harness.mcn.cnn_train_step`` in float64 with ``learningRate(min(epoch,
end))`` for the epoch each step belongs to. The Keras step (``keras_step``) is what
``model.fit`` does: forward in training mode, the loss, its gradient, ``optimizer.apply``.
The loss (``loss`` None) follows MatConvNet's convention for the dialect on the model's
output (class scores, or probabilities when the model ends in a softmax), plus the model's
regularisation losses; what the optimizer receives is MatConvNet's ``dzdw / d``.

Parameters and optimizer states are mapped to cnn_train's (``state.solverState{l}{j}``)
as ``state`` describes; other optimizers, or a Keras optimizer of another kind than
``train_opts.solver``, are compared by their weights only (a note says so). The report's
notes also give the static differences of the set-up, from the one optimizer table that
``harness.diagnosis.diagnose`` shares (``harness.diagnosis.optimizer_rules``).

bnorm moments: Keras' BatchNormalization updates its moving statistics itself; the mean
follows cnn_train's ``(1 - lr3) m + lr3 mu`` exactly and is compared (``w{3}.mu``), sigma
(``w{3}.sigma``, mapped as ``sqrt(moving_variance + epsilon)``) differs by design (Keras
averages the variance, MatConvNet sigma): a known limitation, not a divergence.

Scales: a tensor's errors are relative to the larger of max|ref| and max|keras|, and at
least the largest reference value among its layer's parameters (for a state: the same field
across the net), so that the rounding noise of an exactly-zero derivative (a conv bias
before a bnorm, a bnorm beta made irrelevant by a later bnorm) does not count.

The report and its JSON schema: ``harness.training.report``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.diagnosis.optimizer_rules import optimizer_differences
from harness.equivalence.align import align
from harness.equivalence.keras_pass import with_dtype
from harness.equivalence.metrics import measure
from harness.equivalence.reference_pass import cast_net
from harness.equivalence.run import CONVENTIONS
from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d
from harness.mcn.train import TrainOpts, cnn_train_step, prepare_net
from harness.training.keras_step import current_learning_rate, ends_in_probabilities, keras_train_step
from harness.training.report import TrainingReport, TrainingRow, find_first_divergence
from harness.training.state import (
    KerasParam,
    keras_params,
    keras_variable_value,
    reference_value,
    state_pairs,
    state_reader,
)
from harness.translate.weights import WeightMap

if TYPE_CHECKING:
    import keras

__all__ = [
    "SIGMA_LIMITATION",
    "TRAINING_TOLERANCES",
    "TrainingReport",
    "TrainingRow",
    "compare_training",
    "keras_train_step",
]

# Normwise relative error (max|keras - ref| / scale, the scale at least max|ref| and
# max|keras|) above which a weight or state counts as divergent. float64, measured with the
# optimizers of harness.translate.optim over 4 steps of the golden cnn_train nets: SGD,
# Nesterov and adadelta <= 6e-16, adam 4e-14, rmsprop 2.6e-13, adagrad 2.6e-12 (adaptive
# solvers divide by sqrt(g^2): an element whose gradient is tiny next to the layer's largest
# carries its rounding error, relative to itself, into a step of full size); on the bnorm
# net adam 1.1e-11. 1e-10 leaves a margin of 9x over the worst of these and still flags the
# smallest real difference measured (Keras SGD's float32 momentum and rate: 4.5e-10 after one
# step). Not separable by any tolerance: rmsprop and adagrad turn the rounding noise of an
# exactly-zero derivative (the beta of a bnorm whose shift a later bnorm removes) into
# steps of lr*noise/eps (1.6e-9 and 1.6e-8 on the golden bnorm net). float32: a Keras model
# computing in float32 against the float64 reference, ~1e-7 per step.
TRAINING_TOLERANCES = {"float64": 1e-10, "float32": 1e-4}

SIGMA_LIMITATION = (
    "bnorm moments: Keras averages the variance (moving_variance), cnn_train averages "
    "sigma = sqrt(variance + epsilon); only the mean follows the same formula"
)


def compare_training(
    net: Net,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    batches: list,
    train_opts: TrainOpts | None = None,
    *,
    epochs_of_steps: Any = None,
    dialect: str | None = None,
    dtype: str = "float64",
    loss: Any = None,
    mapping: dict[str, list[str]] | None = None,
    tolerance: float | None = None,
) -> TrainingReport:
    """Train ``net`` (cnn_train, NumPy) and ``model`` (with ``optimizer``) on the same
    ``batches`` from the same weights and compare them after every step.

    ``batches`` is a list of ``(x, labels)``: ``x`` ``H x W x C x N``, ``labels`` ``1 x N``
    (1-based, 0 = ignore). ``epochs_of_steps`` gives the 1-based epoch of each step for
    cnn_train's ``learningRate(min(epoch, end))``; None takes them from the optimizer when
    its rate is a ``MatConvNetSchedule``, else puts every step in epoch 1. ``dialect``
    None is ``train_opts.dialect``. The net's weights are loaded into ``model`` (overwriting
    its own; a float64 clone is used when the model computes in another precision) and
    ``optimizer`` is built on the model's variables (pass a fresh one). ``mapping``
    ({MatConvNet name: [Keras names]}) overrides the layer alignment. Returns a
    TrainingReport (rows per step, layer and tensor; first divergence; text and JSON).
    """
    opts = TrainOpts() if train_opts is None else train_opts
    if not isinstance(opts, TrainOpts):
        raise McnError(f"Expected train_opts to be a TrainOpts. Received train_opts={type(opts).__name__}")
    dialect = opts.dialect if dialect is None else dialect
    if dialect not in CONVENTIONS:
        raise McnError(f"Expected dialect to be one of {list(CONVENTIONS)}. Received dialect={dialect!r}")
    if dialect != opts.dialect:
        opts = dataclasses.replace(opts, dialect=dialect)
    if dtype not in TRAINING_TOLERANCES:
        raise McnError(f"Expected dtype 'float64' or 'float32'. Received dtype={dtype!r}")
    if getattr(optimizer, "built", False):
        raise McnError(
            "Expected a fresh optimizer (compare_training builds it on the model's variables). "
            f"Received a built {type(optimizer).__name__}"
        )
    if not isinstance(batches, list | tuple) or not batches:
        raise McnError(
            f"Expected batches to be a non-empty list of (x, labels). Received batches={batches!r}"
        )
    tol = TRAINING_TOLERANCES[dtype] if tolerance is None else float(tolerance)
    np_dtype = np.float64 if dtype == "float64" else np.float32
    ref = prepare_net(net, np.float64)
    dropout = [l.name for l in ref.layers if l.type == "dropout"]
    if dropout:
        raise McnError(
            f"Expected a net without dropout layers (the two sides cannot share masks during training). "
            f"Received dropout layers {dropout}"
        )
    batches = [_batch(b, k) for k, b in enumerate(batches)]
    epochs = _epochs(epochs_of_steps, len(batches), optimizer)
    rates = np.asarray(opts.learning_rate, dtype=np.float64).ravel()

    model = with_dtype(model, dtype)
    alignment = align(ref, model, mapping)
    weights = WeightMap(cast_net(ref, np_dtype), model, alignment, dtype, load=True)
    params = keras_params(ref, model, alignment, weights)
    probabilities = ends_in_probabilities(model, alignment)
    notes = list(weights.notes)
    limitations: list[str] = []
    if any(p.role == "variance" for p in params):
        limitations.append(SIGMA_LIMITATION)

    rows: list[TrainingRow] = []
    steps: list[dict] = []
    state = None
    # previous values (MatConvNet layout) for the per-step change: {(param, field): (ref, keras)}
    prev: dict[tuple[int, str], tuple[Any, Any]] = {
        (id(p), "w"): (reference_value(ref, p), p.to_mcn(keras_variable_value(p))[0]) for p in params
    }
    last = ref.layers[-1]
    state_of, state_note = state_reader(optimizer, opts)
    notes += [state_note] if state_note else []
    first_rate = float(rates[min(epochs[0], rates.size) - 1])
    differences = optimizer_differences(
        optimizer, opts, ref, rate=first_rate, dtype=dtype, model=model, alignment=alignment
    )
    notes += [d.note for d in differences]
    for k, ((x, labels), epoch) in enumerate(zip(batches, epochs, strict=True)):
        step = k + 1
        lr = float(rates[min(epoch, rates.size) - 1])
        ref, state, objective = cnn_train_step(
            ref, state, x.astype(np.float64), labels, learning_rate=lr, opts=opts
        )
        k_lr = current_learning_rate(optimizer)
        k_obj = keras_train_step(
            model, optimizer, x, labels, dialect=dialect, loss=loss, probabilities=probabilities, dtype=dtype
        )
        steps.append(
            {
                "step": step,
                "epoch": epoch,
                "learning_rate": lr,
                "keras_learning_rate": k_lr,
                "objective": float(objective),
                "keras_objective": k_obj,
            }
        )
        r = _compare(objective, k_obj, tol)
        rows.append(_make_row(last.name, last.type, "loss", "objective", r, step, epoch, "objective"))
        items = _step_items(params, ref, state, state_of, k_lr)
        floors: dict[tuple, float] = {}
        for it in items:
            if it["group"] is not None:
                scale = float(np.max(np.abs(np.asarray(it["want"], dtype=np.float64)), initial=0.0))
                floors[it["group"]] = max(floors.get(it["group"], 0.0), scale)
        for it in items:
            p = it["param"]
            before = prev.get(it["key"])
            r = _compare(
                it["want"],
                it["got"],
                tol,
                None if before is None else before[0],
                None if before is None else before[1],
                it["keras_shape"],
                floors.get(it["group"], 0.0),
                it["key"] is not None,
            )
            row = _make_row(p.layer, p.type, p.key, it["tensor"], r, step, epoch, it["kind"], it["note"])
            if p.role == "variance" and not row.ok and not (row.nonfinite_ref or row.nonfinite_keras):
                row.limitation = SIGMA_LIMITATION
            rows.append(row)
            if it["key"] is not None:
                prev[it["key"]] = (it["want"], it["got"])
    changed = [s["step"] for s in steps if s["keras_learning_rate"] is not None and not math.isclose(
        s["keras_learning_rate"], s["learning_rate"], rel_tol=1e-6, abs_tol=0.0)]  # fmt: skip
    if changed:
        s = steps[changed[0] - 1]
        notes.append(
            f"Keras' learning rate differs from cnn_train's from step {s['step']} on "
            f"({s['keras_learning_rate']:.6g} vs {s['learning_rate']:.6g} in epoch {s['epoch']})"
        )
    report = TrainingReport(
        rows=rows,
        steps=steps,
        dtype=dtype,
        dialect=dialect,
        convention=CONVENTIONS[dialect]
        + ("" if loss is None else f"; Keras trains with {_loss_name(loss)} instead"),
        solver=_describe(opts),
        optimizer=type(optimizer).__name__,
        tolerance=tol,
        alignment_problems=alignment.problems + weights.problems,
        notes=notes,
        limitations=limitations,
    )
    report.first_divergence = find_first_divergence(report)
    return report


def _step_items(params: list[KerasParam], ref: Net, state: dict, state_of, k_lr) -> list[dict]:
    """Everything to compare after a step, in MatConvNet's layout. ``group``: tensors
    whose largest reference value is a floor for each other's scale: a layer's
    parameters, and one state field across the net. A parameter that stays ~0 (the beta
    of a bnorm whose shift a later bnorm removes, a conv bias before a bnorm) has a
    derivative that is exactly zero in exact arithmetic: both sides hold rounding noise,
    meaningful only next to the layer's other parameters (its state next to the net's
    other gradients)."""
    items = []
    for p in params:
        got, off = p.to_mcn(keras_variable_value(p))
        moments = p.role in ("mean", "variance")
        items.append(
            {
                "param": p,
                "tensor": {"mean": "w{3}.mu", "variance": "w{3}.sigma"}.get(p.role, f"w{{{p.j + 1}}}"),
                "kind": "weight",
                "want": reference_value(ref, p),
                "got": got,
                "key": (id(p), "w"),
                "group": None if moments else (p.index, "w"),
                "keras_shape": p.keras_shape,
                "note": "",
            }
        )
        if off is not None:
            items.append(
                {
                    "param": p,
                    "tensor": "w{1}*",
                    "kind": "weight",
                    "want": np.zeros(off.shape),
                    "got": off,
                    "key": None,
                    "group": (p.index, "w"),
                    "keras_shape": None,
                    "note": "Keras-only weights off MatConvNet's filter groups (MatConvNet has none)",
                }
            )
        if state_of is None or moments or not p.variable.trainable:
            continue
        got_state = state_of(p.variable, k_lr if k_lr else 1.0)
        for name, want_s, got_s in state_pairs(state["solverState"][p.index][p.j], got_state):
            scalar = name == "t"
            items.append(
                {
                    "param": p,
                    "tensor": f"solverState{{{p.j + 1}}}" + (f".{name}" if name else ""),
                    "kind": "state",
                    "want": float(want_s) if scalar else want_s,
                    "got": float(got_s) if scalar else p.to_mcn(got_s)[0],
                    "key": None if scalar else (id(p), f"state.{name}"),
                    "group": None if scalar else ("state", name),
                    "keras_shape": None if scalar else p.keras_shape,
                    "note": "",
                }
            )
    return items


def _filled(value, shape) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64)
    return np.full(shape, float(a.ravel()[0])) if a.size == 1 and shape != a.shape else a.reshape(shape)


def _compare(
    ref, got, tol: float, prev_ref=None, prev_got=None, keras_shape=None, floor=0.0, update=False
) -> dict:
    """Normwise errors of ``got`` against ``ref`` (MatConvNet layout); the scale is the
    larger of the two maxima (a reference of zeros against Keras' non-zeros is a
    divergence) and at least ``floor``. With ``update``, ``update_rel`` compares this
    step's changes from the previous values (None: 0, cnn_train's initial state).
    ``keras_shape``: the Keras array the same elements come from (C order), for the
    worst index in Keras' layout."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    out: dict[str, Any] = {"numel": int(got.size), "tolerance": tol}
    if ref.shape != got.shape:
        if ref.size == got.size or ref.size == 1:
            ref = _filled(ref, got.shape)  # MATLAB shapes; cnn_train's state 0 before an update
        else:
            note = f"shape mismatch: MatConvNet {ref.shape} vs Keras {got.shape}"
            return {**out, "ok": False, "mismatches": int(got.size), "note": note}
    if ref.size == 0:
        return {**out, "ok": True, "mismatches": 0}
    m = measure(ref, got, tol, floor=floor, symmetric=True)
    worst = m.worst
    keras_idx = None
    if keras_shape is not None and int(np.prod(keras_shape)) == ref.size:
        flat = int(np.ravel_multi_index(worst, ref.shape)) if ref.ndim else 0
        keras_idx = [int(i) for i in np.unravel_index(flat, tuple(keras_shape))]
    out.update(
        ok=m.ok,
        mismatches=m.mismatches,
        max_abs=m.max_abs,
        max_rel=m.max_rel,
        worst_index_mcn=[int(i) for i in worst],
        worst_index_keras=keras_idx,
        ref_value=m.ref_value,
        keras_value=m.got_value,
        nonfinite_ref=m.nonfinite_ref,
        nonfinite_keras=m.nonfinite_got,
    )
    if m.note():
        out["note"] = m.note()
    if update:
        d_ref = ref - (0.0 if prev_ref is None else _filled(prev_ref, ref.shape))
        d_got = got - (0.0 if prev_got is None else _filled(prev_got, got.shape))
        d_scale = max(float(np.max(np.abs(d_ref))), float(np.max(np.abs(d_got))), 1e-300)
        d_diff = float(np.max(np.abs(d_got - d_ref)))
        out["update_rel"] = d_diff / d_scale if d_diff else 0.0
    return out


def _make_row(layer, type_, keras, tensor, r: dict, step, epoch, kind, note="") -> TrainingRow:
    return TrainingRow(
        layer=layer,
        type=type_,
        keras=keras,
        tensor=tensor,
        ok=r["ok"],
        numel=r.get("numel", 0),
        mismatches=r.get("mismatches", 0),
        max_abs=r.get("max_abs", 0.0),
        max_rel=r.get("max_rel", 0.0 if r["ok"] else 1.0),
        tolerance=r.get("tolerance", 0.0),
        worst_index_mcn=r.get("worst_index_mcn"),
        worst_index_keras=r.get("worst_index_keras"),
        ref_value=r.get("ref_value"),
        keras_value=r.get("keras_value"),
        note="; ".join(n for n in (note, r.get("note", "")) if n),
        nonfinite_ref=r.get("nonfinite_ref", 0),
        nonfinite_keras=r.get("nonfinite_keras", 0),
        step=step,
        epoch=epoch,
        kind=kind,
        update_rel=r.get("update_rel"),
    )


def _loss_name(loss) -> str:
    return (
        loss
        if isinstance(loss, str)
        else getattr(loss, "name", getattr(loss, "__name__", type(loss).__name__))
    )


def _batch(b, k: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        x, labels = b
    except (TypeError, ValueError):
        raise McnError(
            f"Expected batches[{k}] to be a pair (x, labels). Received {type(b).__name__}"
        ) from None
    x = as_4d(np.asarray(x), f"batches[{k}] x")
    if not np.issubdtype(x.dtype, np.floating):
        raise McnError(f"Expected batches[{k}] x to be a float array. Received dtype={x.dtype}")
    labels = np.asarray(labels, dtype=np.float64)
    if labels.size != x.shape[3]:
        raise McnError(
            f"Expected batches[{k}] labels to hold one label per image ({x.shape[3]}). "
            f"Received labels.shape={labels.shape}"
        )
    return x, labels.reshape(1, -1)


def _epochs(epochs_of_steps, n_steps: int, optimizer) -> list[int]:
    if epochs_of_steps is None:
        from harness.translate.optim import MatConvNetSchedule

        sched = getattr(optimizer, "_learning_rate", None)
        if isinstance(sched, MatConvNetSchedule):
            return [sched.epoch(k) for k in range(n_steps)]
        return [1] * n_steps
    epochs = [int(e) for e in np.asarray(epochs_of_steps).ravel()]
    if len(epochs) != n_steps or any(e < 1 for e in epochs):
        raise McnError(
            f"Expected epochs_of_steps to give a 1-based epoch for each of the {n_steps} steps. "
            f"Received epochs_of_steps={epochs_of_steps!r}"
        )
    return epochs


def _describe(opts: TrainOpts) -> str:
    if opts.solver is None:
        text = f"SGD (momentum {opts.momentum:g}{', Nesterov' if opts.nesterov_update else ''})"
    else:
        text = f"{opts.solver} {opts.solver_options}"
    return (
        f"{text}, weightDecay {opts.weight_decay:g}, learningRate {np.asarray(opts.learning_rate).tolist()}"
    )
