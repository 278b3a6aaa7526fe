"""Output sizes of MatConvNet's spatial layers, each formula written once.

``vl_nnconv``, ``vl_nnconvt`` and ``vl_nnpool`` take their output sizes from here, and so
does everything that needs a layer's output size without running it:
``layer_output_shapes`` gives the ``(H, W, C)`` entering every layer of a simplenn net.

Along one axis of ``n`` cells, a window of ``k`` taps ``d`` apart (dilation) spans
``(k - 1)*d + 1`` cells; with padding ``p0`` before and ``p1`` after and stride ``s``
it fits ``floor((n + p0 + p1 - (k - 1)*d - 1) / s) + 1`` times (``window_output_length``).
A transposed convolution runs that backwards: ``n`` inputs upsampled by ``u`` through a
window of ``k`` and cropped by ``c0`` and ``c1`` give ``(n - 1)*u - c0 - c1 + k`` outputs
(``transposed_output_length``).

Options come in MatConvNet's forms (a scalar or ``[Y X]``; ``[TOP BOTTOM LEFT RIGHT]``),
parsed by harness.mcn.options. Every check raises the McnError the op raises, naming the
argument; ``layer_output_shapes`` adds the layer (``layer 3 'conv2' (conv): ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.mcn.net import Layer, Net, layer_errors, layer_field, layer_weight, unknown_type
from harness.mcn.options import McnError, as_4d, pad4, pair, positive_integer

__all__ = [
    "DEFAULT_SPATIAL",
    "infer_input_size",
    "input_hwc",
    "conv_output_size",
    "convt_output_size",
    "empty_filters_error",
    "layer_output_shapes",
    "pool_output_size",
    "transposed_output_length",
    "window_output_length",
]

Shape = tuple[int, int, int]

# Layer types whose output has the shape of their input, and the losses (a 1 x 1 sum).
_SAME_SHAPE = ("normalize", "lrn", "softmax", "relu", "sigmoid", "dropout", "bnorm")
_LOSSES = ("loss", "softmaxloss")


def window_output_length(
    n: int, window: int, pad_before: int = 0, pad_after: int = 0, stride: int = 1, dilate: int = 1
) -> int:
    """How many times a window of ``window`` taps ``dilate`` apart fits, ``stride`` apart,
    along an axis of ``n`` cells padded by ``pad_before`` and ``pad_after`` (no checks)."""
    return (n + pad_before + pad_after - (window - 1) * dilate - 1) // stride + 1


def transposed_output_length(
    n: int, window: int, crop_before: int = 0, crop_after: int = 0, upsample: int = 1
) -> int:
    """Outputs of a transposed convolution along one axis: ``n`` inputs upsampled by
    ``upsample``, each spread over ``window`` cells, cropped (no checks)."""
    return (n - 1) * upsample - crop_before - crop_after + window


def _hwc(x_shape: Sequence[int]) -> Shape:
    h, w, c = (tuple(x_shape) + (1, 1, 1))[:3]
    return h, w, c


def conv_output_size(
    x_shape: Sequence[int], f_shape: Sequence[int] | None, pad: Any = 0, stride: Any = 1, dilate: Any = 1
) -> Shape:
    """``(Ho, Wo, K)`` of ``vl_nnconv(x, f, b, pad=, stride=, dilate=)`` for ``x`` of shape
    ``(H, W, C, ...)`` and filters ``(FH, FW, FC, K)``; ``f_shape`` None is ``f = []``
    (no filters: every stride-th padded pixel, ``(Ho, Wo, C)``, a 1 x 1 window).

    Checks, in vl_nnconv's order: the options; without filters, ``dilate`` 1; the filter
    depth FC divides C and the G = C / FC groups divide K; the dilated filter fits in the
    padded input.
    """
    pt, pb, pl, pr = pad4(pad, "pad")
    sy, sx = pair(stride, "stride")
    dy, dx = pair(dilate, "dilate")
    h, w, c = _hwc(x_shape)
    if f_shape is None:
        if (dy, dx) != (1, 1):
            raise McnError(f"Expected dilate=1 when f is empty (no filters). Received dilate={dilate!r}")
        return window_output_length(h, 1, pt, pb, sy), window_output_length(w, 1, pl, pr, sx), c
    f_shape = tuple(f_shape)
    fh, fw, fc, k = f_shape
    if c % fc != 0:
        raise McnError(
            f"Expected the filter depth f.shape[2] to divide the depth of x ({c}). Received f.shape={f_shape}"
        )
    groups = c // fc
    if k % groups != 0:
        raise McnError(
            f"Expected the number of filter groups ({groups} = {c} channels / depth {fc}) to divide the "
            f"number of filters f.shape[3]. Received f.shape={f_shape}"
        )
    ext_h, ext_w = (fh - 1) * dy + 1, (fw - 1) * dx + 1
    if h + pt + pb < ext_h or w + pl + pr < ext_w:
        raise McnError(
            f"Expected the (dilated) filter ({ext_h} x {ext_w}) to fit in the padded input "
            f"({h + pt + pb} x {w + pl + pr}). Received f.shape={f_shape}, x.shape={tuple(x_shape)}, "
            f"pad={pad!r}, dilate={dilate!r}"
        )
    return window_output_length(h, fh, pt, pb, sy, dy), window_output_length(w, fw, pl, pr, sx, dx), k


def empty_filters_error(f: Any) -> McnError:
    """vl_nnconvt's error for ``f = []`` (a transposed convolution needs filters)."""
    return McnError(f"Expected f to be a non-empty FH x FW x K x D filter bank. Received f={f!r}")


def convt_output_size(
    x_shape: Sequence[int],
    f_shape: Sequence[int] | None,
    upsample: Any = 1,
    crop: Any = 0,
    num_groups: Any = 1,
) -> Shape:
    """``(Hy, Wy, K*G)`` of ``vl_nnconvt(x, f, b, upsample=, crop=, num_groups=G)`` for
    ``x`` of shape ``(H, W, D, ...)`` and filters ``(FH, FW, K, D)``.

    Checks, in vl_nnconvt's order: the options; filters are given (``f_shape`` None is
    ``f = []``, refused); G divides the filter bank depth, which equals D; the crop leaves
    a non-empty output.
    """
    uy, ux = pair(upsample, "upsample")
    ct, cb, cl, cr = pad4(crop, "crop")
    groups = positive_integer(num_groups, "num_groups")
    if f_shape is None:
        raise empty_filters_error(None)
    h, w, d = _hwc(x_shape)
    f_shape = tuple(f_shape)
    fh, fw, k, fd = f_shape
    if fd % groups != 0:
        raise McnError(
            f"Expected num_groups to divide the filter bank depth f.shape[3] ({fd}). "
            f"Received num_groups={num_groups!r}"
        )
    if fd != d:
        raise McnError(f"Expected f.shape[3] to equal the depth of x ({d}). Received f.shape={f_shape}")
    hy, wy = transposed_output_length(h, fh, ct, cb, uy), transposed_output_length(w, fw, cl, cr, ux)
    if hy < 1 or wy < 1:
        raise McnError(f"Expected crop to leave a non-empty output. Received crop={crop!r}")
    return hy, wy, k * groups


def pool_output_size(x_shape: Sequence[int], pool: Any, pad: Any = 0, stride: Any = 1) -> Shape:
    """``(Ho, Wo, C)`` of ``vl_nnpool(x, pool, pad=, stride=)`` for ``x`` of shape
    ``(H, W, C, ...)``. Checks: the options, every pad smaller than the pool on its axis,
    the window fits in the padded input."""
    ph, pw = pair(pool, "pool")
    sy, sx = pair(stride, "stride")
    pt, pb, pl, pr = pad4(pad, "pad")
    if max(pt, pb) >= ph or max(pl, pr) >= pw:
        raise McnError(
            "Expected every pad to be smaller than the pool size on its axis (pad < pool). "
            f"Received pad={[pt, pb, pl, pr]}, pool={[ph, pw]}"
        )
    h, w, c = _hwc(x_shape)
    if h + pt + pb < ph or w + pl + pr < pw:
        raise McnError(
            "Expected the pooling window to fit in the padded input. "
            f"Received pool={[ph, pw]} with x.shape={tuple(x_shape)} and pad={[pt, pb, pl, pr]}"
        )
    return window_output_length(h, ph, pt, pb, sy), window_output_length(w, pw, pl, pr, sx), c


# ------------------------------------------------------------------------------ networks


def layer_output_shapes(net: Net, input_size: Any = None) -> list[Shape]:
    """The ``(H, W, C)`` entering each layer of ``net`` and, last, the net's output:
    ``len(net.layers) + 1`` shapes, as vl_simplenn's ``res[i].x`` would have them (a loss
    layer outputs 1 x 1 x 1). ``input_size`` is ``[H W C]`` (missing trailing sizes are
    1), by default ``net.meta['inputSize']``.

    The net is read as vl_simplenn reads it (tidied: ``vl_simplenn_tidy`` fills in the
    options' defaults). What decides the sizes is checked as the ops check it, and an
    error names the layer and the field: a layer type vl_simplenn does not run, a
    missing option field, options MatConvNet refuses, filters whose depth or number does
    not fit the channels, windows that do not fit.
    """
    shape = _input_size(net, input_size)
    shapes = [shape]
    for i, layer in enumerate(net.layers):
        with layer_errors(layer, i):
            shape = _layer_output(layer, i, shape)
        shapes.append(shape)
    return shapes


def input_hwc(value: Any, name: str) -> Shape:
    """``(H, W, C)`` from an ``[H W C]`` (or ``[H W C N]``: N is ignored) size: one to
    four positive integers, as numbers (a char array such as '123' is refused); missing
    trailing sizes are 1. An McnError names ``name`` otherwise."""
    from harness.mcn.simplenn import describe

    def number(v: Any) -> bool:
        return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)

    numeric = (
        number(value)
        or (isinstance(value, np.ndarray) and value.dtype.kind in "iuf")
        or (isinstance(value, list | tuple) and all(number(v) for v in value))
    )
    v = np.asarray(value, dtype=float).ravel() if numeric else np.zeros(0)
    if not 1 <= v.size <= 4 or not np.all(np.isfinite(v)) or np.any(v != np.round(v)) or np.any(v[:3] < 1):
        raise McnError(f"Expected {name} to be [H W C] (positive integers). Received {describe(value)}")
    return _hwc([int(s) for s in v[:3]])


def _input_size(net: Net, input_size: Any) -> Shape:
    name = "input_size"
    if input_size is None:
        name = "net.meta['inputSize']"
        input_size = net.meta.get("inputSize") if isinstance(net.meta, dict) else None
        if input_size is None:
            raise McnError("Expected input_size or net.meta['inputSize'] ([H W C]). Received neither")
    return input_hwc(input_size, name)


def _filter_shape(layer: Layer, i: int) -> tuple[int, ...] | None:
    f = layer_weight(layer, i, 0)
    return None if f is None else as_4d(f, "f").shape


def _layer_output(layer: Layer, i: int, shape: Shape) -> Shape:
    x_shape = (*shape, 1)  # one image: the errors read as vl_simplenn's on a batch of one
    t = layer.type
    if t == "conv":
        f_shape = _filter_shape(layer, i)
        pad, stride = layer_field(layer, i, "pad"), layer_field(layer, i, "stride")
        return conv_output_size(x_shape, f_shape, pad, stride, layer.get("dilate", 1))
    if t == "convt":
        f_shape = _filter_shape(layer, i)
        options = {key: layer_field(layer, i, key) for key in ("crop", "upsample", "num_groups")}
        return convt_output_size(x_shape, f_shape, **options)
    if t == "pool":
        pool, pad, stride = (layer_field(layer, i, key) for key in ("pool", "pad", "stride"))
        return pool_output_size(x_shape, pool, pad, stride)
    if t in _LOSSES:
        return 1, 1, 1
    if t in _SAME_SHAPE:
        return shape
    raise unknown_type(layer, i)


# the spatial size of a probe for a net that accepts any size (a fully convolutional
# net: denoisers, feature extractors)
DEFAULT_SPATIAL = 32
_LARGEST_SEARCHED = 4096


def infer_input_size(net: Net) -> tuple[Shape, str]:
    """``(H, W, C)`` for a net that does not say (no ``meta.inputSize``), and how it was
    found: the depth from the first filters (a conv's ``size(f, 3)``, one filter group
    assumed; a convt's ``size(f, 4)``; 1 without any), and the smallest square size every
    layer's window fits, or ``DEFAULT_SPATIAL`` when even 1 x 1 fits (a fully
    convolutional net). An McnError names the layer when no size up to 4096 fits."""
    from harness.mcn.simplenn import vl_simplenn_tidy

    net = vl_simplenn_tidy(net)
    depth, where = 1, "no filters: depth 1"
    for i, layer in enumerate(net.layers):
        if layer.type in ("conv", "convt"):
            f = _filter_shape(layer, i)
            if f is None:
                continue
            depth = int(f[2] if layer.type == "conv" else f[3])
            where = f"depth {depth} from the filters of layer {i + 1} '{layer.name}'"
            break

    def fits(s: int) -> bool:
        try:
            layer_output_shapes(net, [s, s, depth])
        except McnError:
            return False
        return True

    if fits(1):
        return (DEFAULT_SPATIAL, DEFAULT_SPATIAL, depth), (
            f"{where}; any size fits, {DEFAULT_SPATIAL} x {DEFAULT_SPATIAL} chosen"
        )
    hi = 2
    while not fits(hi):
        if hi >= _LARGEST_SEARCHED:
            layer_output_shapes(net, [hi, hi, depth])  # raises, naming the layer
        hi *= 2
    lo = hi // 2  # does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return (hi, hi, depth), f"{where}; {hi} x {hi}, the smallest size every layer fits"
