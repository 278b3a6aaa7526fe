"""Write a MatConvNet net's Keras port to a folder: ``write_port``.

The folder gets

- ``model.keras``: the faithful translation (``to_keras``) with its weights; it loads
  wherever ``harness.translate.layers`` is imported (``load_model`` here does both);
- ``weights.npz``: every layer's ``get_weights()`` keyed ``"<layer name>/<index>"``;
- ``model.py``: readable, standalone Keras source (imports keras, numpy and pathlib only)
  whose ``build_model()`` rebuilds the translation layer for layer, same names, and
  loads ``weights.npz``. Stock Keras layers where the translation uses them; each custom
  layer of ``harness.translate.layers`` it uses becomes a short ``keras.ops`` class of the
  same name (the names are how the harness' alignment recognises them). The source is
  generated from the translated model's functional graph (``model.get_config()``,
  ``layer.get_config()``), not re-derived from the net, so it is what ``to_keras`` built;
- ``test_port.py``: a pytest regression test through the harness' pytest plugin
  (``harness_equivalence``) checking ``model.py`` and ``model.keras``, with their own
  weights, against the net's .mat file (``net.mat`` written beside them, or ``mcn_path``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.io.text import safe_text
from harness.mcn.net import Net
from harness.translate.build import to_keras

if TYPE_CHECKING:
    import keras

__all__ = ["PortResult", "load_model", "port_source", "port_weights", "write_dag_port", "write_port"]

MODEL_KERAS = "model.keras"
MODEL_PY = "model.py"
WEIGHTS = "weights.npz"
TEST_PY = "test_port.py"
NET_MAT = "net.mat"

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


@dataclass
class PortResult:
    """What ``write_port`` wrote: the folder, each file, the .mat file the test reads,
    the custom layer classes written into model.py, and notes (MatConvNet layers without
    a Keras layer of their own, layers that need a custom class, ...)."""

    out_dir: Path
    model_keras: Path
    model_py: Path | None  # None for a DagNN network (write_dag_port)
    weights: Path | None
    test: Path
    net_path: Path  # the net the test compares with: out_dir/net.mat, or mcn_path
    written: list[Path] = field(default_factory=list)  # every file written, in order
    custom_layers: list[str] = field(default_factory=list)  # classes defined in model.py
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ custom layers

# Why each custom layer of harness.translate.layers exists (for the notes), and the
# standalone class written into model.py for it: same name, same constructor arguments
# and variables, the same computation in keras.ops.
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

_CLASSES = {
    "MatConvNetPooling": '''
class MatConvNetPooling(keras.layers.Layer):
    """vl_nnpool. Padding is not a value: max never picks it, avg divides by the real
    cells. Max sends a tie's derivative to the first maximum in column-major order."""

    def __init__(self, pool_size, strides, padding, method="max", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = tuple(pool_size)
        self.strides = tuple(strides)
        self.padding = tuple(tuple(side) for side in padding)
        self.method = method

    def call(self, x):
        (top, bottom), (left, right) = self.padding
        pads = [[0, 0], [top, bottom], [left, right], [0, 0]]
        if self.method == "max":
            # pooled with H and W swapped: TensorFlow's row-major tie rule becomes column-major
            xt = ops.transpose(ops.pad(x, pads, constant_values=float("-inf")), (0, 2, 1, 3))
            y = ops.max_pool(xt, self.pool_size[::-1], self.strides[::-1], padding="valid")
            return ops.transpose(y, (0, 2, 1, 3))
        area = float(self.pool_size[0] * self.pool_size[1])
        total = ops.average_pool(ops.pad(x, pads), self.pool_size, self.strides, padding="valid")
        ones = ops.pad(ops.ones_like(x[..., :1]), pads)
        cells = ops.average_pool(ones, self.pool_size, self.strides, padding="valid")
        return (total * area) / (cells * area)

    def get_config(self):
        names = ("pool_size", "strides", "padding", "method")
        return {**super().get_config(), **{n: getattr(self, n) for n in names}}
''',
    "MatConvNetLRN": '''
class MatConvNetLRN(keras.layers.Layer):
    """vl_nnnormalize: x / (kappa + alpha * sum of x^2 over depth channels)^beta, the window
    of channel k being [k - floor((depth-1)/2), k + ceil((depth-1)/2)]."""

    def __init__(self, depth, kappa, alpha, beta, **kwargs):
        super().__init__(**kwargs)
        self.depth, self.kappa, self.alpha, self.beta = depth, kappa, alpha, beta

    def call(self, x):
        lo = (self.depth - 1) // 2
        sq = ops.pad(ops.square(x), [[0, 0], [0, 0], [0, 0], [lo, self.depth - 1 - lo]])
        channels = x.shape[-1]
        window = sum(sq[..., k : k + channels] for k in range(self.depth))
        return x / ops.power(self.kappa + self.alpha * window, self.beta)

    def get_config(self):
        names = ("depth", "kappa", "alpha", "beta")
        return {**super().get_config(), **{n: getattr(self, n) for n in names}}
''',
    "MatConvNetLeakyReLU": '''
class MatConvNetLeakyReLU(keras.layers.Layer):
    """vl_nnrelu with a leak: x * (leak + (1 - leak) * (x > 0)), the leak in the data's precision."""

    def __init__(self, leak, **kwargs):
        super().__init__(**kwargs)
        self.leak = leak

    def call(self, x):
        leak = ops.convert_to_tensor(self.leak, dtype=self.compute_dtype)
        return x * (leak + (1 - leak) * ops.cast(x > 0, x.dtype))

    def get_config(self):
        return {**super().get_config(), "leak": self.leak}
''',
    "Subsample": '''
class Subsample(keras.layers.Layer):
    """Every strides-th row and column, from the first (the stride of a dilated conv)."""

    def __init__(self, strides, **kwargs):
        super().__init__(**kwargs)
        self.strides = tuple(strides)

    def call(self, x):
        return x[:, :: self.strides[0], :: self.strides[1], :]

    def get_config(self):
        return {**super().get_config(), "strides": self.strides}
''',
    "AddBias": '''
class AddBias(keras.layers.Layer):
    """vl_nnconv with empty filters: the input plus a bias per channel."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x):
        return x + self.bias

    def get_config(self):
        return {**super().get_config(), "units": self.units}
''',
    "GroupedConv2DTranspose": '''
class GroupedConv2DTranspose(keras.layers.Layer):
    """vl_nnconvt with filter groups: group g maps input channels g*D/G:(g+1)*D/G to outputs
    g*K:(g+1)*K. Kernel (FH, FW, K, D), MatConvNet's layout; no padding (crop afterwards)."""

    def __init__(self, filters, kernel_size, strides, groups, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = tuple(kernel_size)
        self.strides = tuple(strides)
        self.groups = groups
        self.use_bias = use_bias

    def build(self, input_shape):
        depth = int(input_shape[-1])
        self.kernel = self.add_weight(shape=(*self.kernel_size, self.filters, depth), name="kernel")
        if self.use_bias:
            self.bias = self.add_weight(shape=(self.filters * self.groups,), initializer="zeros", name="bias")

    def call(self, x):
        d = x.shape[-1] // self.groups
        outs = []
        for g in range(self.groups):
            xg, kg = x[..., g * d : (g + 1) * d], self.kernel[..., g * d : (g + 1) * d]
            outs.append(ops.conv_transpose(xg, kg, self.strides))
        y = ops.concatenate(outs, axis=-1)
        return y + self.bias if self.use_bias else y

    def get_config(self):
        names = ("filters", "kernel_size", "strides", "groups", "use_bias")
        return {**super().get_config(), **{n: getattr(self, n) for n in names}}
''',
}


# ------------------------------------------------------------------------ the API


def write_port(
    net: Net | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    input_size=None,
    mcn_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> PortResult:
    """Write the Keras port of ``net`` into ``out_dir`` (created if missing): model.keras,
    weights.npz, model.py, test_port.py, and net.mat unless ``mcn_path`` names the net's
    .mat file (``net`` may also be that path). ``input_size`` (H, W, C) overrides
    ``net.meta['inputSize']``, as in ``to_keras``. Existing files are never replaced
    unless ``overwrite``: ``FileExistsError`` names them, before anything is written.
    A net ``to_keras`` cannot translate raises its ``TranslationError``."""
    from harness.mcn.matfile import load_net, require_simplenn, save_net
    from harness.mcn.simplenn import vl_simplenn_tidy

    if not isinstance(net, Net):
        if hasattr(net, "layers"):  # a DagNet: one clear line
            require_simplenn(net, "write_port")
        mcn_path = net if mcn_path is None else mcn_path
        net = require_simplenn(load_net(net), "write_port")
    if mcn_path is not None:
        mcn_path = Path(mcn_path).resolve()
        if not mcn_path.is_file():
            raise FileNotFoundError(f"mcn_path {str(mcn_path)!r}: no such file")
    out = Path(out_dir)
    names = [MODEL_KERAS, WEIGHTS, MODEL_PY, TEST_PY] + ([] if mcn_path else [NET_MAT])
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {str(out)!r} exists and is not a directory")
    taken = [n for n in names if (out / n).exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds {', '.join(taken)}: pass overwrite=True to replace them"
        )

    model = to_keras(net, "float64", input_size=input_size)  # TranslationError propagates
    tidy = vl_simplenn_tidy(net)
    source, classes, notes = port_source(model, tidy)
    notes += _alignment_notes(model, tidy)
    hwc = tuple(int(d) for d in model.input_shape[1:])
    has_loss = bool(tidy.layers) and tidy.layers[-1].type in ("softmaxloss", "loss")
    if not has_loss:
        notes.append(
            "the net has no loss layer: test_port.py compares it through the sum of its outputs "
            "(the derivatives of that sum on both sides)"
        )
    net_file = mcn_path if mcn_path is not None else out / NET_MAT
    test = _test_source(hwc, int(model.output_shape[-1]), has_loss, mcn_path)

    out.mkdir(parents=True, exist_ok=True)
    result = PortResult(
        out_dir=out,
        model_keras=out / MODEL_KERAS,
        model_py=out / MODEL_PY,
        weights=out / WEIGHTS,
        test=out / TEST_PY,
        net_path=net_file,
        custom_layers=classes,
        notes=notes,
    )
    if mcn_path is None:  # first: a net MATLAB cannot hold fails before the rest is written
        save_net(result.net_path, net)
        result.written.append(result.net_path)
    model.save(result.model_keras)
    result.written.append(result.model_keras)
    weights = port_weights(model)
    with open(result.weights, "wb") as fh:  # np.savez on a path would append '.npz' to odd names
        np.savez(fh, **weights)
    result.written.append(result.weights)
    result.model_py.write_text(source, encoding="utf-8")
    result.written.append(result.model_py)
    result.test.write_text(test, encoding="utf-8")
    result.written.append(result.test)
    return result


def _alignment_notes(model, net: Net) -> list[str]:
    """The harness' own alignment of the translation with the net: a problem here means
    ``harness.check`` (and so test_port.py) cannot pair the two."""
    from harness.equivalence.align import align

    problems = align(net, model).problems
    if not problems:
        return []
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return [
        "harness.check cannot align the translation with the net, so test_port.py fails until "
        f"harness.equivalence.align pairs them: {safe_text(problems[0])}{more}"
    ]


def load_model(path: str | os.PathLike) -> keras.Model:
    """A saved ``model.keras`` (or any model saved from ``to_keras``), with the harness'
    custom layers registered first (Keras' safe mode, not compiled)."""
    import keras

    from harness.translate import layers  # noqa: F401  (registers the custom layers)

    return keras.saving.load_model(path, compile=False, safe_mode=True)


def port_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """``{"<layer name>/<index>": layer.get_weights()[index]}`` for every layer of ``model``."""
    return {
        f"{layer.name}/{i}": np.asarray(value)
        for layer in model.layers
        for i, value in enumerate(layer.get_weights())
    }


def port_source(model: keras.Model, net: Net | None = None) -> tuple[str, list[str], list[str]]:
    """``(source, classes, notes)``: model.py for the translated ``model`` (a single chain
    of layers, as ``to_keras`` builds), the custom classes it defines, and notes. With the
    (tidied) ``net``, each group of Keras layers is headed by a comment naming the
    MatConvNet layer it computes, and MatConvNet layers without Keras layers are noted."""
    chain, inputs, model_name = _chain(model)
    headers, notes = _headers(chain, net)
    classes: list[str] = []
    extra_sources: dict[str, str] = {}
    users: dict[str, list[str]] = {}  # custom class: the Keras layers that are one
    helpers: dict[str, str] = {}  # module-level functions copied classes call
    shape, input_name = _py(inputs["shape"]), _py(inputs["name"])
    body = [f"    inputs = keras.Input(shape={shape}, dtype=dtype, name={input_name})"]
    var = "inputs"
    uses_ops = False
    for layer in chain:
        cls = type(layer)
        if layer.name in headers:
            body.append(f"    # {headers[layer.name]}")
        if _is_stock(cls):
            callee, args = f"L.{cls.__name__}", _stock_arguments(layer)
        else:
            name = cls.__name__
            if name not in classes:
                classes.append(name)
                if name in _CLASSES:
                    extra_sources[name] = _CLASSES[name].strip("\n")
                else:  # a custom layer this module does not know yet: its own source
                    extra_sources[name] = _copied_source(cls, helpers)
                    notes.append(f"{name}: source copied from {cls.__module__} (no standalone version here)")
                uses_ops = uses_ops or "ops." in extra_sources[name]
            users.setdefault(name, []).append(layer.name)
            callee, args = name, _custom_arguments(layer)
        args += [f"name={_py(layer.name)}", "dtype=dtype"]
        if not layer.trainable:
            args.append("trainable=False")
        body.extend(_call_lines(callee, args, var))
        var = "x"
    body.append(f"    model = keras.Model(inputs, {var}, name={_py(model_name)})")
    for name, layer_names in users.items():
        notes.append(
            f"custom layer {name} in model.py (keras.ops), for {', '.join(repr(n) for n in layer_names)}: "
            f"{_WHY.get(name, 'no stock Keras layer computes it')}"
        )
    sources = [*helpers.values(), *(extra_sources[name] for name in classes)]
    return _module_source(model, net, body, classes, sources, uses_ops), classes, notes


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
    args = [_py(config[p]) for p in required]
    shown = _SHOWN.get(cls.__name__, ())
    for key, value in config.items():
        if key in _BASE_CONFIG or key in required:
            continue
        if key in shown or key not in default or not _same(value, default[key]):
            args.append(f"{key}={_py(value)}")
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
    args = [_py(config[p]) for p in positional]
    for key, value in config.items():
        if key in _BASE_CONFIG or key in positional:
            continue
        p = params.get(key)
        if p is None or p.default is inspect.Parameter.empty or not _same(value, p.default):
            args.append(f"{key}={_py(value)}")
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


def _py(value: Any) -> str:
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
        items = [_py(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return f"[{', '.join(_py(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"Cannot write a {type(value).__name__} config value into model.py: {value!r}")


def _copied_source(cls, helpers: dict[str, str]) -> str:
    """The source of a custom layer class without its registration decorator (a class
    added to harness.translate.layers after this module: it uses keras and ops only);
    the module's functions it calls go into ``helpers``."""
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
        entries = [f"{_py(c)}: {c}" for c in classes]
        line = f"CUSTOM_OBJECTS = {{{', '.join(entries)}}}"
        if len(line) > _LINE:
            line = "CUSTOM_OBJECTS = {\n" + "".join(f"    {e},\n" for e in entries) + "}"
        parts.append(line)
    head, imports_block, *rest = parts
    return f"{head}\n\n{imports_block}\n\n{rest[0]}\n\n\n" + "\n\n\n".join(rest[1:]) + "\n"


_TEST_HEAD = '''"""Regression test of the Keras port beside this file (generated by mcn-harness).

    python -m pytest test_port.py{options}

{what}
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import harness
{imports}
HERE = Path(__file__).resolve().parent
{net_line}
INPUT_SIZE = {input_size}  # H, W, C of the port's input


@pytest.fixture(scope="module")
def net():
    net = harness.load_net(NET)
    net.meta.setdefault("inputSize", list(INPUT_SIZE))  # the port's, if the net names none
    return net


def _port_module():
    spec = importlib.util.spec_from_file_location("mcn_harness_port_model", HERE / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved_model():
    from harness.translate.port import load_model

    return load_model(HERE / "model.keras")
'''

_TEST_CHECK = '''

@pytest.fixture
def batch(request):
    """x (H x W x C x N, MatConvNet's layout) and 1-based labels (1 x N; None for a net
    without a loss layer, compared through the sum of its outputs)."""
    n = request.config.getoption("harness_batch")
    rng = np.random.RandomState(0)
    x = rng.randn(*INPUT_SIZE, n)
    {labels}
    return x, labels


def test_model_py_matches_matconvnet(harness_equivalence, net, batch):
    model = _port_module().build_model()
    harness_equivalence(net=net, model=model, x=batch[0], labels=batch[1], weights="model")


def test_model_keras_matches_matconvnet(harness_equivalence, net, batch):
    harness_equivalence(net=net, model=_saved_model(), x=batch[0], labels=batch[1], weights="model")
'''

_LOAD_WEIGHTS = '''
def load_weights(model: keras.Model, path: str | Path = WEIGHTS) -> None:
    """Set every layer's variables from ``path`` (keys "<layer name>/<index>")."""
    with np.load(path) as saved:
        for layer in model.layers:
            if layer.weights:
                layer.set_weights([saved[f"{layer.name}/{i}"] for i in range(len(layer.weights))])
'''


def _test_source(hwc: tuple[int, ...], classes: int, has_loss: bool, mcn_path: Path | None) -> str:
    """test_port.py: the plugin's ``harness_equivalence`` on model.py and model.keras with
    their own weights (a net without a loss layer is compared through the sum of its
    outputs, with no labels)."""
    if mcn_path is None:
        net_line = f'NET = HERE / "{NET_MAT}"  # the MatConvNet net the port was made from'
    else:
        net_line = f"NET = Path({ascii(str(mcn_path))})  # the MatConvNet net the port was made from"
    options = " [--harness-mode test] [--harness-batch 8] [--harness-report DIR]"
    what = (
        "checks model.py's build_model() and model.keras, each with its own weights, against the\n"
        "MatConvNet net layer by layer (outputs, derivatives and the weights themselves) through\n"
        "the mcn-harness pytest plugin's ``harness_equivalence`` fixture (with\n"
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD set, add ``-p mcn_harness``)."
    )
    labels = (
        f"labels = rng.randint(1, {classes} + 1, size=(1, n)).astype(np.float64)"
        if has_loss
        else "labels = None  # the net has no loss layer"
    )
    head = _TEST_HEAD.format(
        options=options, what=what, imports="", net_line=net_line, input_size=_py(tuple(hwc))
    )
    return head + _TEST_CHECK.replace("{labels}", labels)


_DAG_TEST = '''"""Regression test of the Keras port of a DagNN network beside this file (generated by
mcn-harness): model.keras against the MatConvNet net, var by var (values, derivatives,
the params themselves), through harness.check.

    python -m pytest test_port.py
"""

from pathlib import Path

import harness
from harness.io.specs import runnable_dag
from harness.translate.port import load_model

HERE = Path(__file__).resolve().parent
{net_line}


def test_model_keras_matches_matconvnet():
    net = runnable_dag(harness.load_net(NET))  # layers the reference cannot run removed
    result = harness.check(net, load_model(HERE / "model.keras"), batch=2, weights="model")
    assert result.ok, str(result)
'''


def write_dag_port(net, out_dir, *, mcn_path=None, input_size=None, overwrite: bool = False) -> PortResult:
    """The port of a DagNN network (``harness.mcn.DagNet``, custom layers already removed):
    ``model.keras`` (``to_keras_dag``), ``test_port.py`` (``harness.check`` with the model's
    own weights) and ``net.mat`` unless ``mcn_path`` names the net's file. The standalone
    model.py is written for simplenn networks only so far."""
    from harness.mcn.matfile import save_net
    from harness.translate.build import to_keras

    out = Path(out_dir)
    names = [MODEL_KERAS, TEST_PY] + ([] if mcn_path else [NET_MAT])
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {str(out)!r} exists and is not a directory")
    taken = [n for n in names if (out / n).exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds {', '.join(taken)}: pass overwrite=True to replace them"
        )
    model = to_keras(net, "float64", input_size=input_size)
    out.mkdir(parents=True, exist_ok=True)
    net_path = Path(mcn_path).resolve() if mcn_path else out / NET_MAT
    result = PortResult(
        out_dir=out,
        model_keras=out / MODEL_KERAS,
        model_py=None,
        weights=None,
        test=out / TEST_PY,
        net_path=net_path,
        notes=["a DagNN network: model.py (standalone source) is written for simplenn networks only so far"],
    )
    if not mcn_path:
        save_net(result.net_path, net)
        result.written.append(result.net_path)
    model.save(result.model_keras)
    result.written.append(result.model_keras)
    line = (
        f'NET = HERE / "{NET_MAT}"  # the MatConvNet net the port was made from'
        if not mcn_path
        else f"NET = Path({ascii(str(net_path))})  # the MatConvNet net the port was made from"
    )
    result.test.write_text(_DAG_TEST.format(net_line=line))
    result.written.append(result.test)
    return result
