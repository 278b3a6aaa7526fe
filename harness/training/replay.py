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

A DagNN net (``DagNet``) is replayed with cnn_train_dag by ``harness.training.dag_replay``
(``compare_training`` dispatches). Both replays share what this module and ``state``
make public: the argument checks, the step records and the report (here), one step's rows
(``state.step_items``/``compare_step``). The report and its JSON schema:
``harness.training.report``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.diagnosis.optimizer_rules import optimizer_differences
from harness.equivalence.align import align
from harness.equivalence.keras_pass import with_dtype
from harness.equivalence.reference_pass import cast_net
from harness.equivalence.run import CONVENTIONS
from harness.mcn.dagnn import DagNet
from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d
from harness.mcn.train import TrainOpts, cnn_train_step, prepare_net
from harness.training.keras_step import current_learning_rate, ends_in_probabilities, keras_train_step
from harness.training.report import TrainingReport, TrainingRow, find_first_divergence
from harness.training.state import (
    SIGMA_LIMITATION,
    compare_step,
    initial_values,
    keras_params,
    objective_row,
    reference_value,
    state_reader,
    step_items,
)
from harness.translate.weights import WeightMap

if TYPE_CHECKING:
    import keras

__all__ = [
    "SIGMA_LIMITATION",
    "TRAINING_TOLERANCES",
    "TrainingReport",
    "TrainingRow",
    "check_set_up",
    "compare_training",
    "describe_solver",
    "epochs_for",
    "finish_report",
    "keras_train_step",
    "rate_of",
    "step_record",
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


def compare_training(
    net: Net | DagNet,
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
    der_outputs: Any = None,
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

    A DagNN ``net`` (``DagNet``) is replayed with cnn_train_dag by
    ``harness.training.dag_replay.compare_training_dag``: ``batches`` are then input dicts
    (``{'input': x, 'label': labels}``) and ``der_outputs`` (default ``{'objective': 1}``)
    names the objective; ``dialect`` (master only), ``loss`` and ``mapping`` do not apply.
    """
    if isinstance(net, DagNet):
        from harness.training.dag_replay import compare_training_dag

        given = {"loss": loss, "mapping": mapping, "dialect": None if dialect == "master" else dialect}
        unsupported = sorted(k for k, v in given.items() if v is not None)
        if unsupported:
            raise McnError(
                f"Expected no {', '.join(unsupported)} for a DagNN net (cnn_train_dag: dialect master, "
                f"MatConvNet's loss, layers found by name). Received {', '.join(unsupported)}"
            )
        return compare_training_dag(
            net,
            model,
            optimizer,
            batches,
            train_opts,
            epochs_of_steps=epochs_of_steps,
            dtype=dtype,
            tolerance=tolerance,
            der_outputs=der_outputs,
        )
    if der_outputs is not None:
        raise McnError("Expected der_outputs only with a DagNN net (simplenn: cnn_train seeds the loss)")
    opts = TrainOpts() if train_opts is None else train_opts
    if isinstance(opts, TrainOpts):
        dialect = opts.dialect if dialect is None else dialect
        if dialect not in CONVENTIONS:
            raise McnError(f"Expected dialect to be one of {list(CONVENTIONS)}. Received dialect={dialect!r}")
        if dialect != opts.dialect:
            opts = dataclasses.replace(opts, dialect=dialect)
    opts, tol = check_set_up(opts, optimizer, batches, dtype, tolerance, what="(x, labels)")
    np_dtype = np.float64 if dtype == "float64" else np.float32
    ref = prepare_net(net, np.float64)
    dropout = [l.name for l in ref.layers if l.type == "dropout"]
    if dropout:
        raise McnError(
            f"Expected a net without dropout layers (the two sides cannot share masks during training). "
            f"Received dropout layers {dropout}"
        )
    batches = [_batch(b, k) for k, b in enumerate(batches)]
    epochs = epochs_for(epochs_of_steps, len(batches), optimizer)
    rates = np.asarray(opts.learning_rate, dtype=np.float64).ravel()

    model = with_dtype(model, dtype)
    alignment = align(ref, model, mapping)
    weights = WeightMap(cast_net(ref, np_dtype), model, alignment, dtype, load=True)
    params = keras_params(ref, model, alignment, weights)
    probabilities = ends_in_probabilities(model, alignment)
    notes = list(weights.notes)
    limitations = [SIGMA_LIMITATION] if any(p.role == "variance" for p in params) else []

    rows: list[TrainingRow] = []
    steps: list[dict] = []
    state = None
    prev = initial_values(params, lambda p: reference_value(ref, p))
    last = ref.layers[-1]
    state_of, state_note = state_reader(optimizer, opts)
    notes += [state_note] if state_note else []
    differences = optimizer_differences(
        optimizer, opts, ref, rate=rate_of(rates, epochs[0]), dtype=dtype, model=model, alignment=alignment
    )
    notes += [d.note for d in differences]
    for k, ((x, labels), epoch) in enumerate(zip(batches, epochs, strict=True)):
        step, lr = k + 1, rate_of(rates, epoch)
        ref, state, objective = cnn_train_step(
            ref, state, x.astype(np.float64), labels, learning_rate=lr, opts=opts
        )
        k_lr = current_learning_rate(optimizer)
        k_obj = keras_train_step(
            model, optimizer, x, labels, dialect=dialect, loss=loss, probabilities=probabilities, dtype=dtype
        )
        steps.append(step_record(step, epoch, lr, k_lr, objective, k_obj))
        rows.append(objective_row(last.name, last.type, objective, k_obj, tol, step, epoch))
        items = step_items(
            params,
            lambda p, net=ref: reference_value(net, p),
            lambda p, st=state: st["solverState"][p.index][p.j],
            state_of,
            k_lr,
        )
        rows += compare_step(items, tol, prev, step, epoch)
    return finish_report(
        rows,
        steps,
        notes,
        dtype=dtype,
        dialect=dialect,
        convention=CONVENTIONS[dialect]
        + ("" if loss is None else f"; Keras trains with {_loss_name(loss)} instead"),
        solver=describe_solver(opts),
        optimizer=optimizer,
        tolerance=tol,
        alignment_problems=alignment.problems + weights.problems,
        limitations=limitations,
    )


# ------------------------------------------------------------------------------ shared by
# compare_training and harness.training.dag_replay.compare_training_dag


def check_set_up(
    opts: Any, optimizer: Any, batches: Any, dtype: str, tolerance: float | None, *, what: str
) -> tuple[TrainOpts, float]:
    """The checks both replays make of their arguments (``what``: one batch, as the error
    names it); returns the TrainOpts and the tolerance (``TRAINING_TOLERANCES[dtype]``
    unless given)."""
    if not isinstance(opts, TrainOpts):
        raise McnError(f"Expected train_opts to be a TrainOpts. Received train_opts={type(opts).__name__}")
    if dtype not in TRAINING_TOLERANCES:
        raise McnError(f"Expected dtype 'float64' or 'float32'. Received dtype={dtype!r}")
    if getattr(optimizer, "built", False):
        raise McnError(
            "Expected a fresh optimizer (compare_training builds it on the model's variables). "
            f"Received a built {type(optimizer).__name__}"
        )
    if not isinstance(batches, list | tuple) or not batches:
        raise McnError(f"Expected batches to be a non-empty list of {what}. Received batches={batches!r}")
    return opts, TRAINING_TOLERANCES[dtype] if tolerance is None else float(tolerance)


def rate_of(rates: np.ndarray, epoch: int) -> float:
    """cnn_train's ``learningRate(min(epoch, end))`` (``epoch`` 1-based)."""
    return float(rates[min(epoch, rates.size) - 1])


def step_record(step: int, epoch: int, lr: float, k_lr: float | None, objective: Any, k_obj: float) -> dict:
    """One entry of ``TrainingReport.steps``."""
    return {
        "step": step,
        "epoch": epoch,
        "learning_rate": lr,
        "keras_learning_rate": k_lr,
        "objective": float(objective),
        "keras_objective": k_obj,
    }


def finish_report(
    rows: list[TrainingRow],
    steps: list[dict],
    notes: list[str],
    *,
    optimizer: Any,
    reference: str = "cnn_train",
    **fields: Any,
) -> TrainingReport:
    """The TrainingReport of a replay: a note when Keras' learning rate parts from the
    ``reference``'s, and the first divergence. ``fields``: TrainingReport's other fields."""
    changed = [s["step"] for s in steps if s["keras_learning_rate"] is not None and not math.isclose(
        s["keras_learning_rate"], s["learning_rate"], rel_tol=1e-6, abs_tol=0.0)]  # fmt: skip
    if changed:
        s = steps[changed[0] - 1]
        notes = notes + [
            f"Keras' learning rate differs from {reference}'s from step {s['step']} on "
            f"({s['keras_learning_rate']:.6g} vs {s['learning_rate']:.6g} in epoch {s['epoch']})"
        ]
    report = TrainingReport(rows=rows, steps=steps, optimizer=type(optimizer).__name__, notes=notes, **fields)
    report.first_divergence = find_first_divergence(report)
    return report


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


def epochs_for(epochs_of_steps: Any, n_steps: int, optimizer: Any) -> list[int]:
    """The 1-based epoch of each step: ``epochs_of_steps`` checked, else the optimizer's
    ``MatConvNetSchedule`` epochs, else epoch 1 throughout."""
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


def describe_solver(opts: TrainOpts) -> str:
    """cnn_train's update in a line: the solver, weightDecay and learningRate."""
    if opts.solver is None:
        text = f"SGD (momentum {opts.momentum:g}{', Nesterov' if opts.nesterov_update else ''})"
    else:
        text = f"{opts.solver} {opts.solver_options}"
    return (
        f"{text}, weightDecay {opts.weight_decay:g}, learningRate {np.asarray(opts.learning_rate).tolist()}"
    )
