"""The source text of a port's standalone ``model.py`` (``port_source``), for ``write_port``.

``model.py`` imports keras, numpy and pathlib only. Its ``build_model()`` rebuilds the
translated model layer for layer, same names, and loads the weights saved beside it. Stock
Keras layers are written as calls with their configuration; each custom layer of
``harness.translate.layers`` is written as that class's own source (its registration
decorator dropped, the module's helper functions it calls copied before it), so the
standalone file runs the very code ``model.keras`` runs. The source is generated from the
translated model's functional graph (``model.get_config()``, ``layer.get_config()``), not
re-derived from the net, so it is what ``to_keras`` built.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.io.text import safe_text
from harness.mcn.net import Net

if TYPE_CHECKING:
    import keras

__all__ = ["WEIGHTS", "port_source", "py_literal"]

WEIGHTS = "weights.npz"  # the file model.py loads its weights from, beside it

_LINE = 110  # the project's line length (ruff)
_BASE_CONFIG = ("name", "trainable", "dtype")  # every layer's config: handled apart
# stock layer arguments written even at their default value (they say what the layer does)
_SHOWN = {"ZeroPadding2D": ("padding",), "Cropping2D": ("cropping",), "AveragePooling2D": ("strides",)}
# custom layers: how many leading arguments are written positionally (the rest by keyword)
_POSITIONAL = {
    "MatConvNetPooling": 2,
    "MatConvNetLRN": 0,
    "MatConvNetLeakyReLU": 1,
    "Subsample": 1,
    "AddBias": 1,
    "GroupedConv2DTranspose": 2,
}

# Why each custom layer of harness.translate.layers exists (for the notes).
_WHY = {
    "MatConvNetPooling": "MatConvNet pooling (windows clipped at the padding; max sends a tie's "
    "derivative to the first maximum in column-major order, MaxPooling2D row-major)",
    "MatConvNetLRN": "vl_nnnormalize's cross-channel LRN (no stock Keras layer)",
    "MatConvNetLeakyReLU": "leaky ReLU with the leak held in the data's precision "
    "(Keras' LeakyReLU rounds it to float32)",
    "Subsample": "the stride of a dilated conv (TensorFlow refuses strides with dilation: a "
    "stride-1 dilated Conv2D, then every stride-th pixel)",
    "AddBias": "a conv with empty filters (the input plus a bias)",
    "GroupedConv2DTranspose": "a convt with filter groups (Conv2DTranspose has no groups)",
}


# ------------------------------------------------------------------------ model.py


def port_source(model: keras.Model, net: Net | None = None) -> tuple[str, list[str], list[str]]:
    """``(source, classes, notes)``: model.py for the translated ``model`` (a single chain
    of layers, as ``to_keras`` builds), the custom classes it defines, and notes. With the
    (tidied) ``net``, each group of Keras layers is headed by a comment naming the
    MatConvNet layer it computes, and MatConvNet layers without Keras layers are noted."""
    chain, inputs, model_name = _chain(model)
    headers, notes = _headers(chain, net)
    sources: dict[str, str] = {}  # custom class: its source (model.py defines it)
    users: dict[str, tuple[str, list[str]]] = {}  # custom class: its module, the Keras layers that are one
    helpers: dict[str, str] = {}  # module-level functions the copied classes call
    shape, input_name = py_literal(inputs["shape"]), py_literal(inputs["name"])
    body = [f"    inputs = keras.Input(shape={shape}, dtype=dtype, name={input_name})"]
    var = "inputs"
    for layer in chain:
        cls = type(layer)
        if layer.name in headers:
            body.append(f"    # {headers[layer.name]}")
        if _is_stock(cls):
            callee, args = f"L.{cls.__name__}", _stock_arguments(layer)
        else:
            name = cls.__name__
            if name not in sources:
                sources[name] = _copied_source(cls, helpers)
                users[name] = (cls.__module__, [])
            users[name][1].append(layer.name)
            callee, args = name, _custom_arguments(layer)
        args += [f"name={py_literal(layer.name)}", "dtype=dtype"]
        if not layer.trainable:
            args.append("trainable=False")
        body.extend(_call_lines(callee, args, var))
        var = "x"
    body.append(f"    model = keras.Model(inputs, {var}, name={py_literal(model_name)})")
    for name, (module, layer_names) in users.items():
        why = _WHY.get(name, "no stock Keras layer computes it")
        notes.append(
            f"custom layer {name} in model.py (keras.ops, source copied from {module}), "
            f"for {', '.join(repr(n) for n in layer_names)}: {why}"
        )
    classes = list(sources)
    uses_ops = any("ops." in text for text in sources.values())
    text = _module_source(model, net, body, classes, [*helpers.values(), *sources.values()], uses_ops)
    return text, classes, notes


# ------------------------------------------------------------------------ the graph


def _chain(model) -> tuple[list, dict, str]:
    """The model's layers after the input, in graph order, checked to form one chain;
    the input layer's config; the model's name."""
    config = model.get_config()
    entries = config["layers"]
    if not entries or entries[0]["class_name"] != "InputLayer":
        raise ValueError("Expected a functional model whose first layer is its input")
    first = entries[0]["config"]
    previous = entries[0]["name"]
    chain = []
    for entry in entries[1:]:
        nodes = entry.get("inbound_nodes") or []
        sources = [
            arg["config"]["keras_history"][0]
            for node in nodes
            for arg in node.get("args", [])
            if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__"
        ]
        # the symbolic call records 'training' (Dropout) and 'mask=None' (BatchNormalization):
        # the model's own call decides them
        recorded = (nodes[0].get("kwargs") or {}) if nodes else {}
        kwargs = {k for k, v in recorded.items() if k != "training" and not (k == "mask" and v is None)}
        if len(nodes) != 1 or sources != [previous] or kwargs:
            raise ValueError(
                f"Expected a single chain of layers (as to_keras builds). Layer {entry['name']!r} "
                f"takes {sources or 'no tensor'} after {previous!r}"
            )
        chain.append(model.get_layer(entry["name"]))
        previous = entry["name"]
    outputs = config["output_layers"]
    if outputs and isinstance(outputs[0], str):  # one output: a single [name, node, index]
        outputs = [outputs]
    if [o[0] for o in outputs] != [previous]:
        raise ValueError(f"Expected the model's output to be its last layer {previous!r}")
    shape = tuple(first["batch_shape"][1:])
    return chain, {"shape": shape, "name": first["name"]}, config["name"]


def _headers(chain: list, net: Net | None) -> tuple[dict[str, str], list[str]]:
    """{first Keras layer of each MatConvNet layer: a comment naming that layer}, and notes
    on the MatConvNet layers without a Keras layer. ``to_keras`` names a layer's Keras
    layers after it (``keras_name``, made unique with '_'; helpers ``_pad``, ``_subsample``,
    ``_crop``): the chain is read against the net's layers in order."""
    if net is None:
        return {}, []
    from harness.translate.build import keras_name

    headers: dict[str, str] = {}
    notes: list[str] = []
    used: set[str] = set()
    k = 0
    for i, layer in enumerate(net.layers):
        label = f"'{_comment_text(layer.name)}' ({_comment_text(layer.type)})"
        if layer.type in ("softmaxloss", "loss") and i == len(net.layers) - 1:
            notes.append(
                f"MatConvNet layer {label} has no Keras layer: the model outputs the scores that "
                "enter it; train with harness.translate.keras_loss(net)"
            )
            break
        base = keras_name(layer.name)
        while base in used:
            base += "_"
        used.add(base)
        own = {base, f"{base}_pad", f"{base}_subsample", f"{base}_crop"}
        first = k
        while k < len(chain) and chain[k].name in own:
            k += 1
        if k > first:
            headers[chain[first].name] = f"MatConvNet layer {i + 1}: {label}{_detail(layer)}"
        else:
            notes.append(f"MatConvNet layer {label} has no Keras layer (an identity here)")
    return headers, notes


def _detail(layer) -> str:
    """A few words on a MatConvNet layer's shape for the comment above its Keras layers."""
    try:
        if layer.type in ("conv", "convt") and layer.weights and np.size(layer.weights[0]):
            f = np.shape(layer.weights[0])
            f = tuple(f) + (1,) * (4 - len(f))
            return f", filters {' x '.join(str(d) for d in f)}"
        if layer.type == "pool":
            size = np.ravel(layer.get("pool", []))
            return f", {_comment_text(layer.get('method', 'max'))} {'x'.join(str(int(s)) for s in size)}"
    except (TypeError, ValueError):
        pass
    return ""


def _comment_text(text: Any, limit: int = 60) -> str:
    """Untrusted text made safe for one comment line (printable, short)."""
    text = safe_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _doc_text(text: Any) -> str:
    """Untrusted text made safe for a docstring: no backslash, no double quote."""
    return _comment_text(text).replace("\\", "?").replace('"', "?")


# ------------------------------------------------------------------------ layer calls


def _is_stock(cls) -> bool:
    import keras

    return getattr(keras.layers, cls.__name__, None) is cls


def _required(cls) -> list[str]:
    """The constructor's parameters without a default, in order."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [
        p.name
        for p in params
        if p.name != "self"
        and p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _stock_arguments(layer) -> list[str]:
    """A stock layer's constructor arguments: the required ones positionally, then those
    of its config that differ from a freshly made layer's (name, dtype and trainable apart),
    and the few that say what the layer does even at their default (``_SHOWN``)."""
    cls = type(layer)
    config = layer.get_config()
    required = _required(cls)
    default = cls(**{p: config[p] for p in required}).get_config()
    args = [py_literal(config[p]) for p in required]
    shown = _SHOWN.get(cls.__name__, ())
    for key, value in config.items():
        if key in _BASE_CONFIG or key in required:
            continue
        if key in shown or key not in default or not _same(value, default[key]):
            args.append(f"{key}={py_literal(value)}")
    return args


def _custom_arguments(layer) -> list[str]:
    """A custom layer's constructor arguments (its config beyond the base layer's): the
    first ``_POSITIONAL`` required ones positionally, the others by keyword (those with a
    default only when they differ from it)."""
    cls = type(layer)
    config = layer.get_config()
    params = inspect.signature(cls.__init__).parameters
    required = _required(cls)
    positional = required[: _POSITIONAL.get(cls.__name__, len(required))]
    args = [py_literal(config[p]) for p in positional]
    for key, value in config.items():
        if key in _BASE_CONFIG or key in positional:
            continue
        p = params.get(key)
        if p is None or p.default is inspect.Parameter.empty or not _same(value, p.default):
            args.append(f"{key}={py_literal(value)}")
    return args


def _same(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _call_lines(callee: str, args: list[str], var: str) -> list[str]:
    """``x = callee(args)(var)`` on one line, or wrapped as ruff format would."""
    one = f"    x = {callee}({', '.join(args)})({var})"
    if len(one) <= _LINE:
        return [one]
    inner = f"        {', '.join(args)}"
    if len(inner) <= _LINE:
        return [f"    x = {callee}(", inner, f"    )({var})"]
    return [f"    x = {callee}(", *(f"        {a}," for a in args), f"    )({var})"]


def py_literal(value: Any) -> str:
    """A Python literal for a config value (numbers exact, strings double-quoted)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else '-float("inf")'
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        items = [py_literal(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return f"[{', '.join(py_literal(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(k)}: {py_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"Cannot write a {type(value).__name__} config value into model.py: {value!r}")


def _copied_source(cls, helpers: dict[str, str]) -> str:
    """The source of a custom layer class without its registration decorator (the classes
    of harness.translate.layers use keras and keras.ops only); the module-level functions
    of its module that it calls go into ``helpers`` (name: source)."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    source = "\n".join(l for l in lines if not l.startswith("@keras.saving.register_keras_serializable"))
    module = sys.modules[cls.__module__]
    for name, obj in vars(module).items():
        own = inspect.isfunction(obj) and obj.__module__ == module.__name__
        if own and re.search(rf"\b{name}\(", source):
            helpers.setdefault(name, textwrap.dedent(inspect.getsource(obj)).strip("\n"))
    return source


# ------------------------------------------------------------------------ the files


def _module_source(model, net, body, classes, extra_sources: list[str], uses_ops) -> str:
    """model.py's text: its docstring, imports, the ``extra_sources`` (helpers and custom
    classes), ``build_model()`` around ``body``, ``load_weights()`` and CUSTOM_OBJECTS."""
    dtype = str(model.inputs[0].dtype)
    shape = " x ".join(str(d) for d in model.input_shape[1:])
    out_shape = " x ".join(str(d) for d in model.output_shape[1:])
    ends = "its last layer's output"
    if net is not None and net.layers and net.layers[-1].type in ("softmaxloss", "loss"):
        last = net.layers[-1]
        ends = (
            f"the scores entering the net's loss layer '{_doc_text(last.name)}' ({last.type}), "
            "whose Keras counterpart is harness.translate.keras_loss(net)"
        )
    paragraphs = [
        "Keras port of a MatConvNet simplenn net (generated by mcn-harness from to_keras).",
        "``build_model()`` rebuilds the translation layer for layer (Keras layer names are the "
        f"MatConvNet layer names) and loads the weights saved beside this file ({WEIGHTS}). "
        f"It maps N x {shape} images (N x H x W x C) to N x {out_shape}: {ends}.",
    ]
    if classes:
        paragraphs.append(
            f"Custom layers (no stock Keras layer computes them exactly): {', '.join(classes)}. "
            "To load a saved copy: keras.saving.load_model(path, custom_objects=CUSTOM_OBJECTS)."
        )
    doc = '"""' + "\n\n".join(textwrap.fill(p, 88) for p in paragraphs) + '\n"""'
    imports = ["from pathlib import Path", "", "import keras", "import numpy as np"]
    imports.append("from keras import layers as L")
    if uses_ops:
        imports.append("from keras import ops")
    parts = [doc, "\n".join(imports), f'WEIGHTS = Path(__file__).resolve().with_name("{WEIGHTS}")']
    parts += extra_sources
    build = [
        f'def build_model(dtype: str = "{dtype}", weights: str | Path | None = WEIGHTS) -> keras.Model:',
        '    """The port, with the weights of ``weights`` (a .npz of each layer\'s get_weights()',
        '    keyed "<layer name>/<index>"; None keeps Keras\' initial values)."""',
        *body,
        "    if weights is not None:",
        "        load_weights(model, weights)",
        "    return model",
    ]
    parts.append("\n".join(build))
    parts.append(_LOAD_WEIGHTS.strip("\n"))
    if classes:
        entries = [f"{py_literal(c)}: {c}" for c in classes]
        line = f"CUSTOM_OBJECTS = {{{', '.join(entries)}}}"
        if len(line) > _LINE:
            line = "CUSTOM_OBJECTS = {\n" + "".join(f"    {e},\n" for e in entries) + "}"
        parts.append(line)
    head, imports_block, *rest = parts
    return f"{head}\n\n{imports_block}\n\n{rest[0]}\n\n\n" + "\n\n\n".join(rest[1:]) + "\n"


_LOAD_WEIGHTS = '''
def load_weights(model: keras.Model, path: str | Path = WEIGHTS) -> None:
    """Set every layer's variables from ``path`` (keys "<layer name>/<index>")."""
    with np.load(path) as saved:
        for layer in model.layers:
            if layer.weights:
                layer.set_weights([saved[f"{layer.name}/{i}"] for i in range(len(layer.weights))])
'''
