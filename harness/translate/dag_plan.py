"""The plan of ``to_keras_dag``: what the Keras model of a DagNN net is made of, computed
from the net alone (no Keras).

The translated layers in execution order (Loss layers left out), the Keras layer that holds
each DagNN layer's params (layers sharing all their params and their block are one Keras
layer), the model's input and output vars (``dag_inputs``, ``dag_outputs``), and the input
sizes (``input_sizes``, ``net.meta``, or the depth of the first filters that read a var).
The checks that refuse a net name the layer: ``layer_where`` and ``located``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.options import McnError, is_empty
from harness.translate.build import TranslationError, keras_name
from harness.translate.weights import conv_to_keras

__all__ = [
    "LOSS",
    "SUPPORTED_BLOCKS",
    "DagPlan",
    "dag_inputs",
    "dag_keras_layers",
    "dag_outputs",
    "dag_plan",
    "input_shapes",
    "layer_where",
    "located",
]

LOSS = "dagnn.Loss"
SUPPORTED_BLOCKS = (
    "dagnn.Conv",
    "dagnn.ConvTranspose",
    "dagnn.BatchNorm",
    "dagnn.ReLU",
    "dagnn.Sigmoid",
    "dagnn.SoftMax",
    "dagnn.Pooling",
    "dagnn.LRN",
    "dagnn.DropOut",
    "dagnn.Sum",
    "dagnn.Concat",
    "dagnn.Crop",
    "dagnn.Scale",
)
# Blocks whose output has the depth of their (first) input: depth inference walks through them.
_KEEP_DEPTH = frozenset(
    {"dagnn.ReLU", "dagnn.Sigmoid", "dagnn.SoftMax", "dagnn.Pooling", "dagnn.LRN", "dagnn.DropOut"}
)
# Block properties a shared Keras layer may differ in (helper layers, or implementation switches).
_PER_CALL = {"dagnn.Conv": ("pad", "opts"), "dagnn.ConvTranspose": ("crop", "opts")}


# ------------------------------------------------------------------------------ the plan


def layer_where(net: DagNet, layer: DagLayer) -> str:
    """How errors name ``layer``: ``layer N 'name' (type)``, N its 1-based place in ``net.layers``."""
    return f"layer {net.layers.index(layer) + 1} '{layer.name}' ({layer.type})"


@contextmanager
def located(where: str) -> Iterator[None]:
    """Errors raised while translating one layer name it (as TranslationError)."""
    try:
        yield
    except TranslationError as err:
        if str(err).startswith("layer "):
            raise
        raise TranslationError(f"{where}: {err}") from None
    except (McnError, TypeError, ValueError, IndexError) as err:
        raise TranslationError(f"{where}: {err}") from None


def _labels(net: DagNet) -> set[str]:
    """Input vars read only by Loss layers, never as their first input."""
    readers: dict[str, list[tuple[DagLayer, int]]] = {}
    for layer in net.layers:
        for k, v in enumerate(layer.inputs):
            readers.setdefault(v, []).append((layer, k))
    inputs = set(net.get_inputs())
    return {
        v
        for v, uses in readers.items()
        if v in inputs and all(layer.type == LOSS and k > 0 for layer, k in uses)
    }


def dag_inputs(net: DagNet) -> list[str]:
    """The var names the Keras model takes, in order: the net's inputs minus its labels."""
    labels = _labels(net)
    return [v for v in net.get_inputs() if v not in labels]


def dag_outputs(net: DagNet) -> list[str]:
    """The var names the Keras model returns, in order: ``net.get_outputs()`` with the
    output of a Loss layer replaced by the Loss's first input (its scores), no repeats."""
    producer = {v: layer for layer in net.layers for v in layer.outputs}
    out: list[str] = []
    for v in net.get_outputs():
        layer = producer.get(v)
        name = layer.inputs[0] if layer is not None and layer.type == LOSS and layer.inputs else v
        if name not in out:
            out.append(name)
    return out


def _frozen(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ("array", value.shape, tuple(value.ravel().tolist()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def _share_key(layer: DagLayer) -> tuple:
    skip = _PER_CALL.get(layer.type, ("opts",))
    return (layer.type, tuple(layer.params), _frozen({k: v for k, v in layer.block.items() if k not in skip}))


@dataclass
class DagPlan:
    """What the Keras model is made of, computed from the net alone (no Keras)."""

    layers: list[DagLayer]  # translated layers, in execution order (Loss layers left out)
    names: dict[str, str]  # DagNN layer -> the Keras layer holding its params / its operation
    owner: dict[str, str]  # DagNN layer -> the DagNN layer whose Keras layer it calls
    inputs: list[str]
    outputs: list[str]
    used: set[str] = field(default_factory=set)  # Keras names taken

    def unique(self, name: str) -> str:
        while name in self.used:
            name += "_"
        self.used.add(name)
        return name


def dag_plan(net: DagNet) -> DagPlan:
    """The plan of ``net``'s Keras model: its translated layers, the Keras layer holding each
    one's params (a group sharing all its params and its block: one), its input and output
    vars. Raises TranslationError, naming the layer, for a net the translation refuses (not a
    DagNet, a cycle, a var output twice, a read Loss output, an unsupported block, partly
    shared params)."""
    if not isinstance(net, DagNet):
        raise TranslationError(
            f"Expected a DagNN network (harness.mcn.dagnn.DagNet). Received {type(net).__name__}: "
            "use harness.translate.to_keras for a simplenn net"
        )
    order = net.execution_order()
    if "the network graph contains a cycle" in net.notes:
        raise TranslationError("Expected an acyclic DagNN graph. The network graph contains a cycle")
    producers: dict[str, list[DagLayer]] = {}
    for layer in net.layers:
        for v in layer.outputs:
            producers.setdefault(v, []).append(layer)
    for v, layers in producers.items():
        if len(layers) > 1:
            raise TranslationError(
                f"Expected each var to be the output of one layer. Received var '{v}' output by "
                f"layers {', '.join(l.name for l in layers)}"
            )
    losses = {l.name for l in net.layers if l.type == LOSS}
    for layer in net.layers:
        if layer.type == LOSS:
            continue
        for v in layer.inputs:
            p = producers.get(v)
            if p and p[0].name in losses:
                raise TranslationError(
                    f"{layer_where(net, layer)}: reads var '{v}', the output of Loss layer '{p[0].name}', "
                    "which the translation leaves out (its input is a model output)"
                )
        if layer.type not in SUPPORTED_BLOCKS:
            raise TranslationError(
                f"{layer_where(net, layer)}: Expected a block the translation supports "
                f"({', '.join(b.split('.')[1] for b in SUPPORTED_BLOCKS)}, and Loss, left out). "
                f"Received type={layer.type!r}: remove it with net.remove_layer({layer.name!r}) "
                "to translate the rest"
            )
    plan = DagPlan([], {}, {}, dag_inputs(net), dag_outputs(net))
    first_user: dict[str, DagLayer] = {}
    for i in order:
        layer = net.layers[i]
        if layer.type == LOSS:
            continue
        plan.layers.append(layer)
        shared = {p: first_user[p] for p in layer.params if p in first_user}
        if not shared:
            plan.names[layer.name] = plan.unique(keras_name(layer.name))
            plan.owner[layer.name] = layer.name
            for p in layer.params:
                first_user[p] = layer
            continue
        other = next(iter(shared.values()))
        if len(shared) != len(layer.params) or _share_key(layer) != _share_key(other):
            raise TranslationError(
                f"{layer_where(net, layer)}: shares param(s) {', '.join(shared)} with layer "
                f"'{other.name}' ({other.type}), but not all its params and block properties "
                f"(params {layer.params} vs {other.params}): the translation shares a whole Keras "
                "layer only (one Keras variable per param); partly shared layers are not supported"
            )
        plan.owner[layer.name] = plan.owner[other.name]
        plan.names[layer.name] = plan.names[other.name]
    return plan


def dag_keras_layers(net: DagNet) -> dict[str, str]:
    """DagNN layer name -> the name of the Keras layer of ``to_keras_dag(net)`` that holds its
    params (its operation): layers sharing their params map to the same Keras layer."""
    return dict(dag_plan(net).names)


# ------------------------------------------------------------------------------ sizes


def _hwc(value: Any, where: str) -> tuple[int | None, int | None, int | None]:
    """``(H, W, C)`` from 2 to 4 numbers (``[H W C N]``; ``[H W]``: the depth is inferred);
    None stays None (an unknown size)."""
    try:
        if isinstance(value, np.ndarray | str):
            raise TypeError
        vals = [None if v is None else int(v) for v in value]
    except (TypeError, ValueError):
        try:
            vals = [int(v) for v in np.asarray(value, dtype=float).ravel()]
        except (TypeError, ValueError):
            vals = []
    if not 2 <= len(vals) <= 4:
        raise TranslationError(f"Expected {where} to be (H, W, C). Received {value!r}")
    vals = vals + [None] if len(vals) == 2 else vals
    return vals[0], vals[1], vals[2]


def _meta_sizes(net: DagNet, inputs: list[str]) -> dict[str, tuple]:
    meta = net.meta if isinstance(net.meta, dict) else {}
    out: dict[str, tuple] = {}
    entries = meta.get("inputs")
    entries = [entries] if isinstance(entries, dict) else entries if isinstance(entries, list) else []
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("name"), str) and not is_empty(e.get("size")):
            out[e["name"]] = _hwc(e["size"], f"net.meta.inputs '{e['name']}'.size")
    size = meta.get("inputSize")
    if len(inputs) == 1 and inputs[0] not in out and not is_empty(size):
        out[inputs[0]] = _hwc(size, "net.meta.inputSize")
    return out


def _depth(net: DagNet, var: str, seen: set[str] | None = None) -> int | None:
    """The depth of ``var`` from the first filters (or BatchNorm gains) that read it, through
    layers that keep the depth; None if nothing tells."""
    seen = set() if seen is None else seen
    if var in seen:
        return None
    seen.add(var)
    for i in net.execution_order():
        layer = net.layers[i]
        if not layer.inputs or layer.inputs[0] != var:
            continue
        value = net.param(layer.params[0]).value if layer.params else None
        if layer.type == "dagnn.Conv" and not is_empty(value):
            return int(conv_to_keras(value).shape[2])
        if layer.type == "dagnn.ConvTranspose" and not is_empty(value):
            return int(conv_to_keras(value).shape[3])
        if layer.type == "dagnn.BatchNorm" and not is_empty(value):
            return int(np.size(value))
        if layer.type in _KEEP_DEPTH or layer.type == "dagnn.Crop":
            found = _depth(net, layer.outputs[0], seen)
            if found is not None:
                return found
    return None


def _size_only(net: DagNet, var: str) -> bool:
    """``var`` is read only as the size input of Crop layers."""
    uses = [(l, k) for l in net.layers for k, v in enumerate(l.inputs) if v == var]
    return bool(uses) and all(l.type == "dagnn.Crop" and k == 1 for l, k in uses)


def input_shapes(net: DagNet, plan: DagPlan, *, input_sizes: Mapping | None = None) -> dict[str, tuple]:
    """Input var -> the ``(H, W, C)`` of its ``keras.Input``: ``input_sizes``, else
    ``net.meta`` (inputs, inputSize), else unknown H and W; C, when nothing gives it, the depth
    of the first filters that read the var (None for a var read only as a Crop's size)."""
    given = dict(input_sizes or {})
    unknown = [k for k in given if k not in plan.inputs]
    if unknown:
        raise TranslationError(
            f"Expected input_sizes to name input vars of the net ({', '.join(plan.inputs)}). "
            f"Received {', '.join(map(str, unknown))}"
        )
    meta = _meta_sizes(net, plan.inputs)
    shapes = {}
    for v in plan.inputs:
        if v in given:
            h, w, c = _hwc(given[v], f"input_sizes[{v!r}]")
        elif v in meta:
            h, w, c = meta[v]
        else:
            h = w = c = None
        if c is None:
            c = _depth(net, v)
        if c is None and not _size_only(net, v):
            raise TranslationError(
                f"input var '{v}': Expected its depth from input_sizes, net.meta (inputs, inputSize) "
                "or the first filters that read it. Received none: pass "
                f"input_sizes={{{v!r}: (H, W, C)}} (H, W may be None)"
            )
        shapes[v] = (h, w, c)
    return shapes
