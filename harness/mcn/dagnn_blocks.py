"""The DagNN blocks (``matlab/+dagnn/*.m`` at commit 1e5ae7b7): properties and forward/backward.

Each block type has its MATLAB class defaults and property setters (``BLOCKS``,
``normalise_block``: harness.mcn.dagnn_props, whose names this module re-exports) and one
``forward``/``backward`` pair calling the reference ops exactly as the block's
``forward``/``backward`` methods call MatConvNet's functions. ``harness.mcn.dagnn`` does
the graph (execution order, derivative accumulation); this module only evaluates one layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.bnorm import vl_nnbnorm
from harness.mcn.conv import vl_nnconv, vl_nnconvt
from harness.mcn.dagnn_props import (
    BLOCKS,
    BOOL_PROPS,
    VECTOR_PROPS,
    block_defaults,
    normalise_block,
    number,
    parse_opts,
    supported,
    unsupported_block,
)
from harness.mcn.loss import LOSSES, vl_nnloss
from harness.mcn.normalize import vl_nnnormalize
from harness.mcn.options import McnError, as_4d, is_empty
from harness.mcn.pointwise import vl_nndropout, vl_nnrelu, vl_nnsigmoid, vl_nnsoftmax
from harness.mcn.pool import vl_nnpool

if TYPE_CHECKING:
    from harness.mcn.dagnn_graph import DagLayer

__all__ = [
    "BLOCKS",
    "LOSSES",
    "BOOL_PROPS",
    "EvalContext",
    "VECTOR_PROPS",
    "backward",
    "block_defaults",
    "forward",
    "normalise_block",
    "number",
    "parse_opts",
    "supported",
    "unsupported_block",
]

# ------------------------------------------------------------------------- evaluation


@dataclass
class EvalContext:
    """What one ``DagNet.eval`` call passes to the blocks."""

    mode: str = "normal"
    rng: np.random.Generator | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    lrn_exact: bool = False


def _cast(a: Any, dt: np.dtype) -> Any:
    return None if is_empty(a) else np.asarray(a).astype(dt, copy=False)


def _param(params: list, j: int, layer: DagLayer) -> Any:
    if len(params) <= j:
        raise McnError(
            f"Expected at least {j + 1} params for a {layer.type} block. Received params={layer.params}"
        )
    return params[j]


def _bias(layer: DagLayer, params: list) -> Any:
    # Conv/ConvTranspose: ``if ~obj.hasBias, params{2} = [] ; end`` then params{2} is read.
    return _param(params, 1, layer) if layer.block.get("has_bias", True) else None


def _dzdy(d: Any, dt: np.dtype) -> Any:
    return np.asarray(d).astype(dt, copy=False) if isinstance(d, np.ndarray) else d


def _loss_opts(layer: DagLayer) -> dict[str, Any]:
    opts = parse_opts(
        layer.block.get("opts", []),
        {
            "instanceweights": "instance_weights",
            "classweights": "class_weights",
            "threshold": "threshold",
            "topk": "top_k",
            "normalise": "normalise",
        },
        "vl_nnloss",
    )
    if "normalise" in opts:
        opts["normalise"] = bool(np.asarray(opts["normalise"]).ravel()[0])
    return opts


def _loss_type(layer: DagLayer) -> str:
    loss = layer.block.get("loss", "softmaxlog")
    if not isinstance(loss, str) or loss.lower() not in LOSSES:
        raise McnError(
            f"Expected block property 'loss' to be one of vl_nnloss's losses ({', '.join(LOSSES)}). "
            f"Received loss={loss!r}: a custom loss class the reference cannot run; remove the layer "
            f"(net.remove_layer({layer.name!r})) to evaluate the rest"
        )
    return loss


def _accumulate_average(layer: DagLayer, x: np.ndarray, y: Any) -> None:
    """dagnn.Loss.accumulateAverage: a running mean over the H*W*N positions seen."""
    if layer.block.get("ignore_average", False):
        return
    st = layer.state
    n = st.get("num_averaged", 0)
    h, w, _, batch = as_4d(x).shape
    m = n + h * w * batch
    y = np.asarray(y)
    if layer.block.get("normalise", True):
        st["average"] = (n * st.get("average", 0.0) + batch * y) / m
    else:
        st["average"] = (n * st.get("average", 0.0) + y) / m
    st["num_averaged"] = m


def _adapted_crops(sizes: list[tuple[int, ...]], crop: np.ndarray) -> list[int]:
    """dagnn.Crop.getAdaptedCrops: ``[top bottom left right]``, top = min(crop(1), H1-H2)."""
    cropv = sizes[0][0] - sizes[1][0]
    cropu = sizes[0][1] - sizes[1][1]
    cropv1 = max(0, cropv - int(crop[0]))
    cropu1 = max(0, cropu - int(crop[1]))
    out = [cropv - cropv1, cropv1, cropu - cropu1, cropu1]
    if min(out) < 0:
        raise McnError(
            f"Expected the first input ({sizes[0][0]} x {sizes[0][1]}) to be at least as large as the "
            f"second ({sizes[1][0]} x {sizes[1][1]}): dagnn.Crop cannot crop to a larger size"
        )
    return out


def _sum_dims(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``for k = find(sz == 1), a = sum(a, k) ; end`` (dagnn.Scale's backward)."""
    for k, s in enumerate(shape):
        if s == 1:
            a = a.sum(axis=k, keepdims=True)
    return a


def _pdist(layer: DagLayer, x: np.ndarray, x0: Any, dzdy: Any, iw: Any) -> Any:
    """vl_nnpdist (matlab/vl_nnpdist.m) with the block's p, noRoot, epsilon, aggregate."""
    b = layer.block
    p, eps = float(b.get("p", 2.0)), float(b.get("epsilon", 1e-6))
    dt = x.dtype
    d = x - as_4d(np.asarray(x0).astype(dt, copy=False))
    if dzdy is not None and iw is not None:
        dzdy = iw * dzdy
    if not b.get("no_root", False):
        if dzdy is None:
            if p == 1:
                y = np.abs(d).sum(axis=2, keepdims=True)
            elif p == 2:
                y = np.sqrt((d * d).sum(axis=2, keepdims=True))
            else:
                y = (np.abs(d) ** p).sum(axis=2, keepdims=True) ** (1 / p)
        elif p == 1:
            y = dzdy * np.sign(d)
        elif p == 2:
            y = dzdy * np.maximum((d * d).sum(axis=2, keepdims=True), dt.type(eps)) ** dt.type(-0.5) * d
        elif p < 1:
            t = (np.abs(d) ** p).sum(axis=2, keepdims=True) ** ((1 - p) / p)
            y = dzdy * t * (np.maximum(np.abs(d), dt.type(eps)) ** (p - 1) * np.sign(d))
        else:
            t = np.maximum((np.abs(d) ** p).sum(axis=2, keepdims=True), dt.type(eps)) ** ((1 - p) / p)
            y = dzdy * t * (np.abs(d) ** (p - 1) * np.sign(d))
    elif dzdy is None:
        if p == 1:
            y = np.abs(d).sum(axis=2, keepdims=True)
        elif p == 2:
            y = (d * d).sum(axis=2, keepdims=True)
        else:
            y = (np.abs(d) ** p).sum(axis=2, keepdims=True)
    elif p == 1:
        y = dzdy * np.sign(d)
    elif p == 2:
        y = 2 * dzdy * d
    elif p < 1:
        y = p * dzdy * (np.maximum(np.abs(d), dt.type(eps)) ** (p - 1) * np.sign(d))
    else:
        y = p * dzdy * (np.abs(d) ** (p - 1) * np.sign(d))
    y = np.asarray(y).astype(dt, copy=False)
    if dzdy is None:
        if iw is not None:
            y = iw * y
        if b.get("aggregate", True):
            y = np.asarray(y.sum(), dtype=dt).reshape(1, 1)
        return y
    return y, -y


def _spnorm_pool(a: np.ndarray, param: np.ndarray, dzdy: Any = None) -> np.ndarray:
    size = param[:2].astype(int)
    first = (size - 1) // 2
    pad = [int(first[0]), int(size[0] - 1 - first[0]), int(first[1]), int(size[1] - 1 - first[1])]
    return vl_nnpool(a, size, dzdy, method="avg", pad=pad)


def forward(layer: DagLayer, inputs: list, params: list, ctx: EvalContext) -> list:
    """The block's ``forward(inputs, params)``: the list of output values."""
    t, b = layer.type, layer.block
    if not supported(t):
        raise unsupported_block(layer)
    x = as_4d(inputs[0]) if t != "dagnn.Sum" else None
    dt = x.dtype if x is not None else np.asarray(inputs[0]).dtype
    if t == "dagnn.Conv":
        parse_opts(b.get("opts"), {}, "vl_nnconv")
        f = _cast(_param(params, 0, layer), dt)
        return [
            vl_nnconv(
                x, f, _cast(_bias(layer, params), dt), pad=b["pad"], stride=b["stride"], dilate=b["dilate"]
            )
        ]
    if t == "dagnn.ConvTranspose":
        parse_opts(b.get("opts"), {}, "vl_nnconvt")
        f = _cast(_param(params, 0, layer), dt)
        return [
            vl_nnconvt(
                x,
                f,
                _cast(_bias(layer, params), dt),
                upsample=b["upsample"],
                crop=b["crop"],
                num_groups=b["num_groups"],
            )
        ]
    if t == "dagnn.Pooling":
        parse_opts(b.get("opts"), {}, "vl_nnpool")
        return [vl_nnpool(x, b["pool_size"], method=b["method"], pad=b["pad"], stride=b["stride"])]
    if t == "dagnn.BatchNorm":
        parse_opts(b.get("opts"), {}, "vl_nnbnorm")
        g, beta = _cast(_param(params, 0, layer), dt), _cast(_param(params, 1, layer), dt)
        if ctx.mode == "test":
            m = _cast(_param(params, 2, layer), dt)
            return [vl_nnbnorm(x, g, beta, moments=m, epsilon=b["epsilon"])]
        y, layer.state["moments"] = vl_nnbnorm(x, g, beta, epsilon=b["epsilon"], return_moments=True)
        return [y]
    if t == "dagnn.ReLU":
        o = parse_opts(b.get("opts"), {"leak": "leak"}, "vl_nnrelu")
        return [vl_nnrelu(x, leak=o.get("leak", b["leak"]))]
    if t == "dagnn.Sigmoid":
        return [vl_nnsigmoid(x)]
    if t == "dagnn.SoftMax":
        return [vl_nnsoftmax(x)]
    if t == "dagnn.LRN":
        return [vl_nnnormalize(x, b["param"], exact=ctx.lrn_exact)]
    if t == "dagnn.DropOut":
        if ctx.mode == "test":
            return list(inputs)
        st = layer.state
        if b.get("frozen", False) and st.get("mask") is not None:
            return [vl_nndropout(x, mask=st["mask"])]
        y, st["mask"] = vl_nndropout(
            x, rate=b["rate"], mask=ctx.masks.get(layer.name), rng=ctx.rng, return_mask=True
        )
        return [y]
    if t == "dagnn.Sum":
        layer.state["num_inputs"] = len(inputs)
        y = as_4d(inputs[0])
        for k in range(1, len(inputs)):
            y = y + as_4d(inputs[k])
        return [y]
    if t == "dagnn.Concat":
        dim = int(b["dim"])
        if dim not in (1, 2, 3, 4):
            raise McnError(f"Expected block property 'dim' in 1..4. Received dim={dim}")
        xs = [as_4d(a) for a in inputs]
        layer.state["input_sizes"] = [a.shape for a in xs]
        return [np.concatenate(xs, axis=dim - 1)]
    if t == "dagnn.Crop":
        sizes = [as_4d(a).shape for a in inputs[:2]]
        layer.state["input_sizes"] = sizes
        top, bottom, left, right = _adapted_crops(sizes, b["crop"])
        return [x[top : x.shape[0] - bottom, left : x.shape[1] - right]]
    if t == "dagnn.Scale":
        args = [as_4d(a) for a in [*inputs, *params]]
        y = args[0] * args[1].astype(dt, copy=False)
        if b.get("has_bias", True):
            y = y + _param(args, 2, layer).astype(dt, copy=False)
        return [y]
    if t == "dagnn.Loss":
        y = vl_nnloss(x, _label(inputs, layer), loss=_loss_type(layer), **_loss_opts(layer))
        _accumulate_average(layer, x, y)
        return [y]
    if t == "dagnn.PDist":
        if len(inputs) not in (2, 3):
            raise McnError(f"Expected 2 or 3 inputs (x, x0[, instance weights]). Received {len(inputs)}")
        iw = as_4d(inputs[2]).astype(dt) if len(inputs) == 3 else None
        y = _pdist(layer, x, inputs[1], None, iw)
        _accumulate_average(layer, x, y)
        return [y]
    if t == "dagnn.NormOffset":
        p = b["param"]
        big_l = np.maximum((x * x).sum(axis=2, keepdims=True), dt.type(1e-8))
        return [x - dt.type(p[0]) * big_l ** dt.type(p[1])]
    if t == "dagnn.SpatialNorm":
        p = b["param"]
        f = 1 + dt.type(p[2]) * _spnorm_pool(x * x, p)
        return [f ** dt.type(-p[3]) * x]
    raise AssertionError(t)  # pragma: no cover - BLOCKS and this switch list the same types


def _label(inputs: list, layer: DagLayer) -> Any:
    if len(inputs) < 2:
        raise McnError(f"Expected 2 inputs (prediction, label). Received inputs={layer.inputs}")
    return inputs[1]


def backward(
    layer: DagLayer, inputs: list, params: list, der_outputs: list, ctx: EvalContext
) -> tuple[list, list]:
    """The block's ``backward(inputs, params, derOutputs)``: ``(derInputs, derParams)``,
    ``None`` where MatConvNet returns ``[]``."""
    t, b = layer.type, layer.block
    x = as_4d(inputs[0]) if t != "dagnn.Sum" else None
    dt = x.dtype if x is not None else np.asarray(inputs[0]).dtype
    dzdy = _dzdy(der_outputs[0], dt)
    if t in ("dagnn.Conv", "dagnn.ConvTranspose"):
        f = _cast(_param(params, 0, layer), dt)
        bias = _cast(_bias(layer, params), dt)
        if t == "dagnn.Conv":
            dx, df, db = vl_nnconv(x, f, bias, dzdy, pad=b["pad"], stride=b["stride"], dilate=b["dilate"])
        else:
            dx, df, db = vl_nnconvt(
                x, f, bias, dzdy, upsample=b["upsample"], crop=b["crop"], num_groups=b["num_groups"]
            )
        return [dx], [df, None if is_empty(db) else db]
    if t == "dagnn.Pooling":
        return [vl_nnpool(x, b["pool_size"], dzdy, method=b["method"], pad=b["pad"], stride=b["stride"])], []
    if t == "dagnn.BatchNorm":
        moments = layer.state.get("moments")
        if moments is None:
            raise McnError(
                "the backward pass of dagnn.BatchNorm needs the batch moments of a forward pass in mode "
                "'normal'; in mode 'test' there are none, and MatConvNet fails too ('vl_nnbnorm: The "
                "MOMENTS size does not match the DATA depth.'): evaluate in mode 'test' without "
                "der_outputs, or in mode 'normal'"
            )
        g, beta = _cast(_param(params, 0, layer), dt), _cast(_param(params, 1, layer), dt)
        dx, dg, db, dm = vl_nnbnorm(x, g, beta, dzdy, epsilon=b["epsilon"], moments=moments)
        layer.state["moments"] = None
        return [dx], [dg, db, dm]
    if t == "dagnn.ReLU":
        o = parse_opts(b.get("opts"), {"leak": "leak"}, "vl_nnrelu")
        return [vl_nnrelu(x, dzdy, leak=o.get("leak", b["leak"]))], []
    if t == "dagnn.Sigmoid":
        return [vl_nnsigmoid(x, dzdy)], []
    if t == "dagnn.SoftMax":
        return [vl_nnsoftmax(x, dzdy)], []
    if t == "dagnn.LRN":
        return [vl_nnnormalize(x, b["param"], dzdy, exact=ctx.lrn_exact)], []
    if t == "dagnn.DropOut":
        if ctx.mode == "test":
            return list(der_outputs), []
        return [vl_nndropout(x, dzdy, mask=layer.state.get("mask"))], []
    if t == "dagnn.Sum":
        n = layer.state.get("num_inputs", len(inputs))
        return [der_outputs[0]] * n, []
    if t == "dagnn.Concat":
        dim = int(b["dim"]) - 1
        sizes = layer.state.get("input_sizes") or [as_4d(a).shape for a in inputs]
        d = as_4d(dzdy)
        out, start = [], 0
        for s in sizes:
            index = [slice(None)] * 4
            index[dim] = slice(start, start + s[dim])
            out.append(d[tuple(index)])
            start += s[dim]
        return out, []
    if t == "dagnn.Crop":
        sizes = layer.state.get("input_sizes") or [as_4d(a).shape for a in inputs[:2]]
        top, bottom, left, right = _adapted_crops(sizes, b["crop"])
        d = as_4d(dzdy)
        dx = np.zeros(sizes[0], dtype=d.dtype)
        dx[top : sizes[0][0] - bottom, left : sizes[0][1] - right] = d
        return [dx, None], []
    if t == "dagnn.Scale":
        args = [as_4d(a).astype(dt, copy=False) for a in [*inputs, *params]]
        sz = args[1].shape
        d = as_4d(dzdy)
        dargs = [d * args[1], _sum_dims(d * args[0], sz)]
        if b.get("has_bias", True):
            dargs.append(_sum_dims(d, sz))
        # MATLAB's sums keep the summed dimensions as 1: the shape of args{2} (for a param,
        # the param's own shape once trailing singletons are restored)
        raw = [*inputs, *params]
        for k in (1, 2):
            if k < len(dargs) and k < len(raw) and np.size(raw[k]) == dargs[k].size:
                dargs[k] = dargs[k].reshape(np.shape(raw[k]))
        n = len(inputs)
        return dargs[:n], dargs[n : n + len(params)]
    if t == "dagnn.Loss":
        dx = vl_nnloss(x, _label(inputs, layer), dzdy, loss=_loss_type(layer), **_loss_opts(layer))
        return [dx, None], []
    if t == "dagnn.PDist":
        iw = as_4d(inputs[2]).astype(dt) if len(inputs) == 3 else None
        d1, d2 = _pdist(layer, x, inputs[1], dzdy, iw)
        return [d1, d2] + ([None] if len(inputs) == 3 else []), []
    if t == "dagnn.NormOffset":
        p = b["param"]
        big_l = np.maximum((x * x).sum(axis=2, keepdims=True), dt.type(1e-8))
        d = as_4d(dzdy)
        s = d.sum(axis=2, keepdims=True) * big_l ** dt.type(p[1] - 1)
        return [d - dt.type(2 * p[0] * p[1]) * x * s], []
    if t == "dagnn.SpatialNorm":
        p = b["param"]
        d = as_4d(dzdy)
        f = 1 + dt.type(p[2]) * _spnorm_pool(x * x, p)
        tt = _spnorm_pool(x * x, p, f ** dt.type(-p[3] - 1) * d * x)
        return [f ** dt.type(-p[3]) * d - dt.type(2 * p[2] * p[3]) * x * tt], []
    raise AssertionError(t)  # pragma: no cover
