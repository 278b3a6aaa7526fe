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

The records (``Var``, ``Param``, ``DagLayer``) and dagSort are in harness.mcn.dagnn_graph;
saveobj/loadobj structs and fromSimpleNN in harness.mcn.dagnn_convert.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from harness.mcn import dagnn_blocks as blocks
from harness.mcn.dagnn_graph import DagLayer, Param, Var, add_ders, dag_sort, names_list, shown
from harness.mcn.net import Net, layer_errors, matlab_field, python_field
from harness.mcn.options import McnError, check_budget, is_empty

__all__ = ["DagLayer", "DagNet", "MODES", "Param", "Var"]

MODES = ("normal", "test")


def _mode(mode: str) -> str:
    m = mode.lower() if isinstance(mode, str) else mode
    if m == "train":  # DagNN's set.mode accepts 'train' for 'normal'
        return "normal"
    if m not in MODES:
        raise McnError(f"Expected mode to be one of {MODES}. Received mode={mode!r}")
    return m


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
            self.note_unsupported()

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
            names_list(v, f"{where}.{k}")
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
                f"No variable of name {name!r} in the network. Vars: {shown([v.name for v in self.vars])}"
            )
        return self._var_index[name]

    def param_index(self, name: str) -> int:
        if name not in self._param_index:
            raise McnError(
                f"No param of name {name!r} in the network. Params: {shown([p.name for p in self.params])}"
            )
        return self._param_index[name]

    def layer_index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise McnError(
            f"No layer of name {name!r} in the network. Layers: {shown([l.name for l in self.layers])}"
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
            self._order, cyclic = dag_sort(self.layers, len(self.vars))
            if cyclic and "the network graph contains a cycle" not in self.notes:
                self.notes.append("the network graph contains a cycle")
        return list(self._order)

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
                    f"Vars: {shown([v.name for v in self.vars])}"
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
                    var.der = add_ders(var.der, d)
                pending_var[v] += 1
            for p, d in zip(layer.param_indexes, der_params, strict=False):
                par = self.params[p]
                if (pending_param[p] == 0 and not self.accumulate_param_ders) or is_empty(par.der):
                    par.der = None if is_empty(d) else d
                elif not is_empty(d):
                    par.der = add_ders(par.der, d)
                pending_param[p] += 1

    def note_unsupported(self) -> None:
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
                f"layer type(s) {', '.join(custom)} (layers {shown(names, 6)}) not run by the reference: "
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
        """``saveobj``: vars, params, layers as lists of dicts, and meta
        (``harness.mcn.dagnn_convert.dagnet_to_struct``)."""
        from harness.mcn.dagnn_convert import dagnet_to_struct

        return dagnet_to_struct(self)

    @staticmethod
    def from_struct(s: Any, source: str = "net") -> DagNet:
        """``dagnn.DagNN.loadobj(s)`` for a converted saveobj struct, adapting what real
        files hold (``harness.mcn.dagnn_convert.dagnet_from_struct``)."""
        from harness.mcn.dagnn_convert import dagnet_from_struct

        return dagnet_from_struct(s, source=source)

    @staticmethod
    def from_simplenn(net: Net) -> DagNet:
        """``dagnn.DagNN.fromSimpleNN(net)``, the net tidied first
        (``harness.mcn.dagnn_convert.dagnet_from_simplenn``)."""
        from harness.mcn.dagnn_convert import dagnet_from_simplenn

        return dagnet_from_simplenn(net)
