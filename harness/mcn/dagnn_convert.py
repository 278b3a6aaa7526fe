"""A ``DagNet`` to and from other forms: ``saveobj``/``loadobj`` structs and ``fromSimpleNN``.

``dagnet_to_struct`` is ``DagNN.saveobj`` (what harness.mcn.matfile writes as struct
arrays), ``dagnet_from_struct`` ``DagNN.loadobj`` for a struct converted by matfile's rules,
adapting what real files hold, and ``dagnet_from_simplenn`` ``DagNN.fromSimpleNN``.
``DagNet.to_struct``, ``DagNet.from_struct`` and ``DagNet.from_simplenn`` call them.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from harness.mcn.dagnn import DagNet
from harness.mcn.dagnn_graph import DagLayer, names_list, shown
from harness.mcn.dagnn_props import BLOCKS, VECTOR_PROPS, number
from harness.mcn.mat_net import as_double
from harness.mcn.net import Layer, Net, matlab_field
from harness.mcn.options import McnError, is_empty
from harness.mcn.simplenn import vl_simplenn_tidy

__all__ = ["dagnet_from_simplenn", "dagnet_from_struct", "dagnet_to_struct"]


def dagnet_to_struct(net: DagNet) -> dict[str, Any]:
    """``saveobj``: ``vars`` (name, precious), ``params`` (name, value, learningRate,
    weightDecay), ``layers`` (name, type, inputs, outputs, params, block) as lists of
    dicts (the caller writes them as struct arrays), and ``meta``."""
    return {
        "vars": [{"name": v.name, "precious": bool(v.precious)} for v in net.vars],
        "params": [
            {
                "name": p.name,
                "value": np.zeros((0, 0)) if p.value is None else p.value,
                "learningRate": float(p.learning_rate),
                "weightDecay": float(p.weight_decay),
            }
            for p in net.params
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
            for l in net.layers
        ],
        "meta": net.meta,
    }


def dagnet_from_struct(s: Any, *, source: str = "net") -> DagNet:
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
            names_list(raw.get("inputs"), f"{where}.inputs"),
            names_list(raw.get("outputs"), f"{where}.outputs"),
            names_list(raw.get("params"), f"{where}.params"),
            block,
            skip_rebuild=True,
        )
    net.rebuild()
    _load_params(net, s.get("params", []), source)
    _load_vars(net, s.get("vars", []), source)
    meta = s.get("meta", {})
    net.meta = as_double(meta, keep_logical=True) if isinstance(meta, dict) else {}
    extra = [k for k in s if k not in ("vars", "params", "layers", "meta")]
    if extra:
        net.notes.append(f"{source}: fields {', '.join(extra)} are not part of a DagNN; ignored")
    net.note_unsupported()
    return net


def dagnet_from_simplenn(net: Net) -> DagNet:
    """``dagnn.DagNN.fromSimpleNN(net)``: the net is tidied (vl_simplenn_tidy) first;
    vars ``x0`` (input) ... ``xL`` plus ``label`` for a softmaxloss; params
    ``<layer>f``/``<layer>b`` (conv, convt; no ``b`` and ``has_bias`` False without
    biases), bnorm ``<layer>m``/``<layer>b``/``<layer>x`` (gains, biases, moments: the
    moments param has learning rate 0.1 unless the layer gives a third one, weight
    decay 0, train method average); a bnorm's epsilon is not copied (the block keeps
    1e-5). A 'loss' or custom layer raises McnError, as in MatConvNet."""
    tidy = vl_simplenn_tidy(net)
    dag = DagNet(meta=copy.deepcopy(tidy.meta))
    for l, layer in enumerate(tidy.layers, start=1):
        _add_simplenn_layer(dag, layer, l)
    inputs_meta = dag.meta.get("inputs")
    if isinstance(inputs_meta, dict):
        inputs_meta["name"] = dag.layers[0].inputs[0]
    elif isinstance(inputs_meta, list) and inputs_meta and isinstance(inputs_meta[0], dict):
        inputs_meta[0]["name"] = dag.layers[0].inputs[0]
    return dag


def _add_simplenn_layer(dag: DagNet, layer: Layer, l: int) -> None:
    """fromSimpleNN's conversion of simplenn layer ``l`` (1-based), added to ``dag``."""
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
            dag.notes.append(f"layer {l} '{name}' (pool): no field 'method' (fromSimpleNN needs one); 'max'")
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
        while label in {v.name for v in dag.vars}:
            k += 1
            label = f"label{k}"
        ins.append(label)
    elif t == "bnorm":
        btype, block = "dagnn.BatchNorm", {}
        params = [(f"{name}{s}", w) for s, w in zip("mbx", layer.weights[:3], strict=True)]
        if lr.size and lr.size < 3:
            dag.notes.append(
                f"layer {l} '{name}' (bnorm): learningRate has {lr.size} entries (fromSimpleNN reads 3); "
                "the moments keep 0.1"
            )
        wd = np.concatenate([wd[:2], [0.0]]) if wd.size else wd
    else:
        raise McnError(f"layer {l} '{name}': {t} is unsupported (dagnn.DagNN.fromSimpleNN)")
    dag.add_layer(name, btype, ins, outs, [p for p, _ in params], block)
    for j, (pname, value) in enumerate(params):
        p = dag.param(pname)
        if not is_empty(value):
            p.value = np.asarray(value)
        if j < lr.size:
            p.learning_rate = float(lr[j])
        if j < wd.size:
            p.weight_decay = float(wd[j])


def _block_name(layer: DagLayer, key: str) -> str:
    """The MATLAB name of a block property: camelCase for the block's own properties,
    else the name it was given (a custom block's ``loss_type`` stays ``loss_type``)."""
    if key in BLOCKS.get(layer.type, {}):
        return matlab_field(key)
    return layer.matlab_names.get(key, key)


def _saved(key: str, value: Any) -> Any:
    """A block property as saveobj writes it: vectors as 1 x N rows, ``[]`` for None."""
    if value is None:
        return np.zeros((0, 0))
    if key in VECTOR_PROPS and isinstance(value, np.ndarray):
        return value.reshape(1, -1)
    return value


def _load_params(net: DagNet, saved: Any, source: str) -> None:
    """loadobj's params: the saved value and multipliers of each param a layer uses, by name."""
    items = [saved] if isinstance(saved, dict) else saved if isinstance(saved, list) else []
    known = {p.name for p in net.params}
    unknown = []
    for i, p in enumerate(items):
        where = f"{source}.params({i + 1})"
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise McnError(f"{where}: Expected a struct with a 'name'.")
        if p["name"] not in known:
            unknown.append(p["name"])
            continue
        mine = net.param(p["name"])
        if "value" in p:
            mine.value = p["value"]
        for key, attr in (("learningRate", "learning_rate"), ("weightDecay", "weight_decay")):
            if key in p:
                value = number(p[key], f"{where}.{key}")
                if value is not None:
                    setattr(mine, attr, value)
        if isinstance(p.get("trainMethod"), str):
            mine.train_method = p["trainMethod"]
    if unknown:
        net.notes.append(f"{source}.params: {shown(unknown, 6)} used by no layer; ignored")
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
    """A loaded param value as an array: integers float64, a number a (1, 1) array, [] None."""
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
    """loadobj's vars: the saved ``precious`` flag of each var a layer uses, by name."""
    items = [saved] if isinstance(saved, dict) else saved if isinstance(saved, list) else []
    known = {v.name for v in net.vars}
    unknown = []
    for i, v in enumerate(items):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise McnError(f"{source}.vars({i + 1}): Expected a struct with a 'name'.")
        if v["name"] not in known:
            unknown.append(v["name"])
            continue
        if "precious" in v:
            flag = v["precious"]
            net.var(v["name"]).precious = bool(np.asarray(flag).any()) if np.size(flag) else False
    if unknown:
        net.notes.append(f"{source}.vars: {shown(unknown, 6)} used by no layer; ignored")
