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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.diagnosis.optimizer_rules import SOLVER_NAMES, keras_solver
from harness.mcn.net import Net
from harness.mcn.options import is_empty
from harness.mcn.train import TrainOpts
from harness.translate.weights import aligned_parameter_layers, conv_to_keras, parameter_role, split_groups

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment
    from harness.translate.weights import WeightMap

__all__ = [
    "KerasParam",
    "keras_params",
    "keras_variable_value",
    "reference_value",
    "state_pairs",
    "state_reader",
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
