"""MatConvNet's DagNN wrapper (``matlab/+dagnn/@DagNN``, commit 1e5ae7b7) in NumPy: ``DagNet``.

Names mirror ``dagnn.DagNN`` in snake_case: ``net.vars`` (``Var``: name, value, der,
precious), ``net.params`` (``Param``: name, value, der, learning_rate, weight_decay,
train_method), ``net.layers`` (``DagLayer``: name, type such as ``'dagnn.Conv'``, inputs,
outputs, params - lists of names - and ``block``, the block's properties in snake_case).
``net.eval(inputs, der_outputs, mode=...)`` fills values and derivatives exactly as
``DagNN.eval`` with ``conserveMemory = false``:

* layers run in ``getLayerExecutionOrder`` (rebuild.m's depth-first ``dagSort``), forward
  in that order and backward in reverse;
* a layer whose input has no value is skipped forward (a Loss without labels), one whose
  output has no derivative is skipped backward (a Loss without a der_output, classerror);
* a var read by several layers (or twice by one) gets the sum of their derivatives, a param
  used by several layers the sum of its per-layer derivatives (``accumulate_param_ders``
  also adds to the derivative of the previous eval, as cnn_train_dag's sub-batches do);
* labels and a Crop's size input get no derivative (``None``, MATLAB's ``[]``).

As in MatConvNet, values and derivatives stay in ``net.vars`` from one eval to the next
(a var not given again keeps its old value; ``net.reset()`` clears them) and blocks keep
their transient state in ``layer.state`` (BatchNorm's batch moments, DropOut's mask, a
Loss's running ``average``, Crop/Concat input sizes).

Modes: ``"normal"`` (BatchNorm uses batch statistics, DropOut draws a mask) and ``"test"``
(BatchNorm uses its moments param, DropOut is the identity forward and backward). A
backward pass in mode test through a BatchNorm raises McnError naming the layer, as
MatConvNet fails there. DropOut masks in mode normal come from ``masks[layer name]`` if
given, else from ``rng`` (a ``numpy.random.Generator``; MATLAB's random stream is not
reproduced). Parameters are cast to the class of the data, as vl_simplenn's reference does.

Blocks the reference runs: Conv, ConvTranspose, BatchNorm, ReLU, Sigmoid, SoftMax, Pooling,
LRN, DropOut, Sum, Concat, Crop, Scale, Loss (every vl_nnloss type), PDist, NormOffset,
SpatialNorm (harness.mcn.dagnn_blocks). Any other type (a custom layer) loads and is kept,
and ``eval`` raises McnError naming it when it reaches it: ``net.remove_layer(name)`` cuts
it off (with the vars and params only it used).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.mcn import dagnn_blocks as blocks
from harness.mcn.net import Layer, Net, layer_errors, matlab_field, python_field
from harness.mcn.options import McnError, check_budget, is_empty

__all__ = ["DagLayer", "DagNet", "MODES", "Param", "Var"]

MODES = ("normal", "test")


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


def _mode(mode: str) -> str:
    m = mode.lower() if isinstance(mode, str) else mode
    if m == "train":  # DagNN's set.mode accepts 'train' for 'normal'
        return "normal"
    if m not in MODES:
        raise McnError(f"Expected mode to be one of {MODES}. Received mode={mode!r}")
    return m


def _names_list(value: Any, where: str) -> list[str]:
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


def _shown(names: list[str], limit: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _add(a: Any, b: Any) -> Any:
    """``a + b`` as MATLAB adds two derivatives (trailing singleton dimensions implied)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != b.ndim and a.ndim and b.ndim:
        nd = max(a.ndim, b.ndim)
        a = a.reshape(a.shape + (1,) * (nd - a.ndim))
        b = b.reshape(b.shape + (1,) * (nd - b.ndim))
    return a + b


class DagNet:
    """A DagNN network: ``vars``, ``params``, ``layers`` (lists), ``meta`` (dict, MatConvNet
    keys) and ``notes`` (what the loader adapted or ignored; not part of the network).

    ``DagNet(layers, params=..., vars=..., meta=...)`` adds the layers in order (as
    ``addLayer``: vars and params are created in order of first use, a BatchNorm's third
    param gets ``train_method="average"`` and learning rate 0.1), then takes the given
    params' value, learning_rate and weight_decay (and train_method unless it is the default
    "gradient", as ``loadobj`` keeps BatchNorm's "average") and vars' precious by name.
    """

    def __init__(
        self,
        layers: Iterable[DagLayer] | None = None,
        params: Iterable[Param] | None = None,
        vars: Iterable[Var] | None = None,
        meta: dict | None = None,
        notes: list[str] | None = None,
    ):
        self.layers: list[DagLayer] = []
        self.vars: list[Var] = []
        self.params: list[Param] = []
        self.meta: dict = dict(meta) if isinstance(meta, dict) else {}
        self.notes: list[str] = list(notes) if notes else []
        self.accumulate_param_ders = False
        self._order: list[int] | None = None
        self._var_index: dict[str, int] = {}
        self._param_index: dict[str, int] = {}
        for layer in layers or []:
            self.add_layer(
                layer.name,
                layer.type,
                layer.inputs,
                layer.outputs,
                layer.params,
                layer.block,
                skip_rebuild=True,
            )
            self.layers[-1].matlab_names = dict(layer.matlab_names)
        self.rebuild()
        for p in params or []:
            mine = self.param(p.name)
            mine.value, mine.learning_rate, mine.weight_decay = p.value, p.learning_rate, p.weight_decay
            if p.train_method != "gradient":
                mine.train_method = p.train_method
        for v in vars or []:
            self.var(v.name).precious = bool(v.precious)
        if layers:
            self._note_unsupported()

    # ------------------------------------------------------------------ structure

    def add_layer(
        self,
        name: str,
        type: str,
        inputs: Iterable[str] | str,
        outputs: Iterable[str] | str,
        params: Iterable[str] | str = (),
        block: Mapping[str, Any] | None = None,
        *,
        skip_rebuild: bool = False,
    ) -> DagLayer:
        """``addLayer``: block properties may be given in snake_case or MATLAB's camelCase;
        the block gets its class defaults and MATLAB's setters (``pad`` 1 -> 4 values ...)."""
        if not isinstance(name, str) or not name:
            raise McnError(f"Expected a layer name (a non-empty string). Received {name!r}")
        if any(layer.name == name for layer in self.layers):
            raise McnError(f"There is already a layer with name {name!r}.")
        if not isinstance(type, str):
            raise McnError(f"layer '{name}': Expected type to be a class name. Received {type!r}")
        where = f"layer '{name}' ({type})"
        ins, outs, pars = (
            _names_list(v, f"{where}.{k}")
            for k, v in (("inputs", inputs), ("outputs", outputs), ("params", params))
        )
        raw = dict(block or {})
        snake = {python_field(k): v for k, v in raw.items()}
        matlab_names = {python_field(k): k for k in raw}
        normal, ignored = blocks.normalise_block(type, snake, where)
        if ignored:
            self.notes.append(
                f"{where}: block propert{'y' if len(ignored) == 1 else 'ies'} "
                f"{', '.join(matlab_names.get(k, matlab_field(k)) for k in ignored)} "
                f"not part of {type}; ignored"
            )
        layer = DagLayer(name, type, ins, outs, pars, normal, matlab_names=matlab_names)
        self.layers.append(layer)
        for v in ins + outs:
            self._add_var(v)
        for p in pars:
            self._add_param(p)
        if type == "dagnn.BatchNorm":  # BatchNorm.attach
            if len(pars) < 3:
                raise McnError(f"{where}: Expected 3 params (gains, biases, moments). Received params={pars}")
            moments = self.params[self._param_index[pars[2]]]
            moments.train_method, moments.learning_rate = "average", 0.1
        if not skip_rebuild:
            self.rebuild()
        return layer

    def _add_var(self, name: str) -> None:
        if name not in self._var_index:
            self._var_index[name] = len(self.vars)
            self.vars.append(Var(name))

    def _add_param(self, name: str) -> None:
        if name not in self._param_index:
            self._param_index[name] = len(self.params)
            self.params.append(Param(name, None))

    def rebuild(self) -> None:
        """rebuild.m: fan-in/fan-out, vars and params no layer uses dropped, indexes and the
        execution order recomputed."""
        for name in (n for layer in self.layers for n in layer.inputs + layer.outputs):
            self._add_var(name)
        for name in (n for layer in self.layers for n in layer.params):
            self._add_param(name)
        fanin = [0] * len(self.vars)
        fanout = [0] * len(self.vars)
        pfanout = [0] * len(self.params)
        for layer in self.layers:
            for v in layer.inputs:
                fanout[self._var_index[v]] += 1
            for v in layer.outputs:
                fanin[self._var_index[v]] += 1
            for p in layer.params:
                pfanout[self._param_index[p]] += 1
        for v, a, b in zip(self.vars, fanin, fanout, strict=True):
            v.fanin, v.fanout = a, b
        for p, n in zip(self.params, pfanout, strict=True):
            p.fanout = n
        self.vars = [v for v in self.vars if v.fanin + v.fanout > 0]
        self.params = [p for p in self.params if p.fanout > 0]
        self._var_index = {v.name: i for i, v in enumerate(self.vars)}
        self._param_index = {p.name: i for i, p in enumerate(self.params)}
        for layer in self.layers:
            layer.input_indexes = [self._var_index[v] for v in layer.inputs]
            layer.output_indexes = [self._var_index[v] for v in layer.outputs]
            layer.param_indexes = [self._param_index[p] for p in layer.params]
        self._order = None

    def remove_layer(self, name: str | Iterable[str]) -> None:
        """``removeLayer``: the layer(s) go, and so do the vars and params only they used."""
        names = [name] if isinstance(name, str) else list(name)
        for n in names:
            self.layer(n)
        self.layers = [layer for layer in self.layers if layer.name not in set(names)]
        self.rebuild()

    def var(self, name: str) -> Var:
        return self.vars[self.var_index(name)]

    def param(self, name: str) -> Param:
        return self.params[self.param_index(name)]

    def layer(self, name: str) -> DagLayer:
        return self.layers[self.layer_index(name)]

    def var_index(self, name: str) -> int:
        if name not in self._var_index:
            raise McnError(
                f"No variable of name {name!r} in the network. Vars: {_shown([v.name for v in self.vars])}"
            )
        return self._var_index[name]

    def param_index(self, name: str) -> int:
        if name not in self._param_index:
            raise McnError(
                f"No param of name {name!r} in the network. Params: {_shown([p.name for p in self.params])}"
            )
        return self._param_index[name]

    def layer_index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise McnError(
            f"No layer of name {name!r} in the network. Layers: {_shown([l.name for l in self.layers])}"
        )

    def get_inputs(self) -> list[str]:
        """Vars no layer outputs (``getInputs``)."""
        return [v.name for v in self.vars if v.fanin == 0]

    def get_outputs(self) -> list[str]:
        """Vars no layer reads (``getOutputs``)."""
        return [v.name for v in self.vars if v.fanout == 0]

    def execution_order(self) -> list[int]:
        """``getLayerExecutionOrder`` (0-based layer indexes): rebuild.m's ``dagSort``, a
        depth-first numbering from the outputs, sorted by decreasing depth (stable)."""
        if self._order is None:
            self._order = self._dag_sort()
        return list(self._order)

    def _dag_sort(self) -> list[int]:
        hops: list[list[int]] = [[] for _ in self.vars]
        for l, layer in enumerate(self.layers):
            for v in layer.input_indexes:
                hops[v].append(l)
        order = [0] * len(self.layers)

        def visit(layer: int):  # dagSort, as a generator so that deep nets need no recursion
            if order[layer] > 0:
                return
            order[layer] = -1  # open
            n = 0
            for o in self.layers[layer].output_indexes:
                for child in hops[o]:
                    if order[child] == -1:
                        return  # a cycle: the layer stays open, as in MatConvNet
                    if order[child] == 0:
                        yield child
                    n = max(n, order[child])
            order[layer] = n + 1

        for l in range(len(self.layers)):
            if order[l] != 0:
                continue
            stack = [visit(l)]
            while stack:
                try:
                    stack.append(visit(next(stack[-1])))
                except StopIteration:
                    stack.pop()
        if any(o == -1 for o in order) and "the network graph contains a cycle" not in self.notes:
            self.notes.append("the network graph contains a cycle")
        return [int(i) for i in np.argsort(-np.asarray(order), kind="stable")]

    # ------------------------------------------------------------------ evaluation

    def reset(self) -> None:
        """``reset``: values and derivatives cleared, blocks' transient state too."""
        for v in self.vars:
            v.value = v.der = None
        for p in self.params:
            p.der = None
        for layer in self.layers:
            layer.state = {}

    def eval(
        self,
        inputs: Mapping[str, Any] | Iterable[tuple[str, Any]],
        der_outputs: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        *,
        mode: str = "normal",
        rng: np.random.Generator | None = None,
        masks: Mapping[str, np.ndarray] | None = None,
        lrn_exact: bool = False,
    ) -> None:
        """``DagNN.eval(inputs, derOutputs)`` with ``net.mode = mode`` and ``conserveMemory
        = false``: ``{'input': x, 'label': y}``, ``{'objective': 1.0}``. Fills
        ``vars[i].value`` (and with der_outputs ``vars[i].der``, ``params[i].der``).
        ``rng``/``masks`` (by layer name) give the DropOut masks of mode normal;
        ``lrn_exact`` swaps LRN's approximate power (MatConvNet's CPU fast_pow) for the
        exact one."""
        ctx = blocks.EvalContext(_mode(mode), rng, dict(masks or {}), lrn_exact)
        pairs = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
        seeds = list((der_outputs.items() if isinstance(der_outputs, Mapping) else der_outputs) or [])
        for name, _ in pairs + seeds:
            if name not in self._var_index:
                raise McnError(
                    f"No variable of name {name!r} could be found in the DAG. "
                    f"Vars: {_shown([v.name for v in self.vars])}"
                )
        for name, value in pairs:
            self.vars[self._var_index[name]].value = np.asarray(value) if isinstance(value, list) else value
        order = self.execution_order()
        held = sum(np.asarray(v.value).nbytes for v in self.vars if v.value is not None)
        for l in order:
            held += self._forward(l, ctx, backward=bool(seeds), held=held)
        if not seeds:
            return
        for name, value in seeds:
            self.vars[self._var_index[name]].der = value
        pending_var = [0] * len(self.vars)
        pending_param = [0] * len(self.params)
        for l in reversed(order):
            self._backward(l, ctx, pending_var, pending_param)

    def _forward(self, l: int, ctx: blocks.EvalContext, backward: bool, held: int) -> int:
        layer = self.layers[l]
        values = [self.vars[i].value for i in layer.input_indexes]
        if any(is_empty(v) for v in values):
            return 0
        params = [self.params[p].value for p in layer.param_indexes]
        with layer_errors(layer, l):
            outputs = blocks.forward(layer, values, params, ctx)
            if len(outputs) < len(layer.output_indexes):
                raise McnError(
                    f"Expected {len(layer.output_indexes)} outputs. The block gives {len(outputs)}"
                )
            added = sum(np.asarray(y).nbytes for y in outputs)
            check_budget((held + added) * (2 if backward else 1), "the vars of this eval")
        for i, y in zip(layer.output_indexes, outputs, strict=False):
            self.vars[i].value = y
        return added

    def _backward(
        self, l: int, ctx: blocks.EvalContext, pending_var: list[int], pending_param: list[int]
    ) -> None:
        layer = self.layers[l]
        ders = [self.vars[o].der for o in layer.output_indexes]
        if any(is_empty(d) for d in ders):
            return
        values = [self.vars[i].value for i in layer.input_indexes]
        params = [self.params[p].value for p in layer.param_indexes]
        with layer_errors(layer, l):
            if not blocks.supported(layer.type):
                raise blocks.unsupported_block(layer)
            der_inputs, der_params = blocks.backward(layer, values, params, ders, ctx)
            if len(der_inputs) != len(layer.input_indexes):
                raise McnError(f'Invalid derivatives returned by layer "{layer.name}".')
            if len(der_params) < len(layer.param_indexes):
                raise McnError(
                    f"Expected {len(layer.param_indexes)} param derivatives. "
                    f"The block gives {len(der_params)}"
                )
            for v, d in zip(layer.input_indexes, der_inputs, strict=True):
                var = self.vars[v]
                if pending_var[v] == 0 or is_empty(var.der):
                    var.der = None if is_empty(d) else d
                elif not is_empty(d):
                    var.der = _add(var.der, d)
                pending_var[v] += 1
            for p, d in zip(layer.param_indexes, der_params, strict=False):
                par = self.params[p]
                if (pending_param[p] == 0 and not self.accumulate_param_ders) or is_empty(par.der):
                    par.der = None if is_empty(d) else d
                elif not is_empty(d):
                    par.der = _add(par.der, d)
                pending_param[p] += 1

    def _note_unsupported(self) -> None:
        """A line in ``notes`` for the layers eval cannot run (custom types, custom losses)."""
        for layer in self.layers:
            loss = layer.block.get("loss")
            if layer.type == "dagnn.Loss" and not (isinstance(loss, str) and loss.lower() in blocks.LOSSES):
                self.notes.append(
                    f"layer '{layer.name}' (dagnn.Loss): loss {loss!r} is not a vl_nnloss loss (a custom "
                    "dagnn.Loss class): eval raises when it runs; remove it (net.remove_layer) to "
                    "evaluate the rest"
                )
        custom = sorted({l.type for l in self.layers if not blocks.supported(l.type)})
        if custom:
            names = [l.name for l in self.layers if l.type in custom]
            self.notes.append(
                f"layer type(s) {', '.join(custom)} (layers {_shown(names, 6)}) not run by the reference: "
                "remove them (net.remove_layer) before eval"
            )

    def loss_averages(self) -> dict[str, Any]:
        """The running ``average`` of every Loss (and PDist) layer, keyed by its output var
        (what cnn_train_dag reports; 0 before any eval)."""
        out = {}
        for layer in self.layers:
            if layer.type in ("dagnn.Loss", "dagnn.PDist") and layer.outputs:
                average = layer.state.get("average", 0.0)
                out[layer.outputs[0]] = (
                    float(np.asarray(average).ravel()[0]) if np.size(average) == 1 else average
                )
        return out

    # ------------------------------------------------------------------ copies and conversion

    def copy(self) -> DagNet:
        """``copy()`` (``loadobj(saveobj())``): the same network - layers, param values and
        multipliers, train methods, meta - without var values, derivatives or block state."""
        new = copy.deepcopy(self.without_values())
        return new

    def without_values(self) -> DagNet:
        """A shallow structure sharing param arrays, with no values, derivatives or state."""
        net = DagNet.__new__(DagNet)
        net.layers = [
            DagLayer(
                l.name,
                l.type,
                list(l.inputs),
                list(l.outputs),
                list(l.params),
                dict(l.block),
                matlab_names=dict(l.matlab_names),
                input_indexes=list(l.input_indexes),
                output_indexes=list(l.output_indexes),
                param_indexes=list(l.param_indexes),
            )
            for l in self.layers
        ]
        net.vars = [Var(v.name, precious=v.precious, fanin=v.fanin, fanout=v.fanout) for v in self.vars]
        net.params = [
            Param(p.name, p.value, None, p.learning_rate, p.weight_decay, p.train_method, p.fanout)
            for p in self.params
        ]
        net.meta, net.notes = self.meta, list(self.notes)
        net.accumulate_param_ders = False
        net._order = None if self._order is None else list(self._order)
        net._var_index, net._param_index = dict(self._var_index), dict(self._param_index)
        return net

    def __repr__(self) -> str:
        body = "\n".join(
            f"  {i + 1:3d} {l.type:<20} {l.name}: {', '.join(l.inputs)} -> {', '.join(l.outputs)}"
            + (f" [{', '.join(l.params)}]" if l.params else "")
            for i, l in enumerate(self.layers)
        )
        return f"DagNet({len(self.layers)} layers, {len(self.vars)} vars, {len(self.params)} params)\n{body}"

    def to_struct(self) -> dict[str, Any]:
        """``saveobj``: ``vars`` (name, precious), ``params`` (name, value, learningRate,
        weightDecay), ``layers`` (name, type, inputs, outputs, params, block) as lists of
        dicts (the caller writes them as struct arrays), and ``meta``."""
        return {
            "vars": [{"name": v.name, "precious": bool(v.precious)} for v in self.vars],
            "params": [
                {
                    "name": p.name,
                    "value": np.zeros((0, 0)) if p.value is None else p.value,
                    "learningRate": float(p.learning_rate),
                    "weightDecay": float(p.weight_decay),
                }
                for p in self.params
            ],
            "layers": [
                {
                    "name": l.name,
                    "type": l.type,
                    "inputs": list(l.inputs),
                    "outputs": list(l.outputs),
                    "params": list(l.params),
                    "block": {_block_name(l, k): _saved(k, v) for k, v in l.block.items()},
                }
                for l in self.layers
            ],
            "meta": self.meta,
        }

    @staticmethod
    def from_struct(s: Any, source: str = "net") -> DagNet:
        """``dagnn.DagNN.loadobj(s)`` for a converted saveobj struct (harness.mcn.matfile's
        conversion rules): layers added in order, then the saved params' value,
        learningRate, weightDecay (and trainMethod if saved) and the vars' precious, by
        name. What real files hold is adapted, with a line in ``notes`` where something is
        left out: numbers stored as uint8 are floats, 1x1 params (read as numbers) become
        (1, 1) arrays in the class of the net's other params, filters whose trailing
        singleton dimensions MATLAB dropped get them back from the layer's ``size``."""
        if not isinstance(s, dict) or "layers" not in s:
            raise McnError(f"Expected {source} to be a DagNN struct with a 'layers' field.")
        layers_raw = s["layers"]
        if isinstance(layers_raw, dict):
            layers_raw = [layers_raw]
        if not isinstance(layers_raw, list):
            raise McnError(f"Expected {source}.layers to be a struct array of layers.")
        net = DagNet()
        for i, raw in enumerate(layers_raw):
            where = f"{source}.layers({i + 1})"
            if not isinstance(raw, dict):
                raise McnError(f"{where}: Expected a layer struct. Received {type(raw).__name__}")
            name, ltype = raw.get("name"), raw.get("type")
            if not isinstance(name, str) or not name:
                raise McnError(f"{where}.name: Expected a layer name. Received {type(name).__name__}")
            if not isinstance(ltype, str) or not ltype:
                raise McnError(f"{where}.type: Expected a class name. Received {type(ltype).__name__}")
            block = raw.get("block", {})
            if not isinstance(block, dict):
                if not (is_empty(block) or block == []):
                    raise McnError(f"{where}.block: Expected a struct. Received {type(block).__name__}")
                block = {}
            net.add_layer(
                name,
                ltype,
                _names_list(raw.get("inputs"), f"{where}.inputs"),
                _names_list(raw.get("outputs"), f"{where}.outputs"),
                _names_list(raw.get("params"), f"{where}.params"),
                block,
                skip_rebuild=True,
            )
        net.rebuild()
        _load_params(net, s.get("params", []), source)
        _load_vars(net, s.get("vars", []), source)
        meta = s.get("meta", {})
        net.meta = blocks.as_double(meta) if isinstance(meta, dict) else {}
        extra = [k for k in s if k not in ("vars", "params", "layers", "meta")]
        if extra:
            net.notes.append(f"{source}: fields {', '.join(extra)} are not part of a DagNN; ignored")
        net._note_unsupported()
        return net

    @staticmethod
    def from_simplenn(net: Net) -> DagNet:
        """``dagnn.DagNN.fromSimpleNN(net)``: the net is tidied (vl_simplenn_tidy) first;
        vars ``x0`` (input) ... ``xL`` plus ``label`` for a softmaxloss; params
        ``<layer>f``/``<layer>b`` (conv, convt; no ``b`` and ``has_bias`` False without
        biases), bnorm ``<layer>m``/``<layer>b``/``<layer>x`` (gains, biases, moments: the
        moments param has learning rate 0.1 unless the layer gives a third one, weight
        decay 0, train method average); a bnorm's epsilon is not copied (the block keeps
        1e-5). A 'loss' or custom layer raises McnError, as in MatConvNet."""
        from harness.mcn.simplenn import vl_simplenn_tidy

        tidy = vl_simplenn_tidy(net)
        dag = DagNet(meta=copy.deepcopy(tidy.meta))
        for l, layer in enumerate(tidy.layers, start=1):
            dag._add_simplenn_layer(layer, l)
        inputs_meta = dag.meta.get("inputs")
        if isinstance(inputs_meta, dict):
            inputs_meta["name"] = dag.layers[0].inputs[0]
        elif isinstance(inputs_meta, list) and inputs_meta and isinstance(inputs_meta[0], dict):
            inputs_meta[0]["name"] = dag.layers[0].inputs[0]
        return dag

    def _add_simplenn_layer(self, layer: Layer, l: int) -> None:
        name, t = layer.name, layer.type
        ins, outs = [f"x{l - 1}"], [f"x{l}"]
        params: list[tuple[str, Any]] = []
        lr = np.asarray(layer.get("learning_rate", []), dtype=np.float64).ravel(order="F")
        wd = np.asarray(layer.get("weight_decay", []), dtype=np.float64).ravel(order="F")
        block: dict[str, Any]
        if t in ("conv", "convt"):
            w = layer.weights
            has_bias = len(w) > 1 and not is_empty(w[1])
            params = [(f"{name}f", w[0])] + ([(f"{name}b", w[1])] if has_bias else [])
            size = list(np.shape(w[0]))
            if t == "conv":
                btype = "dagnn.Conv"
                block = {"size": size, "pad": layer.pad, "stride": layer.stride, "dilate": layer.dilate}
            else:
                btype = "dagnn.ConvTranspose"
                block = {
                    "size": size,
                    "upsample": layer.upsample,
                    "crop": layer.crop,
                    "num_groups": layer.num_groups,
                }
            block |= {"has_bias": has_bias, "opts": list(layer.get("opts", []))}
            wd = wd[:1] if not has_bias else wd
        elif t == "pool":
            btype = "dagnn.Pooling"
            if not layer.has("method"):
                self.notes.append(
                    f"layer {l} '{name}' (pool): no field 'method' (fromSimpleNN needs one); 'max'"
                )
            block = {
                "method": layer.get("method", "max"),
                "pool_size": layer.pool,
                "pad": layer.pad,
                "stride": layer.stride,
                "opts": list(layer.get("opts", [])),
            }
        elif t in ("normalize", "lrn"):
            btype, block = "dagnn.LRN", {"param": layer.param}
        elif t == "dropout":
            btype, block = "dagnn.DropOut", {"rate": layer.rate}
        elif t == "relu":
            btype, block = "dagnn.ReLU", {"leak": layer.get("leak", 0.0)}
        elif t == "sigmoid":
            btype, block = "dagnn.Sigmoid", {}
        elif t == "softmax":
            btype, block = "dagnn.SoftMax", {}
        elif t == "softmaxloss":
            btype, block = "dagnn.Loss", {"loss": "softmaxlog"}
            label, k = "label", 0
            while label in self._var_index:
                k += 1
                label = f"label{k}"
            ins.append(label)
        elif t == "bnorm":
            btype, block = "dagnn.BatchNorm", {}
            params = [(f"{name}{s}", w) for s, w in zip("mbx", layer.weights[:3], strict=True)]
            if lr.size and lr.size < 3:
                self.notes.append(
                    f"layer {l} '{name}' (bnorm): learningRate has {lr.size} entries (fromSimpleNN reads 3); "
                    "the moments keep 0.1"
                )
            wd = np.concatenate([wd[:2], [0.0]]) if wd.size else wd
        else:
            raise McnError(f"layer {l} '{name}': {t} is unsupported (dagnn.DagNN.fromSimpleNN)")
        self.add_layer(name, btype, ins, outs, [p for p, _ in params], block)
        for j, (pname, value) in enumerate(params):
            p = self.param(pname)
            if not is_empty(value):
                p.value = np.asarray(value)
            if j < lr.size:
                p.learning_rate = float(lr[j])
            if j < wd.size:
                p.weight_decay = float(wd[j])


def _block_name(layer: DagLayer, key: str) -> str:
    """The MATLAB name of a block property: camelCase for the block's own properties,
    else the name it was given (a custom block's ``loss_type`` stays ``loss_type``)."""
    if key in blocks.BLOCKS.get(layer.type, {}):
        return matlab_field(key)
    return layer.matlab_names.get(key, key)


def _saved(key: str, value: Any) -> Any:
    """A block property as saveobj writes it: vectors as 1 x N rows, ``[]`` for None."""
    if value is None:
        return np.zeros((0, 0))
    if key in blocks.VECTOR_PROPS and isinstance(value, np.ndarray):
        return value.reshape(1, -1)
    return value


def _load_params(net: DagNet, saved: Any, source: str) -> None:
    items = [saved] if isinstance(saved, dict) else saved if isinstance(saved, list) else []
    unknown = []
    for i, p in enumerate(items):
        where = f"{source}.params({i + 1})"
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise McnError(f"{where}: Expected a struct with a 'name'.")
        if p["name"] not in net._param_index:
            unknown.append(p["name"])
            continue
        mine = net.param(p["name"])
        if "value" in p:
            mine.value = p["value"]
        for key, attr in (("learningRate", "learning_rate"), ("weightDecay", "weight_decay")):
            if key in p:
                value = blocks.number(p[key], f"{where}.{key}")
                if value is not None:
                    setattr(mine, attr, value)
        if isinstance(p.get("trainMethod"), str):
            mine.train_method = p["trainMethod"]
    if unknown:
        net.notes.append(f"{source}.params: {_shown(unknown, 6)} used by no layer; ignored")
    like = next(
        (
            p.value.dtype
            for p in net.params
            if isinstance(p.value, np.ndarray) and p.value.dtype in (np.float32, np.float64)
        ),
        np.dtype(np.float64),
    )
    for p in net.params:
        p.value = _param_value(p.value, like, f"{source}: param '{p.name}'")
    for layer in net.layers:  # filters: trailing singleton dimensions back from the block's size
        if layer.type in ("dagnn.Conv", "dagnn.ConvTranspose") and layer.params:
            p = net.param(layer.params[0])
            size = tuple(int(s) for s in layer.block.get("size", ()))
            if isinstance(p.value, np.ndarray) and len(size) == 4 and p.value.ndim < 4:
                nd = p.value.ndim
                if p.value.shape == size[:nd] and all(s == 1 for s in size[nd:]):
                    p.value = p.value.reshape(size)


def _param_value(value: Any, like: np.dtype, where: str) -> Any:
    if value is None:
        return None
    if isinstance(value, bool | int | np.bool_ | np.integer):
        return np.full((1, 1), float(value))
    if isinstance(value, float | np.floating):
        return np.full((1, 1), value, dtype=like)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        if value.size == 0:
            return None
        return value.astype(np.float64) if value.dtype.kind in "biu" else value
    raise McnError(f"{where}: Expected a real numeric array. Received {type(value).__name__}")


def _load_vars(net: DagNet, saved: Any, source: str) -> None:
    items = [saved] if isinstance(saved, dict) else saved if isinstance(saved, list) else []
    unknown = []
    for i, v in enumerate(items):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise McnError(f"{source}.vars({i + 1}): Expected a struct with a 'name'.")
        if v["name"] not in net._var_index:
            unknown.append(v["name"])
            continue
        if "precious" in v:
            flag = v["precious"]
            net.var(v["name"]).precious = bool(np.asarray(flag).any()) if np.size(flag) else False
    if unknown:
        net.notes.append(f"{source}.vars: {_shown(unknown, 6)} used by no layer; ignored")
