"""The params of a DagNN net and the weights of its ``to_keras_dag`` model, both ways.

``dag_weights_to_keras(net, model)`` loads the net's params into the Keras layers that hold
them (one Keras layer for a group of DagNN layers sharing their params);
``dag_params_from_keras(net, model)`` reads them back into a copy of the net, in the shapes
and dtypes of its own params (BatchNorm moments ``[mu, sigma]`` held as ``moving_mean = mu``,
``moving_variance = sigma^2 - epsilon``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.net import Layer
from harness.mcn.options import McnError, as_4d
from harness.translate.build import TranslationError
from harness.translate.dag_blocks import (
    block_number,
    conv_bias,
    required_param,
    scale_operands,
    scale_weights,
)
from harness.translate.dag_plan import dag_keras_layers, dag_plan, layer_where
from harness.translate.weights import bnorm_to_keras, conv_to_keras, to_hwcn, to_nhwc

if TYPE_CHECKING:
    import keras

__all__ = [
    "MOMENT_ROLES",
    "dag_multipliers",
    "dag_params_from_keras",
    "dag_weights_to_keras",
    "held_variables",
    "param_owners",
]


def _owners(net: DagNet, model: keras.Model) -> Iterator[tuple[DagLayer, Any]]:
    """(DagNN layer, its Keras layer) for the first layer of every group sharing a Keras
    layer, for the blocks with params."""
    plan = dag_plan(net)
    for layer in plan.layers:
        if plan.owner[layer.name] != layer.name or not layer.params:
            continue
        if layer.type not in ("dagnn.Conv", "dagnn.ConvTranspose", "dagnn.BatchNorm", "dagnn.Scale"):
            continue
        try:
            k = model.get_layer(plan.names[layer.name])
        except ValueError:
            raise TranslationError(
                f"{layer_where(net, layer)}: no Keras layer '{plan.names[layer.name]}' in the model"
            ) from None
        yield layer, k


def _keras_values(net: DagNet, layer: DagLayer, klayer) -> list[np.ndarray]:
    """The params of ``layer`` as ``klayer.get_weights()`` holds them (float64)."""
    if layer.type == "dagnn.BatchNorm":
        weights = [
            required_param(net, layer, j, what) for j, what in enumerate(("gains", "biases", "moments"))
        ]
        eps = block_number(layer.block.get("epsilon"), 1e-5)
        return bnorm_to_keras(Layer("bnorm", layer.name, weights, epsilon=eps), klayer)
    if layer.type == "dagnn.Scale":
        return [to_nhwc(as_4d(net.param(p).value, dtype=np.float64)) for p in scale_weights(layer)]
    values = [conv_to_keras(required_param(net, layer, 0, "filters"))]
    bias = conv_bias(net, layer)
    if bias is not None:
        values.append(np.asarray(bias).ravel())
    return values


def dag_weights_to_keras(net: DagNet, model: keras.Model) -> None:
    """Load every param of ``net`` into the Keras layers of ``model`` (built by
    ``to_keras_dag`` for this net, or any model with the same layer names and shapes)."""
    for layer, k in _owners(net, model):
        current = k.get_weights()
        values = _keras_values(net, layer, k)
        if [np.shape(v) for v in values] != [c.shape for c in current]:
            raise TranslationError(
                f"{layer_where(net, layer)}: Expected Keras layer '{k.name}' to hold weights of shapes "
                f"{[np.shape(v) for v in values]}. Received {[c.shape for c in current]}"
            )
        k.set_weights([np.asarray(v, dtype=c.dtype) for v, c in zip(values, current, strict=True)])


def _like(value: np.ndarray, target: Any) -> np.ndarray:
    """``value`` in ``target``'s shape and dtype (float64 for a param without a value)."""
    if target is None:
        return np.asarray(value, dtype=np.float64)
    target = np.asarray(target)
    return np.asarray(value).reshape(target.shape).astype(target.dtype)


def dag_params_from_keras(net: DagNet, model: keras.Model) -> DagNet:
    """A copy of ``net`` whose param values are read back from ``model`` (the inverse of
    ``dag_weights_to_keras``; BatchNorm moments ``[mu, sqrt(moving_variance + eps)]``), in
    the shapes and dtypes of ``net``'s params."""
    out = net.copy()
    for layer, k in _owners(out, model):
        values = [np.asarray(v) for v in k.get_weights()]
        params = [out.param(p) for p in layer.params]
        if layer.type == "dagnn.BatchNorm":
            eps = float(getattr(k, "epsilon", 1e-5))
            sigma = np.sqrt(values[3].astype(np.float64) + eps)
            moments = np.stack([values[2].astype(np.float64), sigma], axis=1)
            for p, v in zip(params[:3], [values[0], values[1], moments], strict=True):
                p.value = _like(v, p.value)
            continue
        if layer.type == "dagnn.Scale":
            held = [out.param(p) for p in scale_weights(layer)]
            for p, v in zip(held, values, strict=True):
                p.value = _like(to_hwcn(v), p.value)
            continue
        params[0].value = _like(values[0], params[0].value)
        if len(values) > 1:
            params[1].value = _like(values[1], params[1].value)
    return out


# block type -> {Keras variable name: (param position, role)}; Scale: by operand (below)
_HELD: dict[str, dict[str, tuple[int, str]]] = {
    "dagnn.Conv": {"kernel": (0, "kernel"), "bias": (1, "bias")},
    "dagnn.ConvTranspose": {"kernel": (0, "kernel"), "bias": (1, "bias")},
    "dagnn.BatchNorm": {
        "gamma": (0, "gamma"),
        "beta": (1, "beta"),
        "moving_mean": (2, "mean"),
        "moving_variance": (2, "variance"),
    },
}
# dagnn.Scale's operands held by params (dag_blocks.scale_operands): 1 the scale, 2 the bias
_SCALE_ROLES = {1: "scale", 2: "bias"}
MOMENT_ROLES = ("mean", "variance")


def held_variables(layer: DagLayer) -> dict[str, tuple[int, str]]:
    """``{Keras variable name: (param position j, role)}`` for the params of ``layer`` that
    its Keras layer holds (roles: kernel, bias, gamma, beta, mean, variance, scale)."""
    if layer.type == "dagnn.Scale":  # the bias only with has_bias, as the Keras layer holds it
        first = len(layer.inputs)
        return {_SCALE_ROLES[k]: (k - first, _SCALE_ROLES[k]) for k in scale_operands(layer)}
    return {name: held for name, held in _HELD.get(layer.type, {}).items() if held[0] < len(layer.params)}


def param_owners(net: DagNet) -> list[tuple[int, DagLayer, str]]:
    """``(layer index, DagNN layer, Keras layer name)`` for the first layer, in execution
    order, of each Keras layer that holds params (later layers sharing it share them)."""
    try:
        names = dag_keras_layers(net)
    except TranslationError as err:
        raise McnError(f"Could not name the Keras layers of this DagNN net ({err})") from None
    seen: set[str] = set()
    out = []
    for i in net.execution_order():
        layer = net.layers[i]
        kname = names.get(layer.name)
        if not held_variables(layer) or kname is None or kname in seen:
            continue
        seen.add(kname)
        out.append((i, layer, kname))
    return out


def dag_multipliers(net: DagNet) -> dict[str, tuple[float, float]]:
    """``{"<keras layer>/<variable>": (learning_rate, weight_decay)}`` of every trainable
    variable of ``to_keras_dag(net)`` (a shared param once: one Keras layer)."""
    table = {}
    for _, layer, kname in param_owners(net):
        for name, (j, role) in held_variables(layer).items():
            if role not in MOMENT_ROLES:
                p = net.param(layer.params[j])
                table[f"{kname}/{name}"] = (float(p.learning_rate), float(p.weight_decay))
    return table
