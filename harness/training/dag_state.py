"""DagNN params mapped to the Keras variables of a ``to_keras_dag`` model, for training.

Each DagNN param with a Keras variable is a ``KerasParam`` (``harness.training.state``)
whose ``layer`` is the param's name, ``index`` the DagNN layer holding it (the first in
execution order among the layers sharing it: they share one Keras layer, named by
``dag_keras_layers``) and ``j`` its position among that layer's params:

=====================  =============================================================
DagNN block            Keras variables (param j)
=====================  =============================================================
Conv, ConvTranspose    ``kernel`` (0: filters), ``bias`` (1)
BatchNorm              ``gamma`` (0), ``beta`` (1), ``moving_mean`` and
                       ``moving_variance`` (2: moments ``[mu sigma]``, sigma read as
                       ``sqrt(moving_variance + epsilon)``)
Scale                  ``scale`` (operand 2 of ``[inputs, params]``), ``bias`` (operand 3)
=====================  =============================================================

Every DagNN layout is a C-order reshape of its Keras variable (``dag_build`` moves
filters as ``conv_to_keras``, Scale operands as ``to_nhwc`` of a 1-image array), so a
value and its optimizer state reach MatConvNet's layout by ``KerasParam.to_mcn``.

The Keras side of each param (which variable holds it, its multipliers) is
``harness.translate.dag_weights``'s; ``harness.matconvnet_optimizer(dagnet, opts)`` the
optimizer that performs cnn_train_dag's update; ``optimizer_view`` the net as the optimizer
table (``harness.diagnosis.optimizer_rules``) reads a simplenn net and its alignment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.equivalence.align import Alignment, Pair
from harness.mcn.dagnn import DagNet
from harness.mcn.net import Layer, Net
from harness.mcn.options import is_empty
from harness.training.state import KerasParam
from harness.translate.dag_weights import MOMENT_ROLES, held_variables, param_owners
from harness.translate.weights import variable_name

if TYPE_CHECKING:
    import keras

__all__ = [
    "dag_keras_params",
    "dag_reference_value",
    "optimizer_view",
]


def dag_keras_params(net: DagNet, model: keras.Model) -> tuple[list[KerasParam], list[str], list[str]]:
    """The params of ``net`` beside their Keras variables in ``model``: ``(params,
    problems, notes)``; problems name the params no variable holds (or of another size),
    notes the trainable Keras variables that hold no param (trained, not compared)."""
    params: list[KerasParam] = []
    problems: list[str] = []
    for index, layer, kname in param_owners(net):
        try:
            klayer = model.get_layer(kname)
        except ValueError:
            problems.append(
                f"no Keras layer '{kname}' for DagNN layer '{layer.name}': params "
                f"{', '.join(layer.params)} not compared"
            )
            continue
        held = held_variables(layer)
        eps = float(getattr(klayer, "epsilon", 0.0))
        for v in klayer.variables:
            if variable_name(v) not in held:
                continue
            j, role = held[variable_name(v)]
            param = net.param(layer.params[j])
            if is_empty(param.value):
                continue
            size = np.size(param.value) // (2 if role in MOMENT_ROLES else 1)
            if int(np.prod(v.shape)) != size:
                problems.append(
                    f"param '{param.name}' ({np.size(param.value)} values) and Keras variable "
                    f"'{v.path}' {tuple(v.shape)} differ in size: not compared"
                )
                continue
            shape = (size,) if role in MOMENT_ROLES else np.shape(param.value)
            params.append(KerasParam(index, j, param.name, layer.type, v, role, shape, None, eps))
    mapped = {p.layer for p in params}
    problems += [
        f"DagNN param '{p.name}' has no Keras variable: not compared"
        for p in net.params
        if p.name not in mapped and not is_empty(p.value)
    ]
    held_ids = {id(p.variable) for p in params}
    extra = [str(v.path) for v in model.trainable_variables if id(v) not in held_ids]
    notes = (
        [f"Keras variables without a DagNN param (trained, not compared): {', '.join(extra)}"]
        if extra
        else []
    )
    return params, problems, notes


def dag_reference_value(net: DagNet, p: KerasParam) -> np.ndarray:
    """The value of the DagNN param ``p`` holds, in its shape (moments: mu or sigma)."""
    w = np.asarray(net.param(p.layer).value, dtype=np.float64)
    if p.role in MOMENT_ROLES:
        m = w.reshape(-1, 2)
        return m[:, 0] if p.role == "mean" else m[:, 1]
    return w.reshape(p.shape)


def optimizer_view(net: DagNet, model: keras.Model) -> tuple[Net, Alignment]:
    """The net as ``optimizer_rules.optimizer_differences`` reads a simplenn net: one conv
    (or bnorm) layer per Keras layer holding Conv/ConvTranspose (BatchNorm) params, its
    ``learning_rate``/``weight_decay`` the params' multipliers, paired with that Keras
    layer. Scale layers are left out (the table knows kernels, biases, gains)."""
    layers, pairs = [], []
    kinds = {"dagnn.Conv": "conv", "dagnn.ConvTranspose": "conv", "dagnn.BatchNorm": "bnorm"}
    present = {l.name for l in model.layers}
    for _, layer, kname in param_owners(net):
        if layer.type not in kinds or kname not in present:
            continue
        params = [net.param(p) for p in layer.params[:2]]
        layers.append(
            Layer(
                kinds[layer.type],
                layer.name,
                [p.value for p in params],
                learning_rate=np.array([float(p.learning_rate) for p in params]),
                weight_decay=np.array([float(p.weight_decay) for p in params]),
            )
        )
        pairs.append(Pair(len(layers) - 1, layer.name, kinds[layer.type], [kname], param_layer=kname))
    return Net(layers), Alignment(pairs, [])
