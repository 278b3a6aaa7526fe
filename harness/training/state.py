"""Keras variables and optimizer state mapped to MatConvNet's parameters.

``KerasParam`` is one Keras variable and the MatConvNet tensor it holds (``keras_params``
lists them for an aligned model); ``keras_variable_value``/``reference_value`` read
both sides in MatConvNet's layout. ``state_reader`` reads a Keras optimizer's slots in
cnn_train's convention (``state.solverState{l}{j}``):

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

Other optimizers, or a Keras optimizer of another kind than ``train_opts.solver``, have
no reader (their weights are compared, not their states; the note says why).

bnorm moments: the mean maps to ``moving_mean``; sigma to ``sqrt(moving_variance +
epsilon)`` (Keras averages the variance, MatConvNet sigma).

One step's rows, for both replays (``compare_training`` and the DagNN one): ``step_items``
lists what to compare after a step (each parameter and optimizer state, reference and
Keras in MatConvNet's layout), ``compare_step`` measures them (``harness.equivalence.metrics.
measure``) into TrainingRows, ``objective_row`` the step's objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.diagnosis.optimizer_rules import SOLVER_NAMES, keras_solver
from harness.equivalence.metrics import measure
from harness.mcn.net import Net
from harness.mcn.options import is_empty
from harness.mcn.train import TrainOpts
from harness.training.report import TrainingRow
from harness.translate.weights import aligned_parameter_layers, conv_to_keras, parameter_role, split_groups

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment
    from harness.translate.weights import WeightMap

__all__ = [
    "SIGMA_LIMITATION",
    "KerasParam",
    "compare_step",
    "initial_values",
    "keras_params",
    "keras_variable_value",
    "objective_row",
    "reference_value",
    "state_pairs",
    "state_reader",
    "step_items",
]


@dataclass
class KerasParam:
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
            groups, filter_shape = self.groups
            diagonal, off = split_groups(a, groups, filter_shape)
            return diagonal.reshape(self.shape), off
        return a.reshape(self.shape), None


def keras_params(net: Net, model: keras.Model, alignment: Alignment, weights: WeightMap) -> list[KerasParam]:
    out = []
    for index, layer, klayer in aligned_parameter_layers(net, model, alignment):
        for v in klayer.variables:
            role = parameter_role(v)
            if role is None:
                continue
            j, name = role.index, role.variable
            if j >= len(layer.weights) or is_empty(layer.weights[j]):
                continue
            w = np.asarray(layer.weights[j])
            shape = w.shape
            groups = None
            if name == "kernel":
                shape = conv_to_keras(w).shape
                if klayer.name in weights.embedded:
                    groups = weights.embedded[klayer.name]
            kind = {"moving_mean": "mean", "moving_variance": "variance"}.get(name, name)
            if kind in ("mean", "variance"):
                shape = (w.size // 2,)
            eps = float(getattr(klayer, "epsilon", 0.0))
            out.append(KerasParam(index, j, layer.name, layer.type, v, kind, shape, groups, eps))
    return out


def keras_variable_value(p: KerasParam) -> np.ndarray:
    v = np.asarray(p.variable.numpy(), dtype=np.float64)
    if p.role == "variance":
        return np.sqrt(v + p.epsilon)  # sigma as MatConvNet stores it
    return v


def reference_value(net: Net, p: KerasParam) -> np.ndarray:
    w = np.asarray(net.layers[p.index].weights[p.j], dtype=np.float64)
    if p.role in ("mean", "variance"):
        m = w.reshape(-1, 2)
        return m[:, 0] if p.role == "mean" else m[:, 1]
    return w.reshape(p.shape)


def state_pairs(ref_state, got_state) -> list[tuple[str, Any, Any]]:
    if isinstance(got_state, dict):
        ref_d = ref_state if isinstance(ref_state, dict) else {}
        return [(name, ref_d.get(name, 0.0), got_state[name]) for name in got_state]
    return [("", ref_state, got_state)]


# Keras' own optimizers' slots: {class: {MatConvNet field: slot attribute}}; field "" is a
# solver whose state is one array. "iterations" is Keras' global step count. Which
# cnn_train solver each runs: optimizer_rules.KERAS_SOLVERS.
_KERAS_SLOTS: dict[str, dict[str, str]] = {
    "SGD": {"": "momentums"},
    "Adam": {"m": "_momentums", "v": "_velocities", "t": "iterations"},
    "RMSprop": {"": "_velocities"},
    "Adagrad": {"": "_accumulators"},
    "Adadelta": {"g_sqr": "_accumulated_grads", "delta_sqr": "_accumulated_delta_vars"},
}


def state_reader(optimizer: Any, opts: TrainOpts) -> tuple[Callable | None, str | None]:
    """A function (variable, Keras' rate) -> the state in cnn_train's convention, and a
    note (why there is none, or how the state is mapped)."""
    from harness.translate.optim import MatConvNetOptimizer

    cls = type(optimizer).__name__
    solver = keras_solver(optimizer)
    if isinstance(optimizer, MatConvNetOptimizer):
        if solver != opts.solver:
            return None, (
                f"optimizer states not compared: {cls} runs {SOLVER_NAMES[solver]}, "
                f"cnn_train {SOLVER_NAMES[opts.solver]}"
            )
        return (lambda v, lr: optimizer.matconvnet_state(v)), None
    fields = _KERAS_SLOTS.get(cls)
    if fields is None:
        return None, f"optimizer states not compared: no mapping of {cls}'s slots to cnn_train's solverState"
    if solver != opts.solver:
        return None, (
            f"optimizer states not compared: Keras {cls} keeps no counterpart of cnn_train's "
            f"{SOLVER_NAMES[opts.solver]} state"
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


# ------------------------------------------------------------------------------ one step's rows

SIGMA_LIMITATION = (
    "bnorm moments: Keras averages the variance (moving_variance), cnn_train averages "
    "sigma = sqrt(variance + epsilon); only the mean follows the same formula"
)


def objective_row(
    layer: str, type_: str, objective: Any, k_obj: float, tol: float, step: int, epoch: int
) -> TrainingRow:
    """The row of a step's objective (the reference's against Keras' loss)."""
    r = _compare(objective, k_obj, tol)
    return _make_row(layer, type_, "loss", "objective", r, step, epoch, "objective")


def initial_values(params: list[KerasParam], value_of: Callable[[KerasParam], Any]) -> dict:
    """The values before the first step, for the first step's change (``update_rel``):
    ``{(id(param), "w"): (reference, Keras)}``, both in MatConvNet's layout."""
    return {(id(p), "w"): (value_of(p), p.to_mcn(keras_variable_value(p))[0]) for p in params}


def compare_step(items: list[dict], tol: float, prev: dict, step: int, epoch: int) -> list[TrainingRow]:
    """The rows of one step from ``step_items``; ``prev`` (the values after the previous
    step, for ``update_rel``) is updated in place. A tensor's scale is at least the
    largest reference value of its group; a differing bnorm sigma is a known limitation."""
    floors: dict[tuple, float] = {}
    for it in items:
        if it["group"] is not None:
            scale = float(np.max(np.abs(np.asarray(it["want"], dtype=np.float64)), initial=0.0))
            floors[it["group"]] = max(floors.get(it["group"], 0.0), scale)
    rows = []
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
    return rows


def step_items(
    params: list[KerasParam],
    value_of: Callable[[KerasParam], Any],
    state_entry_of: Callable[[KerasParam], Any],
    state_of: Callable | None,
    k_lr: float | None,
) -> list[dict]:
    """Everything to compare after a step, in MatConvNet's layout: each parameter
    (``value_of``: the reference's) and its optimizer state (``state_entry_of``: the
    reference's solver state; ``state_of``: Keras', from ``state_reader``). ``group``: tensors
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
                "want": value_of(p),
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
        for name, want_s, got_s in state_pairs(state_entry_of(p), got_state):
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
