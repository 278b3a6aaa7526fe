"""Per-layer configuration findings: what a Keras layer is set up to do differently from
the MatConvNet layer it is aligned with (``harness.equivalence.align``).

Convolutions (kernel size, filters, groups, stride, dilation, padding, a fused activation,
a fully-connected conv as Flatten + Dense), transposed convolutions (kernel size, outputs,
groups, upsampling, crop), pooling (method, size, stride, padding), ReLU leak, bnorm
epsilon and momentum, dropout. A DagNN net reaches these rules through the simplenn view
of ``harness.diagnosis.dag_findings``. ``input_shapes`` gives each layer's input
size by MatConvNet's formulas, for the padding that Keras' ``'same'`` implies.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from harness.diagnosis.findings import Finding, fmt_value
from harness.equivalence.align import align, keras_kind
from harness.mcn.geometry import layer_output_shapes
from harness.mcn.net import Layer, Net
from harness.mcn.options import is_empty, pad4, pair

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment

__all__ = ["input_shapes", "layer_findings"]


def input_shapes(net: Net, input_size: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Input shape (H, W, C) of every layer, by MatConvNet's size formulas
    (``harness.mcn.geometry``)."""
    return layer_output_shapes(net, input_size)[:-1]


def layer_findings(
    net: Net, model: keras.Model, shapes: list[tuple[int, int, int]], *, alignment: Alignment | None = None
) -> list[Finding]:
    """The configuration findings of every aligned layer pair (``shapes``: each layer's
    input, from ``input_shapes``; ``alignment``: ``align(net, model)`` if not given)."""
    out: list[Finding] = []
    alignment = align(net, model) if alignment is None else alignment
    for problem in alignment.problems:
        out.append(
            Finding(
                "alignment", "", "model", "-", problem, "add or remove the layer so both run the same ops"
            )
        )
    for k, pair_ in enumerate(alignment.pairs):
        layer = net.layers[pair_.index]
        ks = [model.get_layer(n) for n in pair_.keras]
        main = model.get_layer(pair_.param_layer) if pair_.param_layer else None
        if layer.type in ("conv", "convt") and main is not None:
            if layer.type == "conv":
                found = _conv_findings(layer, main, ks, shapes[pair_.index])
            else:
                found = _convt_findings(layer, main, ks)
            nxt = alignment.pairs[k + 1] if k + 1 < len(alignment.pairs) else None
            if nxt is not None and nxt.fused_activation and _exact_fusion(net.layers[nxt.index]):
                # the fused activation is the next MatConvNet layer's, computed exactly
                found = [f for f in found if f.kind != "activation"]
            out += found
        elif layer.type == "pool":
            out += _pool_findings(layer, ks, shapes[pair_.index])
        elif layer.type == "relu" and pair_.keras or pair_.fused_activation == "relu":
            out += _relu_findings(layer, pair_, ks)
        elif layer.type == "bnorm" and main is not None:
            out += _bnorm_findings(layer, main)
        elif layer.type == "dropout":
            out += _dropout_findings(layer, pair_, ks)
    return out


def _relu_findings(layer: Layer, pair_, ks) -> list[Finding]:
    leak = float(np.asarray(layer.get("leak", 0.0)).ravel()[0]) if not is_empty(layer.get("leak", 0)) else 0.0
    k_leak = 0.0
    for k in ks:
        k_leak = float(getattr(k, "negative_slope", getattr(k, "leak", 0.0)) or 0.0)
    if abs(k_leak - leak) <= 1e-12 or not pair_.keras:
        return []
    return [
        Finding(
            "relu leak",
            layer.name,
            pair_.keras_label,
            fmt_value(leak),
            fmt_value(k_leak),
            f"ReLU(negative_slope={leak:g})",
        )
    ]


def _bnorm_findings(layer: Layer, main) -> list[Finding]:
    out = []
    eps = float(np.asarray(layer.get("epsilon", 1e-5)).ravel()[0])
    if abs(float(main.epsilon) - eps) > 1e-15:
        out.append(
            Finding(
                "bnorm epsilon",
                layer.name,
                main.name,
                fmt_value(eps),
                fmt_value(float(main.epsilon)),
                f"BatchNormalization(epsilon={eps:g})",
            )
        )
    lr = np.asarray(layer.get("learning_rate", []), dtype=float).ravel()
    if lr.size >= 3 and abs(float(main.momentum) - (1 - lr[2])) > 1e-12:
        out.append(
            Finding(
                "bnorm momentum",
                layer.name,
                main.name,
                f"moments averaged with rate {lr[2]:g}",
                f"momentum={float(main.momentum):g}",
                f"BatchNormalization(momentum={1 - lr[2]:g}) (MatConvNet averages sigma, Keras the variance)",
            )
        )
    return out


def _dropout_findings(layer: Layer, pair_, ks) -> list[Finding]:
    rate = float(np.asarray(layer.get("rate", 0.5)).ravel()[0])
    k_rate = next((float(k.rate) for k in ks if keras_kind(k) == "dropout"), None)
    if k_rate is None:
        return [
            Finding(
                "dropout",
                layer.name,
                "-",
                f"rate {rate:g}",
                "no Dropout layer",
                f"Dropout({rate:g}) (training only; identity at test time)",
            )
        ]
    if abs(k_rate - rate) > 1e-12:
        return [
            Finding(
                "dropout rate",
                layer.name,
                pair_.keras_label,
                fmt_value(rate),
                fmt_value(k_rate),
                f"Dropout({rate:g}). This matters in training: the rate decides how many units drop and "
                "the 1/(1-rate) scale; the comparison applies MatConvNet's own masks, so its verdict "
                "cannot see it",
            )
        ]
    return []


def _conv_findings(layer, main, ks, in_shape) -> list[Finding]:
    out = []
    f = np.asarray(layer.weights[0])
    f = f.reshape(f.shape + (1,) * (4 - f.ndim))
    fh, fw, fc, k = f.shape
    h, w, c = in_shape
    cls = type(main).__name__
    label = "+".join(x.name for x in ks)
    pads = pad4(layer.pad)
    stride = pair(layer.stride, "stride")
    dilate = pair(layer.get("dilate", 1), "dilate")
    groups = c // fc if fc and c % fc == 0 else 1
    if cls == "Dense":
        # a fully-connected conv: Flatten + Dense is exact only when the filter covers the input
        if (fh, fw) != (h, w) and (fh, fw) != (1, 1):
            out.append(
                Finding(
                    "kernel size",
                    layer.name,
                    label,
                    f"{fh}x{fw} filters on a {h}x{w} input",
                    "Dense (covers the whole input)",
                    "use Conv2D for a conv smaller than its input",
                )
            )
        units = int(main.units)
        if units != k:
            out.append(Finding("filters", layer.name, label, str(k), str(units), f"Dense({k})"))
        if groups > 1:
            out.append(
                Finding(
                    "groups",
                    layer.name,
                    label,
                    f"{groups} filter groups",
                    "1 (Dense has no groups)",
                    f"Conv2D({k}, 1, groups={groups}) instead of Dense",
                )
            )
        if fh * fw > 1:
            out.append(
                Finding(
                    "flatten order",
                    layer.name,
                    label,
                    f"filters {fh}x{fw}x{fc}x{k}",
                    "Flatten + Dense",
                    "load the kernel as F.reshape(-1, K) (row-major H, W, C as Keras' Flatten); "
                    "MATLAB's F(:) is column-major",
                )
            )
        return out
    ksize = tuple(getattr(main, "kernel_size", (fh, fw)))
    if ksize != (fh, fw):
        out.append(
            Finding(
                "kernel size",
                layer.name,
                label,
                fmt_value((fh, fw)),
                fmt_value(ksize),
                f"kernel_size=({fh}, {fw})",
            )
        )
    kfilters = getattr(main, "filters", k)
    if kfilters != k:
        out.append(Finding("filters", layer.name, label, str(k), str(kfilters), f"filters={k}"))
    kgroups = int(getattr(main, "groups", 1) or 1)
    if kgroups != groups:
        out.append(
            Finding(
                "groups",
                layer.name,
                label,
                f"{groups} filter groups ({fc}-deep filters on {c} channels)",
                str(kgroups),
                f"Conv2D(..., groups={groups})",
            )
        )
    kstride = tuple(getattr(main, "strides", (1, 1)))
    sub = next((x for x in ks if type(x).__name__ == "Subsample"), None)
    if sub is not None:
        kstride = tuple(sub.strides)
    if kstride != stride:
        out.append(
            Finding("stride", layer.name, label, fmt_value(stride), fmt_value(kstride), f"strides={stride}")
        )
    kdil = tuple(getattr(main, "dilation_rate", (1, 1)))
    if kdil != dilate:
        out.append(
            Finding(
                "dilation", layer.name, label, fmt_value(dilate), fmt_value(kdil), f"dilation_rate={dilate}"
            )
        )
    kpads = _keras_pads(ks, main, (fh, fw), stride, (h, w))
    if kpads is not None and tuple(kpads) != tuple(pads):
        side = " (sides swapped)" if sorted(kpads) == sorted(pads) and any(pads) else ""
        out.append(
            Finding(
                "padding",
                layer.name,
                label,
                f"[T B L R] {fmt_value(pads)}",
                f"{fmt_value(kpads)}{side}",
                f"ZeroPadding2D((({pads[0]}, {pads[1]}), ({pads[2]}, {pads[3]}))) + padding='valid'",
            )
        )
    return out + _activation_findings(layer, main, label)


def _activation_findings(layer: Layer, main, label: str) -> list[Finding]:
    """An activation fused into the Keras layer of a conv or a transposed conv."""
    act = getattr(getattr(main, "activation", None), "__name__", "linear")
    if act in ("linear", "identity"):
        return []
    return [
        Finding(
            "activation",
            layer.name,
            label,
            "none inside the conv (a separate layer follows, or none)",
            f"activation='{act}' fused",
            "check that MatConvNet has this activation next",
        )
    ]


def _convt_findings(layer: Layer, main, ks) -> list[Finding]:
    """A transposed conv (``vl_nnconvt``, filters ``FH x FW x K x D``): kernel size, the
    ``K * numGroups`` outputs, the groups, the upsampling as strides, padding ``'valid'``
    and the crop (MatConvNet's, plus the rows Keras adds when the filters are smaller than
    the upsampling, as ``harness.translate`` crops them)."""
    f = np.asarray(layer.weights[0])
    fh, fw, k, _ = f.reshape(f.shape + (1,) * (4 - f.ndim)).shape
    num_groups = layer.get("num_groups", 1)
    groups = 1 if is_empty(num_groups) else int(np.asarray(num_groups, dtype=float).ravel()[0])
    up = pair(layer.get("upsample", 1), "upsample")
    t, b, l, r = pad4(layer.get("crop", 0), "crop")
    crop = (t, b + max(up[0] - fh, 0), l, r + max(up[1] - fw, 0))
    kcrop = (0, 0, 0, 0)
    for x in ks:
        if type(x).__name__ == "Cropping2D":
            (ct, cb), (cl, cr) = x.cropping
            kcrop = (kcrop[0] + ct, kcrop[1] + cb, kcrop[2] + cl, kcrop[3] + cr)
    kgroups = int(getattr(main, "groups", 1) or 1)
    label = "+".join(x.name for x in ks)
    checks = (
        ("kernel size", (fh, fw), tuple(getattr(main, "kernel_size", (fh, fw))), f"kernel_size=({fh}, {fw})"),
        ("filters", k * groups, int(getattr(main, "filters", k)) * kgroups, f"{k * groups} output channels"),
        ("groups", groups, kgroups, f"harness.translate.layers.GroupedConv2DTranspose(..., groups={groups})"),
        ("upsampling", up, tuple(getattr(main, "strides", up)), f"strides={up}"),
        ("padding", "valid", getattr(main, "padding", "valid"), "padding='valid', then Cropping2D"),
        ("crop", crop, kcrop, f"Cropping2D((({crop[0]}, {crop[1]}), ({crop[2]}, {crop[3]})))"),
    )
    out = [
        Finding(kind, layer.name, label, fmt_value(mcn), fmt_value(keras_value), fix)
        for kind, mcn, keras_value, fix in checks
        if mcn != keras_value
    ]
    return out + _activation_findings(layer, main, label)


def _keras_pads(ks, main, ksize, stride, in_hw) -> tuple[int, int, int, int] | None:
    pads = [0, 0, 0, 0]
    for x in ks:
        if type(x).__name__ == "ZeroPadding2D":
            (t, b), (l, r) = x.padding
            pads = [pads[0] + t, pads[1] + b, pads[2] + l, pads[3] + r]
    if getattr(main, "padding", "valid") == "same":
        # TensorFlow's 'same': total = max((ceil(n/s)-1)*s + k - n, 0), the extra on the bottom/right
        extra = []
        for n, k, s in zip(in_hw, ksize, stride, strict=True):
            total = max((math.ceil(n / s) - 1) * s + k - n, 0)
            extra.append((total // 2, total - total // 2))
        pads = [pads[0] + extra[0][0], pads[1] + extra[0][1], pads[2] + extra[1][0], pads[3] + extra[1][1]]
    return tuple(pads)


def _exact_fusion(layer: Layer) -> bool:
    """A MatConvNet layer a Keras ``activation=`` computes exactly: a ReLU without leak,
    a sigmoid, a softmax."""
    if layer.type == "relu":
        return float(np.asarray(layer.get("leak", 0.0) or 0.0, dtype=float).ravel()[0]) == 0.0
    return layer.type in ("sigmoid", "softmax")


def reachable_pads(pads, pool, stride, in_hw) -> tuple[int, int, int, int]:
    """The part of MatConvNet's ``[T B L R]`` padding some pooling window reaches: a
    bottom or right pad that the last window ends before changes nothing."""
    (ph, pw), (sh, sw), (h, w) = pool, stride, in_hw
    t, b, l, r = pads

    def reached(n, before, after, p, s):
        out = (n + before + after - p) // s + 1
        return max(0, (out - 1) * s - before + p - n)

    return (t, min(b, reached(h, t, b, ph, sh)), l, min(r, reached(w, l, r, pw, sw)))


def _pool_findings(layer, ks, in_shape=None) -> list[Finding]:
    out = []
    label = "+".join(x.name for x in ks) or "-"
    main = next((x for x in ks if keras_kind(x) == "pool"), None)
    if main is None:
        return out
    method = layer.get("method", "max")
    cls = type(main).__name__
    k_method = {"MaxPooling2D": "max", "AveragePooling2D": "avg"}.get(cls, getattr(main, "method", "?"))
    if k_method != method:
        out.append(Finding("pooling method", layer.name, label, method, k_method, f"{method} pooling"))
    for kind, mcn, keras_value, arg in (
        ("pool size", pair(layer.pool, "pool"), tuple(main.pool_size), "pool_size"),
        ("stride", pair(layer.stride, "stride"), tuple(main.strides), "strides"),
    ):
        if keras_value != mcn:
            out.append(
                Finding(kind, layer.name, label, fmt_value(mcn), fmt_value(keras_value), f"{arg}={mcn}")
            )
    pads = pad4(layer.pad)
    if in_shape is not None:
        pads = reachable_pads(pads, pair(layer.pool, "pool"), pair(layer.stride, "stride"), in_shape[:2])
    zero_pad = (
        any(type(x).__name__ == "ZeroPadding2D" for x in ks) or getattr(main, "padding", "valid") == "same"
    )
    if any(pads) and cls != "MatConvNetPooling":
        out.append(
            Finding(
                "pooling padding",
                layer.name,
                label,
                f"pad {fmt_value(pads)} as clipped windows",
                "zero padding" if zero_pad else "no padding",
                "harness.translate.layers.MatConvNetPooling (max ignores padding; avg divides by the "
                "real cells)",
            )
        )
    elif not any(pads) and zero_pad:
        out.append(Finding("pooling padding", layer.name, label, "no padding", "padded", "padding='valid'"))
    return out
