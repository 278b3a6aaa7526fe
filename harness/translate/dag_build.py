"""MatConvNet DagNN net -> a faithful functional Keras 3 model, and its weights both ways.

``to_keras_dag(net)`` builds one Keras layer per DagNN layer, in ``net.execution_order()``,
named after it (``keras_name``; helper layers get the suffixes ``_pad``, ``_subsample``,
``_crop``), with the block semantics of ``harness.mcn.dagnn_blocks``:

=====================  =====================================================================
DagNN block            Keras
=====================  =====================================================================
Conv                   [ZeroPadding2D] + Conv2D (groups, dilation) [+ Subsample: strided
                       dilated convs run stride 1, then subsample]
ConvTranspose          Conv2DTranspose, or GroupedConv2DTranspose for ``numGroups`` > 1
                       (refused with filters smaller than the upsampling: that layer's
                       static output shape is wrong there), [+ Cropping2D for ``crop``,
                       and for the rows Keras adds when the filters are smaller than the
                       upsampling]
BatchNorm              BatchNormalization (moments ``[mu, sigma]`` held as ``moving_mean =
                       mu``, ``moving_variance = sigma^2 - epsilon``; ``training=True`` uses
                       the batch statistics, as mode ``normal``; momentum ``1 - learning
                       rate`` of the moments param)
ReLU                   ReLU, MatConvNetLeakyReLU with a leak (block ``leak`` or opts)
Sigmoid, SoftMax       Activation('sigmoid'), Softmax over channels
Pooling                MatConvNetPooling (max, or avg with padding), AveragePooling2D
LRN                    MatConvNetLRN (exact power: MatConvNet's CPU fast_pow is not
                       reproduced, compare with ``eval(..., lrn_exact=True)``)
DropOut                Dropout (identity unless ``training=True``, as mode ``test``)
Sum                    Add (Identity for one input)
Concat                 Concatenate over H, W or C (``dim`` 1, 2, 3)
Crop                   MatConvNetCrop (MatConvNet's split, sizes read at run time)
Scale                  MatConvNetScale (param or var operands, broadcasting)
Loss                   not translated: its first input is a model output
=====================  =====================================================================

Any other block (PDist, NormOffset, SpatialNorm, custom layers such as a custom loss class)
raises TranslationError naming the layer and its type: cut it off with
``net.remove_layer(name)`` first.

Inputs and outputs (``dag_inputs``/``dag_outputs`` give the var names, in model order):

- one ``keras.Input`` per input var of the net (a var no layer outputs) that is not a label
  (a var read only by Loss layers, never as their first input), in ``net.vars`` order,
  named after the var (made safe). A model with one input takes one tensor, otherwise a
  list in that order. Data are ``N x H x W x C`` (``to_nhwc`` of MatConvNet's
  ``H x W x C x N``).
- the outputs: the net's output vars (``net.get_outputs()``, in ``net.vars`` order), each
  replaced by the first input of the Loss layer that computes it (the scores), without
  repeats. One output is returned as one tensor, several as a list in that order.

Input sizes: ``input_sizes[var]`` (``(H, W, C)``, H and W may be None), else
``net.meta['inputs']`` (MatConvNet's ``struct('name', ..., 'size', [H W C N])``, one or a
list), else ``net.meta['inputSize']`` for a net with one data input, else ``(None, None,
C)``: a fully convolutional model, C the depth of the first filters (or BatchNorm) that read
the var, through layers that keep the depth. Every custom layer runs with unknown spatial
sizes (MatConvNetCrop reads them at run time).

Shared params (MSLapSRN's recursive blocks use one conv's params in 12 layers): DagNN layers
with the same params (same names, same order), the same type and the same block (the
padding of a Conv, the crop of a ConvTranspose and cuDNN options aside: those are helper
layers or no-ops) are ONE Keras layer, built for the first in execution order and called
once per DagNN layer, so each param is one Keras variable. ``dag_keras_layers`` maps every
DagNN layer to the name of the Keras layer that holds its params. Layers that share only
some of their params, or share params with another block, raise TranslationError for now
(a custom layer reading variables of another layer would express them).

Weights: ``dag_weights_to_keras(net, model)`` loads the net's params (``to_keras_dag`` does
it), ``dag_params_from_keras(net, model)`` reads them back into a copy of the net (shapes
and dtypes the net's own).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.dagnn_blocks import parse_opts
from harness.mcn.net import Layer
from harness.mcn.options import McnError, as_4d, is_empty, pad4, pair
from harness.translate.build import TranslationError, keras_name
from harness.translate.weights import bnorm_to_keras, conv_to_keras, to_hwcn, to_nhwc

if TYPE_CHECKING:
    import keras

__all__ = [
    "SUPPORTED_BLOCKS",
    "dag_inputs",
    "dag_keras_layers",
    "dag_outputs",
    "dag_params_from_keras",
    "dag_weights_to_keras",
    "scale_weights",
    "to_keras_dag",
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


def _where(net: DagNet, layer: DagLayer) -> str:
    return f"layer {net.layers.index(layer) + 1} '{layer.name}' ({layer.type})"


@contextmanager
def _located(where: str) -> Iterator[None]:
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
class _Plan:
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


def _plan(net: DagNet) -> _Plan:
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
                    f"{_where(net, layer)}: reads var '{v}', the output of Loss layer '{p[0].name}', "
                    "which the translation leaves out (its input is a model output)"
                )
        if layer.type not in SUPPORTED_BLOCKS:
            raise TranslationError(
                f"{_where(net, layer)}: Expected a block the translation supports "
                f"({', '.join(b.split('.')[1] for b in SUPPORTED_BLOCKS)}, and Loss, left out). "
                f"Received type={layer.type!r}: remove it with net.remove_layer({layer.name!r}) "
                "to translate the rest"
            )
    plan = _Plan([], {}, {}, dag_inputs(net), dag_outputs(net))
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
                f"{_where(net, layer)}: shares param(s) {', '.join(shared)} with layer "
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
    return dict(_plan(net).names)


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


def _input_shapes(net: DagNet, plan: _Plan, input_sizes: Mapping | None) -> dict[str, tuple]:
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


# ------------------------------------------------------------------------------ the model


def _number(value: Any, default: float) -> float:
    return default if is_empty(value) else float(np.asarray(value, dtype=float).ravel()[0])


def _value(net: DagNet, layer: DagLayer, j: int, what: str) -> np.ndarray | None:
    if len(layer.params) <= j:
        raise TranslationError(
            f"Expected at least {j + 1} params ({what}) for a {layer.type} block. "
            f"Received params={layer.params}"
        )
    value = net.param(layer.params[j]).value
    return None if is_empty(value) else np.asarray(value)


def _required(net: DagNet, layer: DagLayer, j: int, what: str) -> np.ndarray:
    value = _value(net, layer, j, what)
    if value is None:
        raise TranslationError(
            f"{_where(net, layer)}: Expected a value for param '{layer.params[j]}' ({what}). "
            "Received an empty param"
        )
    return value


def _conv_bias(net: DagNet, layer: DagLayer) -> np.ndarray | None:
    if not layer.block.get("has_bias", True):
        return None
    return _value(net, layer, 1, "biases")


class _Builder:
    """Builds the Keras layer(s) of one DagNN layer at a time: ``builder(layer, tensors)``."""

    def __init__(self, net: DagNet, plan: _Plan, dtype: str):
        import keras

        from harness.translate import layers as L

        self.keras, self.L = keras, L
        self.net, self.plan = net, plan
        self.kw = {"dtype": dtype}
        self.built: dict[str, Any] = {}  # owner DagNN layer -> its Keras layer

    def helper(self, layer: DagLayer, suffix: str) -> str:
        return self.plan.unique(f"{keras_name(layer.name)}_{suffix}")

    def core(self, layer: DagLayer, make):
        """The Keras layer holding ``layer``'s params (or operation): built once per owner,
        ``make(name)`` building it."""
        owner = self.plan.owner[layer.name]
        if owner not in self.built:
            self.built[owner] = make(self.plan.names[layer.name])
        return self.built[owner]

    def __call__(self, layer: DagLayer, xs: list) -> Any:
        method = "_" + layer.type.split(".", 1)[1].lower()
        return getattr(self, method)(layer, layer.block, xs)

    def _filters(self, layer: DagLayer) -> tuple[np.ndarray, np.ndarray | None]:
        return conv_to_keras(_required(self.net, layer, 0, "filters")), _conv_bias(self.net, layer)

    def _conv(self, layer: DagLayer, b: dict, xs: list) -> Any:
        keras, kw, x = self.keras, self.kw, xs[0]
        parse_opts(b.get("opts"), {}, "vl_nnconv")
        f, bias = self._filters(layer)
        pads = pad4(b["pad"], "pad")
        stride, dilate = pair(b["stride"], "stride"), pair(b["dilate"], "dilate")
        fh, fw, fc, k = f.shape
        channels = x.shape[-1]
        if channels is None or channels % fc or k % (channels // fc):
            raise TranslationError(
                f"Expected the filter depth {fc} to divide the {channels} input channels into "
                f"groups that divide the {k} filters. Received filters of shape {f.shape}"
            )
        conv_stride = stride if dilate == (1, 1) else (1, 1)
        if any(pads):
            pad = ((pads[0], pads[1]), (pads[2], pads[3]))
            x = keras.layers.ZeroPadding2D(pad, name=self.helper(layer, "pad"), **kw)(x)
        conv = self.core(
            layer,
            lambda name: keras.layers.Conv2D(
                k,
                (fh, fw),
                strides=conv_stride,
                padding="valid",
                dilation_rate=dilate,
                groups=channels // fc,
                use_bias=bias is not None,
                name=name,
                **kw,
            ),
        )
        x = conv(x)
        if conv_stride != stride:  # TensorFlow refuses strides > 1 together with dilation > 1
            x = self.L.Subsample(stride, name=self.helper(layer, "subsample"), **kw)(x)
        return x

    def _convtranspose(self, layer: DagLayer, b: dict, xs: list) -> Any:
        keras, L, kw, x = self.keras, self.L, self.kw, xs[0]
        parse_opts(b.get("opts"), {}, "vl_nnconvt")
        f, bias = self._filters(layer)
        groups = int(_number(b.get("num_groups"), 1))
        up, crop = pair(b["upsample"], "upsample"), list(pad4(b["crop"], "crop"))
        fh, fw, k, d = f.shape
        if x.shape[-1] != d or d % groups:
            raise TranslationError(
                f"Expected {d} input channels (filters {f.shape}) in num_groups={groups} groups. "
                f"Received {x.shape[-1]} channels"
            )
        if groups > 1 and (fh < up[0] or fw < up[1]):
            # GroupedConv2DTranspose states (H-1)*s + FH rows but makes H*s when FH < s
            raise TranslationError(
                f"Expected filters of at least the upsampling {list(up)} with num_groups={groups} > 1. "
                f"Received filters {fh} x {fw}: GroupedConv2DTranspose's static output shape is wrong there"
            )
        # Keras makes H*s rows where MatConvNet makes (H-1)*s + FH when FH < s: crop the rest
        crop[1] += max(up[0] - fh, 0)
        crop[3] += max(up[1] - fw, 0)
        if groups == 1:
            make = lambda name: keras.layers.Conv2DTranspose(  # noqa: E731
                k, (fh, fw), strides=up, padding="valid", use_bias=bias is not None, name=name, **kw
            )
        else:
            make = lambda name: L.GroupedConv2DTranspose(  # noqa: E731
                k, (fh, fw), up, groups, use_bias=bias is not None, name=name, **kw
            )
        x = self.core(layer, make)(x)
        if any(crop):
            cropping = ((crop[0], crop[1]), (crop[2], crop[3]))
            x = keras.layers.Cropping2D(cropping, name=self.helper(layer, "crop"), **kw)(x)
        return x

    def _batchnorm(self, layer: DagLayer, b: dict, xs: list) -> Any:
        x = xs[0]
        parse_opts(b.get("opts"), {}, "vl_nnbnorm")
        gains = _required(self.net, layer, 0, "gains")
        _required(self.net, layer, 1, "biases")
        _required(self.net, layer, 2, "moments")
        if x.shape[-1] != gains.size:
            raise TranslationError(f"Expected {gains.size} input channels. Received {x.shape[-1]}")
        lr = self.net.param(layer.params[2]).learning_rate
        momentum = min(max(1.0 - float(lr), 0.0), 1.0)  # trainMethod 'average' with rate lr
        eps = _number(b.get("epsilon"), 1e-5)
        return self.core(
            layer,
            lambda name: self.keras.layers.BatchNormalization(
                axis=-1, epsilon=eps, momentum=momentum, name=name, **self.kw
            ),
        )(x)

    def _relu(self, layer: DagLayer, b: dict, xs: list) -> Any:
        opts = parse_opts(b.get("opts"), {"leak": "leak"}, "vl_nnrelu")
        leak = _number(opts.get("leak", b.get("leak")), 0.0)
        if leak != 0:
            make = lambda name: self.L.MatConvNetLeakyReLU(leak, name=name, **self.kw)  # noqa: E731
        else:
            make = lambda name: self.keras.layers.ReLU(name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(xs[0])

    def _sigmoid(self, layer: DagLayer, b: dict, xs: list) -> Any:
        make = lambda name: self.keras.layers.Activation("sigmoid", name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(xs[0])

    def _softmax(self, layer: DagLayer, b: dict, xs: list) -> Any:
        make = lambda name: self.keras.layers.Softmax(axis=-1, name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(xs[0])

    def _pooling(self, layer: DagLayer, b: dict, xs: list) -> Any:
        keras, L, kw = self.keras, self.L, self.kw
        parse_opts(b.get("opts"), {}, "vl_nnpool")
        size, stride = pair(b["pool_size"], "pool_size"), pair(b["stride"], "stride")
        pads = pad4(b["pad"], "pad")
        method = b.get("method", "max")
        if method not in ("max", "avg"):
            raise TranslationError(f"Expected method 'max' or 'avg'. Received method={method!r}")
        if any(pads) or method == "max":
            # clipped windows; max: MaxPooling2D breaks ties row-major, MatConvNet column-major
            padding = ((pads[0], pads[1]), (pads[2], pads[3]))
            make = lambda name: L.MatConvNetPooling(size, stride, padding, method, name=name, **kw)  # noqa: E731
        else:
            make = lambda name: keras.layers.AveragePooling2D(  # noqa: E731
                size, stride, padding="valid", name=name, **kw
            )
        return self.core(layer, make)(xs[0])

    def _lrn(self, layer: DagLayer, b: dict, xs: list) -> Any:
        p = np.asarray(b["param"], dtype=float).ravel()
        if p.size != 4:
            raise TranslationError(f"Expected param [N KAPPA ALPHA BETA]. Received param={p.tolist()}")
        make = lambda name: self.L.MatConvNetLRN(int(p[0]), p[1], p[2], p[3], name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(xs[0])

    def _dropout(self, layer: DagLayer, b: dict, xs: list) -> Any:
        rate = _number(b.get("rate"), 0.5)
        return self.core(layer, lambda name: self.keras.layers.Dropout(rate, name=name, **self.kw))(xs[0])

    def _sum(self, layer: DagLayer, b: dict, xs: list) -> Any:
        if len(xs) == 1:
            return self.core(layer, lambda name: self.keras.layers.Identity(name=name, **self.kw))(xs[0])
        return self.core(layer, lambda name: self.keras.layers.Add(name=name, **self.kw))(list(xs))

    def _concat(self, layer: DagLayer, b: dict, xs: list) -> Any:
        dim = int(_number(b.get("dim"), 3))
        if dim not in (1, 2, 3):
            raise TranslationError(
                "Expected dim 1, 2 or 3 (H, W, C; Keras cannot concatenate along the batch). "
                f"Received dim={dim}"
            )
        if len(xs) == 1:
            return self.core(layer, lambda name: self.keras.layers.Identity(name=name, **self.kw))(xs[0])
        make = lambda name: self.keras.layers.Concatenate(axis=dim, name=name, **self.kw)  # noqa: E731
        return self.core(layer, make)(list(xs))

    def _crop(self, layer: DagLayer, b: dict, xs: list) -> Any:
        if len(xs) != 2:
            raise TranslationError(f"Expected 2 inputs (data, size reference). Received {len(xs)}")
        crop = np.asarray(b["crop"], dtype=float).ravel()
        if crop.size != 2:
            raise TranslationError(f"Expected crop [Y X]. Received crop={crop.tolist()}")
        h1, w1, h2, w2 = xs[0].shape[1], xs[0].shape[2], xs[1].shape[1], xs[1].shape[2]
        if any(a is not None and c is not None and a < c for a, c in ((h1, h2), (w1, w2))):
            raise TranslationError(
                f"Expected the first input ({h1} x {w1}) to be at least as large as the second "
                f"({h2} x {w2}): dagnn.Crop cannot crop to a larger size"
            )
        c0, c1 = int(crop[0]), int(crop[1])
        return self.core(layer, lambda name: self.L.MatConvNetCrop((c0, c1), name=name, **self.kw))(list(xs))

    def _scale(self, layer: DagLayer, b: dict, xs: list) -> Any:
        has_bias = bool(b.get("has_bias", True))
        wanted = 3 if has_bias else 2
        if len(xs) + len(layer.params) < wanted:
            raise TranslationError(
                f"Expected {wanted} operands (inputs then params: data, scale"
                f"{', bias' if has_bias else ''}). Received inputs={layer.inputs}, params={layer.params}"
            )
        shapes = _scale_weight_shapes(self.net, layer)
        scale_shape, bias_shape = shapes.get(1), shapes.get(2)
        args = list(xs[:wanted])
        make = lambda name: self.L.MatConvNetScale(  # noqa: E731
            scale_shape, bias_shape, has_bias, name=name, **self.kw
        )
        return self.core(layer, make)(args if len(args) > 1 else args[0])


def _scale_operands(layer: DagLayer) -> dict[int, str]:
    """dagnn.Scale's operands ``[inputs, params]`` held by params: operand index (1 scale,
    2 bias, the bias only with has_bias) -> param name."""
    wanted = (1, 2) if layer.block.get("has_bias", True) else (1,)
    return {len(layer.inputs) + j: p for j, p in enumerate(layer.params) if len(layer.inputs) + j in wanted}


def scale_weights(layer: DagLayer) -> list[str]:
    """The params a MatConvNetScale layer holds as weights, in its weight order."""
    return [p for _, p in sorted(_scale_operands(layer).items())]


def _scale_weight_shapes(net: DagNet, layer: DagLayer) -> dict[int, tuple[int, ...]]:
    """Operand index (1 scale, 2 bias) -> the Keras shape of the param holding it."""
    out = {}
    for index, p in _scale_operands(layer).items():
        value = net.param(p).value
        if is_empty(value):
            raise TranslationError(f"Expected a value for param '{p}'. Received an empty param")
        out[index] = to_nhwc(as_4d(value)).shape
    return out


def to_keras_dag(
    net: DagNet, dtype: str = "float64", *, input_sizes: Mapping[str, Any] | None = None
) -> keras.Model:
    """A functional Keras model exactly equivalent to the DagNN ``net`` (weights loaded).

    Inputs ``dag_inputs(net)``, outputs ``dag_outputs(net)`` (one tensor each when there is
    one, else lists in that order); ``input_sizes`` maps input var names to ``(H, W, C)``
    (see the module docstring for the defaults). ``training=True`` is mode ``normal``
    (BatchNorm on batch statistics, DropOut drawing masks), the default mode ``test``.
    Raises TranslationError naming the layer for blocks it cannot express.
    """
    import keras

    if dtype not in ("float64", "float32"):
        raise TranslationError(f"Expected dtype 'float64' or 'float32'. Received dtype={dtype!r}")
    plan = _plan(net)
    if not plan.outputs:
        raise TranslationError("Expected the net to have output vars. Received none")
    plan.used = set(plan.names.values())
    shapes = _input_shapes(net, plan, input_sizes)
    tensors: dict[str, Any] = {}
    inputs = []
    for v in plan.inputs:
        tensors[v] = keras.Input(shape=shapes[v], dtype=dtype, name=plan.unique(keras_name(v)))
        inputs.append(tensors[v])
    build = _Builder(net, plan, dtype)
    for layer in plan.layers:
        where = _where(net, layer)
        with _located(where):
            missing = [v for v in layer.inputs if v not in tensors]
            if missing:  # pragma: no cover - the execution order and _plan rule this out
                raise TranslationError(f"inputs {', '.join(missing)} have no value yet")
            y = build(layer, [tensors[v] for v in layer.inputs])
        for v in layer.outputs[:1]:
            tensors[v] = y
        if len(layer.outputs) > 1:
            raise TranslationError(f"{where}: Expected one output. Received outputs={layer.outputs}")
    outputs = [tensors[v] for v in plan.outputs]
    model = keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        outputs[0] if len(outputs) == 1 else outputs,
        name="matconvnet_dag",
    )
    dag_weights_to_keras(net, model)
    return model


# ------------------------------------------------------------------------------ weights


def _owners(net: DagNet, model: keras.Model) -> Iterator[tuple[DagLayer, Any]]:
    """(DagNN layer, its Keras layer) for the first layer of every group sharing a Keras
    layer, for the blocks with params."""
    plan = _plan(net)
    for layer in plan.layers:
        if plan.owner[layer.name] != layer.name or not layer.params:
            continue
        if layer.type not in ("dagnn.Conv", "dagnn.ConvTranspose", "dagnn.BatchNorm", "dagnn.Scale"):
            continue
        try:
            k = model.get_layer(plan.names[layer.name])
        except ValueError:
            raise TranslationError(
                f"{_where(net, layer)}: no Keras layer '{plan.names[layer.name]}' in the model"
            ) from None
        yield layer, k


def _keras_values(net: DagNet, layer: DagLayer, klayer) -> list[np.ndarray]:
    """The params of ``layer`` as ``klayer.get_weights()`` holds them (float64)."""
    if layer.type == "dagnn.BatchNorm":
        weights = [_required(net, layer, j, what) for j, what in enumerate(("gains", "biases", "moments"))]
        eps = _number(layer.block.get("epsilon"), 1e-5)
        return bnorm_to_keras(Layer("bnorm", layer.name, weights, epsilon=eps), klayer)
    if layer.type == "dagnn.Scale":
        return [to_nhwc(as_4d(net.param(p).value, dtype=np.float64)) for p in scale_weights(layer)]
    values = [conv_to_keras(_required(net, layer, 0, "filters"))]
    bias = _conv_bias(net, layer)
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
                f"{_where(net, layer)}: Expected Keras layer '{k.name}' to hold weights of shapes "
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
