"""vl_simplenn_tidy and vl_simplenn: run a simplenn network forward and backward.

Mirrors matlab/simplenn/vl_simplenn_tidy.m and matlab/simplenn/vl_simplenn.m in both
dialects (``"master"``: commit 1e5ae7b7; ``"beta25"``: tag v1.0-beta25). The only
dialect difference inside vl_simplenn is the bnorm moments derivative, which beta25
multiplies by the batch size; the loss layers take the dialect to their functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.mcn.bnorm import vl_nnbnorm
from harness.mcn.conv import vl_nnconv, vl_nnconvt
from harness.mcn.loss import vl_nnloss, vl_nnsoftmaxloss
from harness.mcn.net import Layer, Net, layer_errors, layer_field, layer_weight, matlab_field, unknown_type
from harness.mcn.normalize import vl_nnnormalize
from harness.mcn.options import McnError, as_4d, check_budget, float_dtype, is_empty
from harness.mcn.pointwise import vl_nndropout, vl_nnrelu, vl_nnsigmoid, vl_nnsoftmax
from harness.mcn.pool import vl_nnpool

__all__ = ["Res", "vl_simplenn", "vl_simplenn_tidy", "DIALECTS", "MODES"]

DIALECTS = ("master", "beta25")
MODES = ("normal", "test")

_LOSS_TYPES = ("loss", "softmaxloss")


def _defaults(layer_type: str) -> dict[str, Any]:
    """vl_simplenn_tidy's per-type defaults (a duplicated ``case 'pool'`` in MatConvNet's
    switch means the pool ``method`` default is never reached: vl_nnpool's own default,
    'max', applies at run time instead)."""
    return {
        "conv": {"pad": 0.0, "stride": 1.0, "dilate": 1.0, "opts": []},
        "pool": {"pad": 0.0, "stride": 1.0, "opts": []},
        "convt": {"crop": 0.0, "upsample": 1.0, "num_groups": 1.0, "opts": []},
        "relu": {"leak": 0.0},
        "dropout": {"rate": 0.5},
        "normalize": {"param": np.array([5, 1, 0.0001 / 5, 0.75])},
        "lrn": {"param": np.array([5, 1, 0.0001 / 5, 0.75])},
        "bnorm": {"epsilon": 1e-5},
    }.get(layer_type, {})


def vl_simplenn_tidy(net: Net) -> Net:
    """Fill in MatConvNet's defaults (mirrors vl_simplenn_tidy.m); returns a new Net.

    Names default to ``layer<i>``; old ``filters``/``biases`` fields become ``weights``;
    bnorm layers get a zero ``C x 2`` moments array (in the filters' dtype) and epsilon
    1e-5; conv pad 0, stride 1, dilate 1; pool pad 0, stride 1; convt crop 0, upsample 1,
    numGroups 1; relu leak 0; dropout rate 0.5; lrn param [5 1 0.0001/5 0.75].
    """
    if not isinstance(net, Net):
        raise McnError(f"Expected net to be a harness.mcn.Net. Received net={type(net).__name__}")
    if not isinstance(net.layers, list):
        raise McnError(f"Expected net.layers to be a list of layers. Received {describe(net.layers)}")
    tnet = Net(meta=dict(net.meta) if isinstance(net.meta, dict) else {}, notes=getattr(net, "notes", None))
    for i, src in enumerate(net.layers):
        if not isinstance(src, Layer):
            raise McnError(f"layer {i + 1}: Expected a layer struct. Received {describe(src)}")
        layer = src.copy()
        where = f"layer {i + 1}"
        if not isinstance(layer.get("type"), str):
            raise McnError(
                f"{where}: Expected field 'type' to be a string. Received {describe(layer.get('type'))}"
            )
        if layer.get("name") is None or (isinstance(layer.get("name"), np.ndarray) and layer.name.size == 0):
            layer.name = f"layer{i + 1}"
        if not isinstance(layer.name, str):
            raise McnError(
                f"{where} ({layer.type}): Expected field 'name' to be a string. "
                f"Received {describe(layer.name)}"
            )
        _weights_list(layer, f"{where} '{layer.name}' ({layer.type})")
        if layer.type in ("conv", "convt", "bnorm") and not layer.weights and layer.has("filters"):
            layer.weights = [layer.filters, layer.get("biases", np.zeros((0, 0)))]
            del layer.filters
            if layer.has("biases"):
                del layer.biases
        if layer.type == "bnorm" and len(layer.weights) < 3:
            if not layer.weights:
                raise McnError(
                    f"{where} '{layer.name}' (bnorm): Expected field 'weights' = {{gains, biases}}."
                )
            g = np.asarray(layer.weights[0])
            layer.weights = [*layer.weights, np.zeros((g.size, 2), dtype=g.dtype)]
        if not layer.has("precious"):
            layer.precious = False
        for key, value in _defaults(layer.type).items():
            if not layer.has(key):
                setattr(layer, key, value)
        _check_fields(layer, i)
        tnet.layers.append(layer)
    return tnet


# Numeric option fields per layer type: each must be a real, finite numeric array.
_NUMERIC_FIELDS = {
    "conv": ("pad", "stride", "dilate"),
    "convt": ("crop", "upsample", "num_groups"),
    "pool": ("pool", "pad", "stride"),
    "relu": ("leak",),
    "dropout": ("rate",),
    "normalize": ("param",),
    "lrn": ("param",),
    "bnorm": ("epsilon",),
}
# Integer fields and their least value (pads and crops may be 0, sizes and steps not).
_INTEGER_FIELDS = {
    "pad": 0,
    "crop": 0,
    "stride": 1,
    "dilate": 1,
    "pool": 1,
    "upsample": 1,
    "num_groups": 1,
}


def describe(value: Any) -> str:
    """What a value is, in MATLAB's words, for error messages (never its whole content)."""
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:20] + "..."
        return f"char {shown!r}"
    if isinstance(value, dict):
        return f"a struct (fields {', '.join(map(str, list(value)[:5]))})"
    if isinstance(value, list | tuple):
        return f"a cell of {len(value)}"
    if isinstance(value, bool | np.bool_):
        return f"logical {bool(value)}"
    if isinstance(value, int | float | np.number):
        return f"{value!r}"
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return f"a cell array of shape {value.shape}"
        if value.dtype.kind in "US":
            return "a char array"
        if value.dtype.kind == "c":
            return f"a complex array of shape {value.shape}"
        if value.dtype.names:
            return "a struct array"
        if value.size <= 4:
            return f"{value.dtype} {value.ravel().tolist()}"
        return f"a {value.dtype} array of shape {value.shape}"
    if type(value).__module__.startswith("scipy.sparse"):
        return f"a sparse matrix of shape {getattr(value, 'shape', '?')}"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"


def _numeric(value: Any, nested: bool = True) -> bool:
    """A real numeric (or logical) array or scalar, or (from Python callers) a flat list
    or tuple of real numbers; nothing else."""
    if isinstance(value, bool | int | float | np.number | np.bool_):
        return not isinstance(value, complex | np.complexfloating)
    if nested and isinstance(value, list | tuple):
        return all(_numeric(v, nested=False) for v in value)
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


def _weights_list(layer: Layer, where: str) -> None:
    weights = layer.get("weights", [])
    if isinstance(weights, np.ndarray) and weights.dtype.kind in "biuf":
        weights = [weights] if weights.size else []
    if weights is None:
        weights = []
    if not isinstance(weights, list | tuple):
        raise McnError(
            f"{where}: Expected field 'weights' to be a cell of arrays. Received {describe(weights)}"
        )
    layer.weights = list(weights)


def _check_fields(layer: Layer, i: int) -> None:
    """Refuse, naming the layer and the field, what MatConvNet's functions would refuse:
    weights that are not real numeric arrays (char, struct, cell, sparse, complex) and
    option fields that are not finite numbers."""
    where = f"layer {i + 1} '{layer.name}' ({layer.type})"
    _weights_list(layer, where)
    for j, w in enumerate(layer.weights):
        if w is None or (isinstance(w, list) and not w):
            continue
        if not _numeric(w):
            raise McnError(
                f"{where}: Expected field 'weights'{{{j + 1}}} to be a real numeric array "
                f"(MatConvNet refuses others). Received {describe(w)}"
            )
    for key in _NUMERIC_FIELDS.get(layer.type, ()):
        if not layer.has(key):
            continue
        value = layer.get(key)
        if not _numeric(value):
            raise McnError(
                f"{where}: Expected field '{matlab_field(key)}' to be numeric. Received {describe(value)}"
            )
        values = np.asarray(value, dtype=float).ravel()
        if not np.all(np.isfinite(values)):
            raise McnError(
                f"{where}: Expected field '{matlab_field(key)}' to be finite. Received {describe(value)}"
            )
        least = _INTEGER_FIELDS.get(key)
        if least is not None and (
            values.size == 0 or np.any(values != np.round(values)) or np.any(values < least)
        ):
            raise McnError(
                f"{where}: Expected field '{matlab_field(key)}' to be integers >= {least}. "
                f"Received {describe(value)}"
            )
    method = layer.get("method", "max")
    if layer.type == "pool" and not (isinstance(method, str) and method.lower() in ("max", "avg")):
        raise McnError(f"{where}: Expected field 'method' to be 'max' or 'avg'. Received {describe(method)}")


@dataclass
class Res:
    """One entry of vl_simplenn's ``res``: ``x`` is the input of layer i (``res[0].x`` the
    image, ``res[-1].x`` the loss), ``dzdx`` its derivative, ``dzdw`` the parameter
    derivatives of layer i, ``aux`` the dropout mask."""

    x: np.ndarray | None = None
    dzdx: np.ndarray | None = None
    dzdw: list[np.ndarray] = field(default_factory=list)
    aux: Any = None


def _cast(w: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    # MatConvNet requires data and parameters of one class; a double net fed single data
    # is an error there. We cast parameters to the data's class so both precisions run.
    return None if w is None else np.asarray(w).astype(dtype, copy=False)


def _weights(layer: Layer, i: int, dt: np.dtype) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The first two weights (filters and biases, or bnorm's gains and biases) in the data's class."""
    return _cast(layer_weight(layer, i, 0), dt), _cast(layer_weight(layer, i, 1), dt)


def _options(layer: Layer, i: int) -> dict[str, Any]:
    """The options vl_simplenn passes to vl_nnconv, vl_nnconvt or vl_nnpool."""
    if layer.type == "conv":
        pad, stride = layer_field(layer, i, "pad"), layer_field(layer, i, "stride")
        return {"pad": pad, "stride": stride, "dilate": layer.get("dilate", 1)}
    if layer.type == "convt":
        keys = ("crop", "upsample", "num_groups")
        return {key: layer_field(layer, i, key) for key in keys}
    pad, stride = layer_field(layer, i, "pad"), layer_field(layer, i, "stride")
    return {"pad": pad, "stride": stride, "method": layer.get("method", "max")}


def _forward(
    layer: Layer, i: int, x: np.ndarray, test_mode: bool, dialect: str, rng, mask, lrn_exact: bool
) -> tuple:
    t = layer.type
    dt = x.dtype
    if t == "conv":
        y = vl_nnconv(x, *_weights(layer, i, dt), **_options(layer, i))
    elif t == "convt":
        y = vl_nnconvt(x, *_weights(layer, i, dt), **_options(layer, i))
    elif t == "pool":
        y = vl_nnpool(x, layer_field(layer, i, "pool"), **_options(layer, i))
    elif t in ("normalize", "lrn"):
        y = vl_nnnormalize(x, layer_field(layer, i, "param"), exact=lrn_exact)
    elif t == "softmax":
        y = vl_nnsoftmax(x)
    elif t == "loss":
        # vl_simplenn calls vl_nnloss(x, l.class) with no options: softmaxlog, always.
        y = vl_nnloss(x, layer_field(layer, i, "class_"), dialect=dialect)
    elif t == "softmaxloss":
        y = vl_nnsoftmaxloss(x, layer_field(layer, i, "class_"), dialect=dialect)
    elif t == "relu":
        y = vl_nnrelu(x, leak=_leak(layer))
    elif t == "sigmoid":
        y = vl_nnsigmoid(x)
    elif t == "dropout":
        if test_mode:
            return x, None
        rate = layer_field(layer, i, "rate")
        return vl_nndropout(x, rate=rate, mask=mask, rng=rng, return_mask=True)
    elif t == "bnorm":
        g, b = _weights(layer, i, dt)
        eps = layer_field(layer, i, "epsilon")
        if test_mode:
            y = vl_nnbnorm(x, g, b, moments=_cast(layer_weight(layer, i, 2), dt), epsilon=eps)
        else:
            y = vl_nnbnorm(x, g, b, epsilon=eps)
    else:
        raise unknown_type(layer, i)
    return y, None


def _leak(layer: Layer) -> float:
    leak = (
        float(np.asarray(layer.get("leak", 0.0)).ravel()[0]) if not is_empty(layer.get("leak", 0.0)) else 0.0
    )
    # vl_simplenn passes 'leak' only when it is positive.
    return leak if leak > 0 else 0.0


def _backward(layer: Layer, i: int, res: list[Res], test_mode: bool, dialect: str, lrn_exact: bool) -> tuple:
    t = layer.type
    x, dzdy = res[i].x, res[i + 1].dzdx
    dt = x.dtype
    if t in ("conv", "convt"):
        op = vl_nnconv if t == "conv" else vl_nnconvt
        dzdx, dzdf, dzdb = op(x, *_weights(layer, i, dt), dzdy, **_options(layer, i))
        return dzdx, [dzdf, dzdb]
    if t == "pool":
        return vl_nnpool(x, layer.pool, dzdy, **_options(layer, i)), []
    if t in ("normalize", "lrn"):
        return vl_nnnormalize(x, layer.param, dzdy, exact=lrn_exact), []
    if t == "softmax":
        return vl_nnsoftmax(x, dzdy), []
    if t == "loss":
        return vl_nnloss(x, layer.class_, dzdy, dialect=dialect), []
    if t == "softmaxloss":
        return vl_nnsoftmaxloss(x, layer.class_, dzdy, dialect=dialect), []
    if t == "relu":
        return vl_nnrelu(x, dzdy, leak=_leak(layer)), []
    if t == "sigmoid":
        return vl_nnsigmoid(x, dzdy), []
    if t == "dropout":
        if test_mode:
            return dzdy, []
        return vl_nndropout(x, dzdy, rate=layer.rate, mask=res[i + 1].aux), []
    if t == "bnorm":
        # Quirk kept: the backward pass never passes 'moments', so even in test mode the
        # derivatives are those of batch statistics.
        g, b = _weights(layer, i, dt)
        dzdx, dzdg, dzdb, dzdm = vl_nnbnorm(x, g, b, dzdy, epsilon=layer.epsilon)
        if dialect == "beta25":
            # beta25: "multiply the moments update by the number of images in the batch".
            dzdm = dzdm * x.shape[3]
        return dzdx, [dzdg, dzdb, dzdm]
    raise AssertionError(t)  # forward already rejected unknown types


def vl_simplenn(
    net: Net,
    x: np.ndarray,
    dzdy: Any = None,
    labels: Any = None,
    *,
    mode: str = "normal",
    dialect: str = "master",
    rng: np.random.Generator | None = None,
    masks: dict[int, np.ndarray] | None = None,
    lrn_exact: bool = False,
) -> list[Res]:
    """Evaluate a simplenn network (mirrors vl_simplenn.m).

    ``res[i].x`` is the input of layer i (MatConvNet's ``res(i+1)``), ``res[-1].x`` the
    network output (the loss for a net ending in a loss layer). With ``dzdy`` (cnn_train
    passes 1) the backward pass fills ``res[i].dzdx`` and ``res[i].dzdw``. ``labels``, if
    given, are set as the last layer's ``class`` (``net.layers{end}.class = labels``).
    ``mode`` is 'normal' (training: dropout active, bnorm batch statistics) or 'test'.
    Dropout masks are drawn from ``rng`` unless given in ``masks`` by layer index.
    ``lrn_exact`` swaps MatConvNet's approximate power in LRN layers for the exact one.
    The net should be tidied (vl_simplenn_tidy) first, as MatConvNet expects.
    """
    if mode not in MODES:
        raise McnError(f"Expected mode to be one of {MODES}. Received mode={mode!r}")
    if dialect not in DIALECTS:
        raise McnError(f"Expected dialect to be one of {DIALECTS}. Received dialect={dialect!r}")
    if not isinstance(net, Net):
        raise McnError(f"Expected net to be a harness.mcn.Net. Received net={type(net).__name__}")
    float_dtype(x, "x")
    x = as_4d(x, "x")
    test_mode = mode == "test"
    masks = masks or {}
    layers = net.layers
    if labels is not None:
        if not layers or layers[-1].type not in _LOSS_TYPES:
            raise McnError("Expected the last layer to be a loss layer when labels are given.")
        last = layers[-1].copy()
        last.class_ = labels
        layers = [*layers[:-1], last]
    n = len(layers)
    res = [Res() for _ in range(n + 1)]
    res[0].x = x
    backward = not (dzdy is None or is_empty(dzdy))
    held = x.nbytes
    for i, layer in enumerate(layers):
        with layer_errors(layer, i):
            res[i + 1].x, res[i + 1].aux = _forward(
                layer, i, res[i].x, test_mode, dialect, rng, masks.get(i), lrn_exact
            )
            held += np.asarray(res[i + 1].x).nbytes
            # the backward pass holds a derivative of every activation as well
            check_budget(held * (2 if backward else 1), "the activations of this batch")
    if not backward:
        return res
    res[n].dzdx = np.asarray(dzdy, dtype=x.dtype) if np.ndim(dzdy) == 0 else as_4d(dzdy, "dzdy", x.dtype)
    for i in range(n - 1, -1, -1):
        layer = layers[i]
        with layer_errors(layer, i):
            res[i].dzdx, res[i].dzdw = _backward(layer, i, res, test_mode, dialect, lrn_exact)
    return res
