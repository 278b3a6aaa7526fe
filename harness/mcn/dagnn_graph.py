"""The records of a DagNN graph and what is computed on them without the network.

``Var`` (name, value, der, precious), ``Param`` (name, value, der, learning_rate,
weight_decay, train_method) and ``DagLayer`` (name, type, inputs, outputs, params, block)
are the entries of ``DagNet.vars``, ``DagNet.params`` and ``DagNet.layers``
(harness.mcn.dagnn, which re-exports them). Beside them: rebuild.m's ``dagSort`` (the
execution order), MATLAB's sum of two derivatives, and the name lists a DagNN struct
holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.mcn.options import McnError

__all__ = ["DagLayer", "Param", "Var", "add_ders", "dag_sort", "names_list", "shown"]


@dataclass(eq=False)
class Var:
    """One variable of the graph; ``value``/``der`` None where MATLAB holds ``[]``."""

    name: str
    value: Any = None
    der: Any = None
    precious: bool = False
    fanin: int = field(default=0, repr=False)
    fanout: int = field(default=0, repr=False)


@dataclass(eq=False)
class Param:
    """One parameter; ``train_method`` is ``"gradient"`` or ``"average"`` (BatchNorm moments)."""

    name: str
    value: Any
    der: Any = None
    learning_rate: float = 1.0
    weight_decay: float = 1.0
    train_method: str = "gradient"
    fanout: int = field(default=0, repr=False)


@dataclass(eq=False)
class DagLayer:
    """One layer: ``block`` holds the block's properties (snake_case keys), ``state`` its
    transient properties (not saved), ``matlab_names`` the MATLAB spelling of block keys
    that snake_case cannot restore (custom blocks)."""

    name: str
    type: str
    inputs: list[str]
    outputs: list[str]
    params: list[str]
    block: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    matlab_names: dict[str, str] = field(default_factory=dict, repr=False)
    input_indexes: list[int] = field(default_factory=list, repr=False)
    output_indexes: list[int] = field(default_factory=list, repr=False)
    param_indexes: list[int] = field(default_factory=list, repr=False)


def names_list(value: Any, where: str) -> list[str]:
    """A cell of names (or one char name) as a list of str."""
    if isinstance(value, str):
        return [value] if value else []
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        return []
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = list(value.ravel(order="F"))
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise McnError(f"{where}: Expected a cell of names. Received {type(value).__name__}")
    return list(value)


def shown(names: list[str], limit: int = 12) -> str:
    """The first ``limit`` names joined by commas, with the count of all when there are more."""
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def add_ders(a: Any, b: Any) -> Any:
    """``a + b`` as MATLAB adds two derivatives (trailing singleton dimensions implied)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != b.ndim and a.ndim and b.ndim:
        nd = max(a.ndim, b.ndim)
        a = a.reshape(a.shape + (1,) * (nd - a.ndim))
        b = b.reshape(b.shape + (1,) * (nd - b.ndim))
    return a + b


def dag_sort(layers: list[DagLayer], num_vars: int) -> tuple[list[int], bool]:
    """``getLayerExecutionOrder`` of ``layers`` (their indexes set, over ``num_vars`` vars):
    rebuild.m's ``dagSort``, a depth-first numbering from the outputs, sorted by decreasing
    depth (stable). Returns the 0-based layer order and whether the graph has a cycle (a
    layer on it stays open, as in MatConvNet)."""
    hops: list[list[int]] = [[] for _ in range(num_vars)]
    for l, layer in enumerate(layers):
        for v in layer.input_indexes:
            hops[v].append(l)
    order = [0] * len(layers)

    def visit(layer: int):  # dagSort, as a generator so that deep nets need no recursion
        if order[layer] > 0:
            return
        order[layer] = -1  # open
        n = 0
        for o in layers[layer].output_indexes:
            for child in hops[o]:
                if order[child] == -1:
                    return  # a cycle: the layer stays open, as in MatConvNet
                if order[child] == 0:
                    yield child
                n = max(n, order[child])
        order[layer] = n + 1

    for l in range(len(layers)):
        if order[l] != 0:
            continue
        stack = [visit(l)]
        while stack:
            try:
                stack.append(visit(next(stack[-1])))
            except StopIteration:
                stack.pop()
    cyclic = any(o == -1 for o in order)
    return [int(i) for i in np.argsort(-np.asarray(order), kind="stable")], cyclic
