"""diagnose() on a DagNN net: the simplenn layer rules of ``layer_rules`` through a view.

The view reads the DagNN net as ``layer_rules`` reads a simplenn net and its alignment
(as ``harness.training.dag_state.optimizer_view`` does for the optimizer table): one
simplenn layer per Conv, ConvTranspose, BatchNorm, Pooling, ReLU and DropOut layer, its
block's properties as the simplenn fields (``pad``, ``stride``, ``dilate``, ``upsample``,
``crop``, ``num_groups``, ``epsilon``, the moments' learning rate, ``pool``, ``method``,
``leak``, ``rate``), paired with the Keras layer of the name ``to_keras_dag`` gives it
(``dag_keras_layers``: the names ``check`` and ``compare_training`` load the params by).
Around that layer, the model's graph gives the padding (and flattening) before it and the
subsampling or cropping after it, as ``align`` finds them in a simplenn port; a model
without a graph (subclassed) gives its neighbours in ``model.layers``. A ReLU (sigmoid,
softmax) without a Keras layer of its name, computed by the ``activation=`` of the Keras
conv it follows, is paired as fused. Each layer's input size is the reference's: one
image of zeros through the net without its Loss layers, at the size ``net.meta`` or
``input_size`` give (else the model's input size, else 32 x 32).

A layer of those types without a Keras layer of its name, or with one of another kind,
is an ``alignment`` finding naming the DagNN layer (not diagnosed further). The
initialisation rule is not applied: a DagNN file holds trained params, and ``to_keras_dag``
keeps Keras' initialisers. The training set-up is diagnosed on ``optimizer_view``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from harness.diagnosis.findings import Finding
from harness.diagnosis.layer_rules import layer_findings
from harness.equivalence.align import Alignment, Pair, keras_kind
from harness.equivalence.dag_feed import loss_type
from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.dagnn_blocks import parse_opts, supported
from harness.mcn.geometry import DEFAULT_SPATIAL
from harness.mcn.net import Layer, Net
from harness.mcn.options import McnError, as_4d, is_empty
from harness.training.dag_state import optimizer_view
from harness.translate.build import TranslationError, keras_name
from harness.translate.dag_blocks import block_number
from harness.translate.dag_plan import dag_inputs, dag_plan, input_shapes

if TYPE_CHECKING:
    import keras

__all__ = ["dag_layer_findings"]

# DagNN block -> the simplenn type the rules know; the Keras kinds (``keras_kind``) its
# main layer may have; the kinds that may come before it and after it
_VIEW = {
    "dagnn.Conv": "conv",
    "dagnn.ConvTranspose": "convt",
    "dagnn.BatchNorm": "bnorm",
    "dagnn.Pooling": "pool",
    "dagnn.ReLU": "relu",
    "dagnn.DropOut": "dropout",
}
_FUSABLE = {"dagnn.ReLU": "relu", "dagnn.Sigmoid": "sigmoid", "dagnn.SoftMax": "softmax"}
_BEFORE = {"conv": ("pad", "permute", "flatten"), "pool": ("pad",)}
_AFTER = {"conv": ("subsample",), "convt": ("crop",)}


def dag_layer_findings(
    net: DagNet, model: keras.Model, *, input_size: Any = None
) -> tuple[list[Finding], Net, str | None]:
    """The layer findings of the DagNN ``net`` against ``model``, each naming its DagNN
    layer; with the net as the set-up rules read it (``optimizer_view`` and ``net.meta``)
    and the name of its first softmaxlog Loss layer (None without one)."""
    try:
        names = dict(dag_plan(net).names)
    except TranslationError:  # a block the translation refuses: the layers' own names
        names = {}
    sizes = _var_sizes(net, model, input_size)
    klayers = {l.name: l for l in model.layers}
    view = _View(sizes)
    out: list[Finding] = []
    calls: dict[str, int] = {}  # Keras layer -> DagNN layers that called it so far
    fusable: dict[str, Pair] = {}  # output var of a conv with a fused activation -> its pair
    for i in net.execution_order():
        layer = net.layers[i]
        kind = _VIEW.get(layer.type)
        if kind is None and layer.type not in _FUSABLE or not layer.inputs or layer.inputs[0] not in sizes:
            continue  # no rule, or after a block the reference does not run
        kname = names.get(layer.name, keras_name(layer.name))
        main = klayers.get(kname)
        call = calls[kname] = calls.get(kname, 0) + 1
        fused = fusable.get(layer.inputs[0])
        act = _FUSABLE.get(layer.type)
        if main is None and fused is not None and act == _activation(klayers[fused.param_layer]):
            view.add(Layer(act, layer.name, leak=_leak(layer)), layer, after=fused, fused_activation=act)
        elif main is None and kind == "dropout":  # no Dropout: the rule says so
            view.add(_view_layer(net, layer, kind), layer)
        elif kind is None:
            continue
        elif main is None or keras_kind(main) != kind:
            out.append(_unpaired(layer, kname, main))
        elif kind not in ("conv", "convt") or not is_empty(net.param(layer.params[0]).value):
            before, after = _neighbours(model, main, call - 1, kind)
            held = main.name if kind in ("conv", "convt", "bnorm") else None
            keras = [x.name for x in (*before, main, *after)]
            pair = view.add(_view_layer(net, layer, kind), layer, keras=keras, param_layer=held)
            if held and _activation(main) and layer.outputs:
                fusable[layer.outputs[0]] = pair
    out += layer_findings(Net(view.layers), model, view.shapes, alignment=Alignment(view.pairs, [], klayers))
    try:
        setup = optimizer_view(net, model)[0]
    except McnError:  # a net the translation refuses: no Keras layers hold its params by name
        setup = Net([])
    loss = next((l.name for l in net.layers if l.type == "dagnn.Loss" and _softmaxlog(l)), None)
    return out, Net(setup.layers, dict(net.meta) if isinstance(net.meta, dict) else {}), loss


class _View:
    """The simplenn layers, their input sizes and their pairs, as ``layer_findings`` reads
    a simplenn net, its ``input_shapes`` and its alignment."""

    def __init__(self, sizes: dict[str, tuple[int, int, int]]):
        self.sizes = sizes
        self.layers: list[Layer] = []
        self.shapes: list[tuple[int, int, int]] = []
        self.pairs: list[Pair] = []

    def add(self, simple: Layer, layer: DagLayer, *, after: Pair | None = None, **paired: Any) -> Pair:
        """``simple`` (the view of ``layer``) paired as ``paired`` says, its pair placed
        after ``after`` (a fused activation follows its conv) or last."""
        self.layers.append(simple)
        self.shapes.append(self.sizes[layer.inputs[0]])
        pair = Pair(len(self.layers) - 1, layer.name, simple.type, **paired)
        self.pairs.insert(len(self.pairs) if after is None else self.pairs.index(after) + 1, pair)
        return pair


def _view_layer(net: DagNet, layer: DagLayer, kind: str) -> Layer:
    """``layer`` as the simplenn layer of type ``kind`` the rules read."""
    b = layer.block
    params = [net.param(p) for p in layer.params]
    weights = [p.value for p in params]
    if kind == "conv":
        return Layer(kind, layer.name, weights[:2], pad=b["pad"], stride=b["stride"], dilate=b["dilate"])
    if kind == "convt":
        fields = {"upsample": b["upsample"], "crop": b["crop"], "num_groups": b["num_groups"]}
        return Layer(kind, layer.name, weights[:2], **fields)
    if kind == "bnorm":
        eps = block_number(b.get("epsilon"), 1e-5)
        rates = np.array([float(p.learning_rate) for p in params])
        return Layer(kind, layer.name, weights[:3], epsilon=eps, learning_rate=rates)
    if kind == "pool":
        return Layer(
            kind, layer.name, pool=b["pool_size"], stride=b["stride"], pad=b["pad"], method=b["method"]
        )
    if kind == "relu":
        return Layer(kind, layer.name, leak=_leak(layer))
    return Layer(kind, layer.name, rate=block_number(b.get("rate"), 0.5))


def _leak(layer: DagLayer) -> float:
    """A ReLU's leak: its ``opts`` ``'leak'``, else its block's (0 for other blocks)."""
    opts = parse_opts(layer.block.get("opts"), {"leak": "leak"}, "vl_nnrelu")
    return block_number(opts.get("leak", layer.block.get("leak")), 0.0)


def _softmaxlog(layer: DagLayer) -> bool:
    return loss_type(layer) == "softmaxlog"


def _activation(klayer) -> str | None:
    """The activation fused into a Keras layer (None for linear)."""
    act = getattr(getattr(klayer, "activation", None), "__name__", None)
    return None if act in (None, "linear", "identity") else act


def _unpaired(layer: DagLayer, kname: str, main) -> Finding:
    """The alignment finding of a DagNN layer without a Keras layer of its kind named ``kname``."""
    if main is None:
        got = f"no Keras layer named '{kname}'"
    else:
        got = f"Keras layer '{kname}' is a {type(main).__name__}"
    return Finding(
        "alignment",
        layer.name,
        kname if main is not None else "-",
        f"{layer.type} layer",
        got + " (not diagnosed)",
        f"a Keras layer named '{kname}' computing the {layer.type.split('.')[-1]} (the name to_keras_dag "
        "gives it: check and compare_training load the params by these names)",
    )


def _neighbours(model, main, call: int, kind: str) -> tuple[list, list]:
    """The Keras layers before ``main`` (padding, flattening) and after it (subsampling,
    cropping) that belong to its ``call``-th call: from the model's graph, else (a model
    without one) from the order of ``model.layers``."""
    nodes = getattr(main, "_inbound_nodes", None) or []
    if not nodes:
        order = list(model.layers)
        k = order.index(main)
        before = [x for x in order[max(k - 1, 0) : k] if keras_kind(x) in _BEFORE.get(kind, ())]
        after = [x for x in order[k + 1 : k + 2] if keras_kind(x) in _AFTER.get(kind, ())]
        return before, after
    node = nodes[min(call, len(nodes) - 1)]
    before = []
    parents = list(node.parent_nodes)
    while len(parents) == 1 and keras_kind(parents[0].operation) in _BEFORE.get(kind, ()):
        before.insert(0, parents[0].operation)
        parents = list(parents[0].parent_nodes)
    after = []
    while True:
        readers = [n for n in getattr(node.operation, "_outbound_nodes", []) if node in n.parent_nodes]
        if len(readers) != 1 or keras_kind(readers[0].operation) not in _AFTER.get(kind, ()):
            return before, after
        node = readers[0]
        after.append(node.operation)


def _var_sizes(net: DagNet, model, input_size: Any) -> dict[str, tuple[int, int, int]]:
    """``(H, W, C)`` of the vars the reference computes: one image of zeros through the net
    without its Loss layers (nor the blocks it does not run, nor what reads them), mode
    test, at the size of each image input (``input_size`` for a net with one, else
    ``net.meta``'s, else the model's input, else 32 x 32)."""
    data = dag_inputs(net)
    given = {data[0]: tuple(input_size)} if input_size is not None and len(data) == 1 else None
    try:
        known = input_shapes(net, dag_plan(net), input_sizes=given)
    except TranslationError:
        known = {}
    model_inputs = list(getattr(model, "inputs", None) or [])
    feed = {}
    for k, var in enumerate(data):
        hwc = list(known.get(var, (None, None, None)))
        shape = tuple(model_inputs[k].shape)[1:] if k < len(model_inputs) else ()
        for j, d in enumerate(hwc):
            if d is None and len(shape) == 3 and shape[j] is not None:
                hwc[j] = int(shape[j])
        h, w, c = hwc
        feed[var] = np.zeros((h or DEFAULT_SPATIAL, w or DEFAULT_SPATIAL, c or 1, 1))
    probe = net.without_values()
    cut, dead = [], set()  # Loss layers, blocks the reference does not run, what reads them
    for i in probe.execution_order():
        layer = probe.layers[i]
        if layer.type == "dagnn.Loss" or not supported(layer.type) or dead & set(layer.inputs):
            cut.append(layer.name)
            dead.update(layer.outputs)
    if cut:
        probe.remove_layer(cut)
    present = {v.name for v in probe.vars}
    probe.eval({k: v for k, v in feed.items() if k in present}, mode="test")
    sizes = {}
    for v in probe.vars:
        if v.value is not None and np.ndim(v.value) <= 4:
            sizes[v.name] = tuple(int(d) for d in as_4d(np.asarray(v.value), v.name).shape[:3])
    return sizes
