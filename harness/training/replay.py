"""compare_training: cnn_train's steps (NumPy reference) against a Keras training set-up.

Both sides start from the net's weights and see the same batches. After every step each
parameter and each optimizer state is mapped to MatConvNet's layout and compared; the
TrainingReport names the first step, parameter and state that part and by how much.

The reference is ``harness.mcn.cnn_train_step`` in float64 with ``learningRate(min(epoch,
end))`` for the epoch each step belongs to. The Keras step is what ``model.fit`` does:
forward in training mode, the loss, its gradient, ``optimizer.apply``. The loss (``loss``
None) follows MatConvNet's convention for the dialect on the model's output (class scores,
or probabilities when the model ends in a softmax), plus the model's regularisation losses
(``model.losses``). What the optimizer receives is MatConvNet's ``dzdw / d``:

- master: the loss is the batch mean (ignored labels still count in N), so its gradient is
  ``dzdw / numWorkers`` with numSubBatches 1; with S sub-batches cnn_train averages S
  sub-batch means, which is the same number only when S divides N and there is no bnorm;
- beta25: the loss is the batch sum and cnn_train divides its derivative by the batch size:
  the Keras step divides the summed loss by N before differentiating (the regularisation
  losses are not divided);
- a user ``loss`` (a Keras loss name, object or callable on one-hot targets ``(N, K)``) is
  used as Keras would use it, plus the regularisation losses.

Optimizer states in MatConvNet's convention (``state.solverState{l}{j}``):

========================  =======================================================
Keras optimizer           cnn_train state
========================  =======================================================
harness MatConvNet*       ``matconvnet_state``: the same quantities, same layout
SGD(momentum > 0)         ``mom = velocity / lr`` (Keras keeps ``lr * mom``: the same
                          sign, downhill; ``lr`` is Keras' rate at that step)
Adam                      ``m = m``, ``v = v``, ``t = iterations`` (one global count)
RMSprop                   ``g_sqr = velocity`` (momentum/centered slots: no counterpart)
Adagrad                   ``g_sqr = accumulator`` (Keras starts it at 0.1, MatConvNet 0)
Adadelta                  ``g_sqr = accumulated_grad``, ``delta_sqr = accumulated_delta_var``
========================  =======================================================

Other optimizers, or a Keras optimizer of another kind than ``train_opts.solver``, are
compared by their weights only (a note says so).

bnorm moments: Keras' BatchNormalization updates its moving statistics itself; the mean
follows cnn_train's ``(1 - lr3) m + lr3 mu`` exactly and is compared (``w{3}.mu``), sigma
(``w{3}.sigma``, mapped as ``sqrt(moving_variance + epsilon)``) differs by design (Keras
averages the variance, MatConvNet sigma): a known limitation, not a divergence.

Scales: a tensor's errors are relative to the larger of max|ref| and max|keras|, and at
least the largest reference value among its layer's parameters (for a state: the same field
across the net), so that the rounding noise of an exactly-zero derivative (a conv bias
before a bnorm, a bnorm beta made irrelevant by a later bnorm) does not count.

JSON schema (``TrainingReport.to_json()``, stable; keys sorted; non-finite numbers null):

    {"schema": "mcn-harness/training-report/2", "ok": bool, "dtype": str, "dialect": str,
     "convention": str, "solver": str, "optimizer": str, "tolerance": float,
     "alignment_problems": [str], "notes": [str], "limitations": [str],
     "first_divergence": null | {"step": int, "epoch": int, "layer": str, "keras": str,
         "tensor": str, "max_abs": float, "max_rel": float,
         "weight": null | {layer, keras, tensor, max_abs, max_rel}, "state": null | {...}},
     "steps": [{"step": int, "epoch": int, "learning_rate": float,
                "keras_learning_rate": float | null, "objective": float,
                "keras_objective": float}],
     "rows": [the layer report's row fields (layer, type, keras, tensor, ok, numel,
              mismatches, max_abs, max_rel, tolerance, worst_index_mcn, worst_index_keras,
              ref_value, keras_value, note, limitation, nonfinite_ref, nonfinite_keras)
              + "step": int, "epoch": int,
              "kind": "weight" | "state" | "objective", "update_rel": float | null]}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from harness.equivalence.align import align, keras_kind
from harness.equivalence.metrics import measure
from harness.equivalence.report import Row, _safe
from harness.equivalence.run import CONVENTIONS, _keras_loss, _Weights, with_dtype
from harness.io.text import json_dumps
from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d, is_empty
from harness.mcn.train import TrainOpts, cnn_train_step, prepare_net

__all__ = [
    "TRAINING_TOLERANCES",
    "TrainingReport",
    "TrainingRow",
    "compare_training",
    "keras_train_step",
]

SCHEMA = "mcn-harness/training-report/2"

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


# ------------------------------------------------------------------------------ report


@dataclass
class TrainingRow(Row):
    """A Row of the layer report, for one training step. ``tensor`` is ``w{j}`` (a
    parameter after the step), ``w{3}.mu``/``w{3}.sigma`` (bnorm moments),
    ``w{1}*`` (Keras-only kernel entries off MatConvNet's filter groups),
    ``solverState{j}`` or ``solverState{j}.<field>`` (the optimizer state after the step)
    or ``objective`` (the batch loss per image before the step). ``update_rel`` is the
    normwise relative error of this step's change: ``max|dkeras - dref| / max(max|dref|,
    max|dkeras|)`` (0.5 when Keras steps half as far, ~1 when the steps are unrelated)."""

    step: int = 0
    epoch: int = 1
    kind: str = "weight"  # "weight", "state", "objective"
    update_rel: float | None = None


@dataclass
class TrainingReport:
    rows: list[TrainingRow]
    steps: list[dict]  # per step: step, epoch, learning_rate (mcn), keras_learning_rate, objectives
    dtype: str
    dialect: str
    convention: str
    solver: str  # cnn_train's update, e.g. "SGD (momentum 0.9)"
    optimizer: str  # the Keras optimizer's class
    tolerance: float
    alignment_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    first_divergence: dict | None = None

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and not self.alignment_problems

    def rows_at(self, step: int) -> list[TrainingRow]:
        return [r for r in self.rows if r.step == step]

    def worst(
        self,
        step: int | None = None,
        *,
        kind: str | None = None,
        layer: str | None = None,
        tensor: str | None = None,
        known: bool = False,
    ) -> TrainingRow | None:
        """The row with the greatest ``max_rel`` among those matching (``known``: include
        rows explained by a limitation)."""
        rows = [
            r
            for r in self.rows
            if (step is None or r.step == step)
            and (kind is None or r.kind == kind)
            and (layer is None or r.layer == layer)
            and (tensor is None or r.tensor == tensor)
            and (known or not r.limitation)
        ]
        return max(rows, key=lambda r: r.max_rel, default=None)

    def max_rel(self, step: int | None = None, **kwargs: Any) -> float:
        row = self.worst(step, **kwargs)
        return 0.0 if row is None else row.max_rel

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "dtype": self.dtype,
            "dialect": self.dialect,
            "convention": self.convention,
            "solver": self.solver,
            "optimizer": self.optimizer,
            "tolerance": self.tolerance,
            "alignment_problems": list(self.alignment_problems),
            "notes": list(self.notes),
            "limitations": list(self.limitations),
            "first_divergence": _finite_tree(self.first_divergence),
            "steps": [_finite_tree(s) for s in self.steps],
            "rows": [{k: _finite(v) for k, v in asdict(r).items()} for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json_dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [
            f"mcn-harness training report: {'EQUIVALENT' if self.ok else 'DIVERGENT'} "
            f"({self.dtype}, dialect {self.dialect}, {len(self.steps)} steps, "
            f"tolerance {self.tolerance:.0e})",
            f"cnn_train: {_safe(self.solver)}; Keras: {_safe(self.optimizer)}",
            f"loss convention: {self.convention}",
        ]
        fd = self.first_divergence
        if fd:
            lines.append(
                f"first divergence: step {fd['step']} (epoch {fd['epoch']}): layer '{_safe(fd['layer'])}' "
                f"{_safe(fd['tensor'])} (Keras '{_safe(fd['keras'])}'), max rel {fd['max_rel']:.2e}"
            )
            for kind in ("weight", "state"):
                other = fd.get(kind)
                if other and (other["layer"], other["tensor"]) != (fd["layer"], fd["tensor"]):
                    lines.append(
                        f"  worst {kind} at that step: layer '{_safe(other['layer'])}' "
                        f"{_safe(other['tensor'])}, max rel {other['max_rel']:.2e}"
                    )
        for p in self.alignment_problems:
            lines.append(f"alignment: {_safe(p)}")
        header = (
            f"{'step':>4} {'epoch':>5} {'lr mcn':>9} {'lr keras':>9} {'objective':>11} "
            f"{'worst weight':<24} {'max rel':>9} {'worst state':<28} {'max rel':>9}"
        )
        lines += [header, "-" * len(header)]
        for s in self.steps:
            w = self.worst(s["step"], kind="weight")
            st = self.worst(s["step"], kind="state")
            k_lr = s.get("keras_learning_rate")
            lines.append(
                f"{s['step']:>4} {s['epoch']:>5} {s['learning_rate']:>9.3g} "
                f"{'?' if k_lr is None else f'{k_lr:.3g}':>9} {s['objective']:>11.6g} "
                f"{_label(w):<24} {_rel(w):>9} {_label(st):<28} {_rel(st):>9}"
            )
        shown = fd["step"] if fd else (self.steps[-1]["step"] if self.steps else None)
        if shown is not None:
            lines.append(f"tensors after step {shown}:")
            header = (
                f"{'layer':<14} {'keras':<26} {'tensor':<20} {'status':<6} {'mismatch':>13} "
                f"{'max abs':>9} {'max rel':>9} {'step rel':>9}  worst (mcn idx: ref / keras)"
            )
            lines += [header, "-" * len(header)]
            for r in self.rows_at(shown):
                status = "ok" if r.ok else ("known" if r.limitation else "DIFF")
                worst = ""
                if not r.ok and r.worst_index_mcn is not None and r.ref_value is not None:
                    worst = f"{tuple(r.worst_index_mcn)}: {r.ref_value:.6g} / {r.keras_value:.6g}"
                if r.note:
                    worst = f"{worst}  {r.note}".strip()
                upd = "" if r.update_rel is None else f"{r.update_rel:.2e}"
                lines.append(
                    f"{_safe(r.layer)[:14]:<14} {_safe(r.keras)[:26]:<26} {_safe(r.tensor)[:20]:<20} "
                    f"{status:<6} {f'{r.mismatches}/{r.numel}':>13} {r.max_abs:>9.2e} {r.max_rel:>9.2e} "
                    f"{upd:>9}  {_safe(worst)}"
                )
        for n in self.notes:
            lines.append(f"note: {_safe(n)}")
        for n in self.limitations:
            lines.append(f"limitation: {_safe(n)}")
        return "\n".join(lines)


def _finite(v: Any) -> Any:
    # JSON has no inf/nan: a non-finite error (a Keras weight gone to nan/inf) is null
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _finite_tree(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _finite_tree(v) for k, v in d.items()}
    return _finite(d)


def _label(r: TrainingRow | None) -> str:
    return "-" if r is None else f"{_safe(r.layer)[:12]} {_safe(r.tensor)}"[:28]


def _rel(r: TrainingRow | None) -> str:
    return "-" if r is None else f"{r.max_rel:.2e}"


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


# ------------------------------------------------------------------------------ parameters


@dataclass
class _Param:
    """One Keras variable and the MatConvNet tensor it holds."""

    index: int  # MatConvNet layer, 0-based
    j: int  # MatConvNet parameter, 0-based (2: bnorm moments)
    layer: str
    type: str
    variable: Any
    role: str  # kernel, bias, gamma, beta, mean, variance
    shape: tuple  # MatConvNet shape of weights[j]
    groups: tuple | None = None  # (groups, 4-D filter shape) when embedded block-diagonally
    epsilon: float = 0.0  # Keras BatchNormalization epsilon (variance role)

    @property
    def key(self) -> str:
        return str(getattr(self.variable, "path", self.variable.name))

    @property
    def keras_shape(self) -> tuple | None:
        """The variable's shape when its elements are MatConvNet's in C order (not for a
        kernel embedded block-diagonally)."""
        return None if self.groups is not None else tuple(self.variable.shape)

    def to_mcn(self, value: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A Keras-layout array of this variable -> (MatConvNet layout, off-block entries)."""
        a = np.asarray(value, dtype=np.float64)
        if self.role == "kernel" and self.groups is not None:
            groups, (fh, fw, fc, k) = self.groups
            full = a.reshape(fh, fw, fc * groups, k)
            kg = k // groups
            diag = np.zeros((fh, fw, fc, k))
            mask = np.ones(full.shape, bool)
            for g in range(groups):
                diag[..., g * kg : (g + 1) * kg] = full[:, :, g * fc : (g + 1) * fc, g * kg : (g + 1) * kg]
                mask[:, :, g * fc : (g + 1) * fc, g * kg : (g + 1) * kg] = False
            return diag.reshape(self.shape), full[mask]
        return a.reshape(self.shape), None


_ROLES = {"kernel": 0, "bias": 1, "gamma": 0, "beta": 1, "moving_mean": 2, "moving_variance": 2}


def _params(net: Net, model, alignment, weights: _Weights) -> list[_Param]:
    out = []
    for pair in alignment.pairs:
        if pair.param_layer is None:
            continue
        layer = net.layers[pair.index]
        klayer = model.get_layer(pair.param_layer)
        for v in klayer.variables:
            name = str(v.name).split("/")[-1].split(":")[0]
            if name not in _ROLES:
                continue
            j = _ROLES[name]
            if j >= len(layer.weights) or is_empty(layer.weights[j]):
                continue
            w = np.asarray(layer.weights[j])
            shape = w.shape
            groups = None
            if name == "kernel":
                f = w.reshape(w.shape + (1,) * (4 - w.ndim))
                shape = f.shape
                if klayer.name in weights.embedded:
                    groups = weights.embedded[klayer.name]
            role = {"moving_mean": "mean", "moving_variance": "variance"}.get(name, name)
            if role in ("mean", "variance"):
                shape = (w.size // 2,)
            eps = float(getattr(klayer, "epsilon", 0.0))
            out.append(_Param(pair.index, j, layer.name, layer.type, v, role, shape, groups, eps))
    return out


# ------------------------------------------------------------------------------ states


# Keras' own optimizers: {class: (cnn_train solver, {MatConvNet field: slot attribute})};
# field "" is a solver whose state is one array. "iterations" is Keras' global step count.
_KERAS_STATE: dict[str, tuple[str | None, dict[str, str]]] = {
    "SGD": (None, {"": "momentums"}),
    "Adam": ("adam", {"m": "_momentums", "v": "_velocities", "t": "iterations"}),
    "RMSprop": ("rmsprop", {"": "_velocities"}),
    "Adagrad": ("adagrad", {"": "_accumulators"}),
    "Adadelta": ("adadelta", {"g_sqr": "_accumulated_grads", "delta_sqr": "_accumulated_delta_vars"}),
}
_SOLVER_NAMES = {
    None: "SGD",
    "adam": "adam",
    "rmsprop": "rmsprop",
    "adagrad": "adagrad",
    "adadelta": "adadelta",
}


def _state_reader(optimizer, opts: TrainOpts) -> tuple[Any, str | None]:
    """A function (variable, keras lr) -> MatConvNet-convention state, or a note why none."""
    from harness.translate.optim import _MatConvNetOptimizer

    cls = type(optimizer).__name__
    if isinstance(optimizer, _MatConvNetOptimizer):
        if optimizer.solver != opts.solver:
            return None, (
                f"optimizer states not compared: {cls} runs {_SOLVER_NAMES[optimizer.solver]}, "
                f"cnn_train {_SOLVER_NAMES[opts.solver]}"
            )
        return (lambda v, lr: optimizer.matconvnet_state(v)), None
    entry = _KERAS_STATE.get(cls)
    if entry is None:
        return None, f"optimizer states not compared: no mapping of {cls}'s slots to cnn_train's solverState"
    solver, fields = entry
    if solver != opts.solver:
        return None, (
            f"optimizer states not compared: Keras {cls} keeps no counterpart of cnn_train's "
            f"{_SOLVER_NAMES[opts.solver]} state"
        )
    if cls == "SGD" and not getattr(optimizer, "momentum", 0):
        return None, "optimizer states not compared: Keras SGD without momentum keeps no buffer"

    def read(v, lr):
        i = optimizer._get_variable_index(v)
        values = {}
        for name, attr in fields.items():
            if attr == "iterations":
                values[name] = float(np.asarray(optimizer.iterations))
                continue
            a = np.asarray(getattr(optimizer, attr)[i].numpy(), dtype=np.float64)
            values[name] = a / lr if cls == "SGD" else a
        return values[""] if "" in values else values

    note = None
    if cls == "SGD":
        note = "Keras SGD's momentum buffer is lr * mom: mapped as velocity / lr (Keras' rate at that step)"
    elif cls == "RMSprop" and (optimizer.momentum > 0 or optimizer.centered):
        note = "Keras RMSprop's momentum/centered slots have no cnn_train counterpart (not compared)"
    return read, note


# ------------------------------------------------------------------------------ Keras step


def _one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    lab = np.asarray(labels, dtype=np.float64).ravel()
    out = np.zeros((lab.size, k))
    for i, c in enumerate(lab):
        if c > 0:
            out[i, int(c) - 1] = 1.0
    return out


def _probabilities(model, alignment) -> bool:
    pairs = alignment.pairs
    if not pairs or pairs[-1].type not in ("softmaxloss", "loss"):
        return False
    last = pairs[-1]
    return last.fused_activation == "softmax" or any(
        keras_kind(model.get_layer(k)) == "softmax" for k in last.keras
    )


def keras_train_step(
    model,
    optimizer,
    x: np.ndarray,
    labels: Any,
    *,
    dialect: str = "master",
    loss: Any = None,
    probabilities: bool = False,
    dtype: str = "float64",
) -> float:
    """One Keras training step as ``compare_training`` runs it: ``model(x, training=True)``,
    the loss (MatConvNet's for the dialect, see the module docstring, or ``loss``) plus
    ``model.losses``, its gradient, ``optimizer.apply``. ``x`` is ``H x W x C x N``,
    ``labels`` 1-based (0 = ignore). Returns the data loss per image before the step."""
    import keras
    import tensorflow as tf

    if dialect not in CONVENTIONS:
        raise McnError(f"Expected dialect to be one of {list(CONVENTIONS)}. Received dialect={dialect!r}")
    x = as_4d(np.asarray(x, dtype=dtype), "x")
    n = x.shape[3]
    lab = np.asarray(labels, dtype=np.float64)
    xk = tf.constant(x.transpose(3, 0, 1, 2))
    fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    with tf.GradientTape() as tape:
        out = model(xk, training=True)
        if fn is None:
            data = _keras_loss(out, lab, n, dialect, probabilities)
            if dialect == "beta25":
                data = data / tf.constant(float(n), dtype=data.dtype)  # cnn_train: dzdw / batchSize
        else:
            k = int(out.shape[-1])
            target = tf.constant(
                _one_hot(lab, k).reshape((n,) + (1,) * (len(out.shape) - 2) + (k,)), out.dtype
            )
            target = tf.broadcast_to(target, tf.shape(out))
            # a Keras loss function gives per-image values, averaged as compile() does; a
            # Loss object reduces itself (in its own dtype: floatx() unless given)
            data = tf.reduce_mean(tf.cast(fn(target, out), out.dtype))
        total = data
        for extra in model.losses:
            total = total + tf.cast(extra, total.dtype)
    variables = model.trainable_variables
    grads = tape.gradient(total, variables)
    optimizer.apply(grads, variables)
    return float(data.numpy())


# ------------------------------------------------------------------------------ compare


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


# Keras' own optimizers that pass Python-float constants through ops.cast (float32 first);
# the others combine them with float64 tensors directly, which is exact.
_FLOAT32_CASTS = {
    "SGD": ("momentum",),
    "Adam": ("beta_1", "beta_2"),
    "AdamW": ("beta_1", "beta_2"),
    "Adamax": ("beta_1",),
    "Nadam": ("beta_1", "beta_2"),
}


def _float32_notes(optimizer, rate: float) -> list[str]:
    """Constants a Keras optimizer rounds to float32: those it ``ops.cast``s, its decoupled
    ``weight_decay``, and a learning rate held (or scheduled) in float32 when cnn_train's
    first ``rate`` is not a float32 number."""
    from harness.translate.optim import _MatConvNetOptimizer

    if isinstance(optimizer, _MatConvNetOptimizer):
        return []
    rounded = []
    names = _FLOAT32_CASTS.get(type(optimizer).__name__, ()) + ("weight_decay",)
    for name in names:
        value = getattr(optimizer, name, None)
        if isinstance(value, float) and float(np.float32(value)) != value:
            rounded.append(f"{name} {value:g} -> {float(np.float32(value))!r}")
    try:
        lr = optimizer.learning_rate
        dt, value = str(lr.dtype), float(np.asarray(lr))
    except (AttributeError, TypeError, ValueError):
        dt, value = "", 0.0
    if "float32" in dt and float(np.float32(rate)) != rate:
        rounded.append(
            f"learning rate in float32 ({value!r} at iteration {int(np.asarray(optimizer.iterations))})"
        )
    if not rounded:
        return []
    return [
        f"Keras {type(optimizer).__name__} computes with float32-rounded constants ({'; '.join(rounded)}): "
        "relative differences of ~1e-8 in float64 comparisons"
    ]


def _cause_notes(optimizer, opts: TrainOpts, net: Net, model, alignment) -> list[str]:
    """Static differences between a Keras optimizer set-up and cnn_train's update that
    explain divergences this report measures (the likely causes, with the fix)."""
    from harness.translate.optim import _MatConvNetOptimizer

    cls = type(optimizer).__name__
    ours = isinstance(optimizer, _MatConvNetOptimizer)
    solver = optimizer.solver if ours else _KERAS_STATE.get(cls, ("?", {}))[0]
    out = []
    if solver != opts.solver:
        out.append(
            f"{'' if ours else 'Keras '}{cls} where cnn_train runs {_SOLVER_NAMES[opts.solver]} (fix: "
            "harness.matconvnet_optimizer(net, train_opts))"
        )
    if not ours:
        out += _stock_notes(optimizer, opts)
    elif solver == opts.solver:
        want = {"momentum": opts.momentum, "nesterov": opts.nesterov_update} if solver is None else {}
        want |= opts.solver_options  # the decay: with the regularisers, below
        config = optimizer.get_config()
        out += [
            f"{cls} {key}={config[key]!r} where cnn_train has {value!r}"
            for key, value in want.items()
            if config.get(key) != value
        ]
    rates, decays, decayed = [], [], False
    for pair in alignment.pairs:
        if pair.param_layer is None:
            continue
        layer, klayer = net.layers[pair.index], model.get_layer(pair.param_layer)
        lr = np.asarray(layer.learning_rate, dtype=np.float64).ravel()
        wd = np.asarray(layer.weight_decay, dtype=np.float64).ravel()
        names = ("gamma", "beta") if layer.type == "bnorm" else ("kernel", "bias")
        for j, name in enumerate(names):
            if j >= min(lr.size, wd.size, len(layer.weights)) or is_empty(layer.weights[j]):
                continue
            where = f"{layer.name} w{{{j + 1}}}"
            # (learningRate(j), weightDecay(j)) as the Keras side applies them
            k_lr, k_wd = 1.0, 0.0
            if ours:
                k_lr, k_wd = optimizer.multipliers.get(
                    f"{klayer.name}/{name}", optimizer.default_multipliers or (lr[j], wd[j])
                )
                k_wd *= optimizer.coupled_weight_decay
            reg = getattr(klayer, f"{name}_regularizer", None)
            k_wd += 2 * float(getattr(reg, "l2", 0.0) or 0.0)
            decayed |= k_wd != 0
            if k_lr != lr[j]:
                rates.append(f"{where} x{lr[j]:g}" + (f" (Keras x{k_lr:g})" if ours else ""))
            want = opts.weight_decay * wd[j]
            if want != k_wd and not getattr(optimizer, "weight_decay", None):
                decays.append(f"{where}: {k_wd:g} instead of {want:g}")
    if rates:
        out.append(
            (
                "the optimizer's multipliers differ from the net's"
                if ours
                else "Keras applies one learning rate to every variable"
            )
            + "; cnn_train multiplies the rate by learningRate(j): "
            + ", ".join(sorted(rates))
            + ("" if ours else " (fix: harness.matconvnet_optimizer)")
        )
    if decays and not decayed:
        out.append(
            f"no coupled weight decay in Keras (no L2 regulariser, no weight_decay) where cnn_train adds "
            f"weightDecay*weightDecay(j)*w = {opts.weight_decay:g}*w to the gradients (fix: L2(l2=wd/2) "
            "on kernels and biases, or harness.matconvnet_optimizer)"
        )
    elif decays:
        out.append(
            "coupled weight decay differs (2*l2 of the L2 regularisers plus the optimizer's coupled "
            "decay, vs cnn_train's weightDecay*weightDecay(j)): " + "; ".join(decays)
        )
    return out


def _stock_notes(optimizer, opts: TrainOpts) -> list[str]:
    """What a Keras optimizer of the solver's own kind does differently from examples/+solver."""
    cls = type(optimizer).__name__
    get = lambda name, default=None: getattr(optimizer, name, default)  # noqa: E731
    o = opts.solver_options
    out = []
    if cls == "SGD" and opts.solver is None:
        if float(get("momentum", 0.0)) != opts.momentum:
            out.append(f"Keras SGD momentum {get('momentum')} vs cnn_train's {opts.momentum:g}")
        if bool(get("nesterov")) != opts.nesterov_update:
            out.append(
                f"Keras SGD nesterov={get('nesterov')} vs cnn_train's nesterovUpdate={opts.nesterov_update}"
            )
        if get("momentum", 0.0):
            out.append(
                "Keras SGD folds the learning rate into its momentum buffer (velocity = momentum*velocity "
                "- lr*g, i.e. lr*mom): the same as cnn_train's w += lr*mom at a constant rate, different "
                "from the first step after the rate changes"
            )
    elif cls == "RMSprop" and opts.solver == "rmsprop":
        out.append(
            f"Keras RMSprop: rho {get('rho')} (cnn_train {o['rho']:g}), epsilon {get('epsilon')} INSIDE the "
            f"square root, w -= lr*g/sqrt(v + eps) (cnn_train {o['epsilon']:g} outside: g/(sqrt(v) + eps))"
        )
    elif cls == "Adam" and opts.solver == "adam":
        if (get("beta_1"), get("beta_2"), get("epsilon")) != (o["beta1"], o["beta2"], o["eps"]):
            out.append(
                f"Keras Adam beta_1 {get('beta_1')}, beta_2 {get('beta_2')}, epsilon {get('epsilon')} "
                f"(cnn_train: {o['beta1']:g}, {o['beta2']:g}, {o['eps']:g})"
            )
    elif cls == "Adagrad" and opts.solver == "adagrad":
        out.append(
            f"Keras Adagrad starts its accumulator at {get('initial_accumulator_value')} (cnn_train 0) and "
            f"puts epsilon {get('epsilon')} inside the square root (cnn_train {o['epsilon']:g} outside)"
        )
    elif cls == "Adadelta" and opts.solver == "adadelta":
        out.append(
            "Keras Adadelta multiplies its step by the learning rate, cnn_train's adadelta ignores it "
            f"(fix: learning_rate=1.0); rho {get('rho')} (cnn_train {o['rho']:g}), epsilon "
            f"{get('epsilon')} (cnn_train {o['epsilon']:g})"
        )
    if get("weight_decay"):
        out.append(
            f"Keras weight_decay={get('weight_decay')} is decoupled (w -= lr*wd*w beside the update); "
            "cnn_train's weightDecay is added to the gradient (fix: L2(l2=wd/2) regularisers on kernels "
            "and biases, or harness.matconvnet_optimizer)"
        )
    return out


def compare_training(
    net: Net,
    model,
    optimizer,
    batches: list,
    train_opts: TrainOpts | None = None,
    epochs_of_steps: Any = None,
    dialect: str | None = None,
    dtype: str = "float64",
    loss: Any = None,
    *,
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
    weights = _Weights(_cast(ref, np_dtype), model, alignment, dtype, load=True)
    params = _params(ref, model, alignment, weights)
    probabilities = _probabilities(model, alignment)
    notes = list(weights.notes)
    limitations: list[str] = []
    if any(p.role == "variance" for p in params):
        limitations.append(SIGMA_LIMITATION)

    rows: list[TrainingRow] = []
    steps: list[dict] = []
    state = None
    # previous values (MatConvNet layout) for the per-step change: {(param, field): (ref, keras)}
    prev: dict[tuple[int, str], tuple[Any, Any]] = {
        (id(p), "w"): (_ref_value(ref, p), p.to_mcn(_keras_value(p))[0]) for p in params
    }
    last = ref.layers[-1]
    state_of, state_note = _state_reader(optimizer, opts)
    notes += [state_note] if state_note else []
    notes += _float32_notes(optimizer, float(rates[min(epochs[0], rates.size) - 1]))
    notes += _cause_notes(optimizer, opts, ref, model, alignment)
    for k, ((x, labels), epoch) in enumerate(zip(batches, epochs, strict=True)):
        step = k + 1
        lr = float(rates[min(epoch, rates.size) - 1])
        ref, state, objective = cnn_train_step(
            ref, state, x.astype(np.float64), labels, learning_rate=lr, opts=opts
        )
        k_lr = _current_lr(optimizer)
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
    report.first_divergence = _first_divergence(report)
    return report


def _step_items(params: list[_Param], ref: Net, state: dict, state_of, k_lr) -> list[dict]:
    """Everything to compare after a step, in MatConvNet's layout. ``group``: tensors
    whose largest reference value is a floor for each other's scale: a layer's
    parameters, and one state field across the net. A parameter that stays ~0 (the beta
    of a bnorm whose shift a later bnorm removes, a conv bias before a bnorm) has a
    derivative that is exactly zero in exact arithmetic: both sides hold rounding noise,
    meaningful only next to the layer's other parameters (its state next to the net's
    other gradients)."""
    items = []
    for p in params:
        got, off = p.to_mcn(_keras_value(p))
        moments = p.role in ("mean", "variance")
        items.append(
            {
                "param": p,
                "tensor": {"mean": "w{3}.mu", "variance": "w{3}.sigma"}.get(p.role, f"w{{{p.j + 1}}}"),
                "kind": "weight",
                "want": _ref_value(ref, p),
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
        for name, want_s, got_s in _state_pairs(state["solverState"][p.index][p.j], got_state):
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


def _cast(net: Net, dtype) -> Net:
    out = net.copy()
    for layer in out.layers:
        layer.weights = [np.asarray(w, dtype=dtype) if np.size(w) else np.asarray(w) for w in layer.weights]
    return out


def _current_lr(optimizer) -> float | None:
    """Keras' learning rate for its next step, in float64 (None if it cannot be read)."""
    import keras

    lr = getattr(optimizer, "_learning_rate", None)
    try:
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            return float(np.asarray(lr(optimizer.iterations)))
        if callable(lr) and not isinstance(lr, keras.Variable):
            return float(np.asarray(lr()))
        return float(np.asarray(lr))
    except (TypeError, ValueError):  # an exotic learning rate: reported as unknown
        return None


def _keras_value(p: _Param) -> np.ndarray:
    v = np.asarray(p.variable.numpy(), dtype=np.float64)
    if p.role == "variance":
        return np.sqrt(v + p.epsilon)  # sigma as MatConvNet stores it
    return v


def _ref_value(net: Net, p: _Param) -> np.ndarray:
    w = np.asarray(net.layers[p.index].weights[p.j], dtype=np.float64)
    if p.role in ("mean", "variance"):
        m = w.reshape(-1, 2)
        return m[:, 0] if p.role == "mean" else m[:, 1]
    return w.reshape(p.shape)


def _state_pairs(ref_state, got_state) -> list[tuple[str, Any, Any]]:
    if isinstance(got_state, dict):
        ref_d = ref_state if isinstance(ref_state, dict) else {}
        return [(name, ref_d.get(name, 0.0), got_state[name]) for name in got_state]
    return [("", ref_state, got_state)]


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


def _summary(r: TrainingRow | None) -> dict | None:
    if r is None:
        return None
    return {
        "layer": r.layer,
        "keras": r.keras,
        "tensor": r.tensor,
        "max_abs": r.max_abs,
        "max_rel": r.max_rel,
    }


def _first_divergence(report: TrainingReport) -> dict | None:
    """The first step with a divergent row; named by its worst weight (else its worst state,
    else the objective), with the worst weight and state of that step beside it."""
    for s in report.steps:
        bad = [r for r in report.rows_at(s["step"]) if not r.ok and not r.limitation]
        if not bad:
            continue
        by_kind = {
            kind: max((r for r in bad if r.kind == kind), key=lambda r: r.max_rel, default=None)
            for kind in ("weight", "state", "objective")
        }
        head = by_kind["weight"] or by_kind["state"] or by_kind["objective"]
        return {
            "step": s["step"],
            "epoch": s["epoch"],
            **_summary(head),
            "weight": _summary(by_kind["weight"]),
            "state": _summary(by_kind["state"]),
        }
    return None
