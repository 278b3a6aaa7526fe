"""Where a planted bug changes a model's function, and whether a batch shows it: the
MatConvNet side of the bug catalogue (``harness.testing.bugs``), judged from the net and
the reference alone.

A site predicate ``(net, i, shapes) -> bool`` says whether the mistake planted at layer
``i`` changes the model's function for some input (``shapes``: ``layer_input_shapes``).
Observability runs the MatConvNet layers that compute what the buggy Keras layer computes
(a "variant") on the layer's input and asks whether the output differs, or, for a
mistake that a variant cannot express, looks at the reference's tensors directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from harness.equivalence.reference_pass import cast_net, run_reference
from harness.mcn.geometry import layer_output_shapes, window_output_length
from harness.mcn.net import Layer, Net
from harness.mcn.options import is_empty, pad4, pair
from harness.mcn.simplenn import Res, vl_simplenn, vl_simplenn_tidy
from harness.testing.planting import KERAS_BNORM_EPSILON, matlab_order_dense_kernel
from harness.translate.weights import dense_kernel, embed_groups, filters_of, split_groups

__all__ = [
    "LOSSES",
    "VISIBLE",
    "asymmetric_pad_site",
    "differs",
    "extra_relu_site",
    "filter_groups",
    "fully_connected_site",
    "has_filters",
    "kernel_observer",
    "last_body",
    "layer_input_shapes",
    "missing_relu_site",
    "observe_flatten_order",
    "observe_missing_groups",
    "observe_softmax_twice",
    "off_by_one_site",
    "reference",
    "run_variant",
    "softmax_twice_site",
    "stride_site",
    "variant_bnorm_epsilon",
    "variant_off_by_one",
    "variant_wrong_padding_side",
    "variant_wrong_stride",
    "variant_zero_padded_pooling",
]

LOSSES = ("softmaxloss", "loss")
# A batch shows a bug when the buggy computation differs by more than this (relative):
# far above float64 rounding, far below any real difference.
VISIBLE = 1e-6


# ------------------------------------------------------------------------------ net facts


def layer_input_shapes(net: Net) -> list[tuple[int, int, int]]:
    """The ``(H, W, C)`` input of every layer of a tidied net, from ``meta['inputSize']``."""
    return layer_output_shapes(net)[:-1]


def has_filters(layer: Layer) -> bool:
    return layer.type == "conv" and bool(layer.weights) and not is_empty(layer.weights[0])


def last_body(net: Net) -> int:
    """The index of the last layer before the loss (the last layer without one)."""
    return len(net.layers) - (2 if net.layers and net.layers[-1].type in LOSSES else 1)


def filter_groups(net: Net, i: int, shapes: list) -> int:
    return shapes[i][2] // filters_of(net.layers[i]).shape[2]


# ------------------------------------------------------------------------------ the reference


def reference(
    net: Net, x: np.ndarray, labels: Any, *, mode: str = "normal", dialect: str = "master", seed: int = 0
) -> list[Res]:
    """vl_simplenn's ``res`` as ``harness.compare`` computes it (float64 net, LRN with the
    exact power, dropout masks drawn from ``np.random.default_rng(seed)``, ``dzdy = 1``)."""
    net = cast_net(vl_simplenn_tidy(net), np.float64)
    return run_reference(net, np.asarray(x, np.float64), labels, mode=mode, dialect=dialect, seed=seed)


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` differ visibly (``VISIBLE``, relative to the larger)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return True
    scale = max(float(np.max(np.abs(b), initial=0.0)), float(np.max(np.abs(a), initial=0.0)))
    return bool(np.any(np.abs(a - b) > VISIBLE * scale))


def run_variant(layers: list[Layer], x: np.ndarray, mode: str) -> np.ndarray:
    """The output of the MatConvNet ``layers`` on ``x`` (``x`` itself for no layers)."""
    if not layers:
        return x
    return vl_simplenn(vl_simplenn_tidy(Net(layers)), x, mode=mode, lrn_exact=True)[-1].x


# ------------------------------------------------------------------------------ sites


def stride_site(net: Net, i: int, shapes: list) -> bool:
    """A strided conv or pool whose window, at stride 1, fits more than once along a
    strided axis (else stride 1 gives the same output)."""
    layer = net.layers[i]
    if layer.type == "conv" and not has_filters(layer):
        return False
    h, w, _ = shapes[i]
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    sy, sx = pair(layer.stride, "stride")
    if layer.type == "pool":
        (fh, fw), (dy, dx) = pair(layer.pool, "pool"), (1, 1)
    else:
        fh, fw = filters_of(layer).shape[:2]
        dy, dx = pair(layer.get("dilate", 1), "dilate")
    return (sy > 1 and window_output_length(h, fh, pt, pb, 1, dy) > 1) or (
        sx > 1 and window_output_length(w, fw, pl, pr, 1, dx) > 1
    )


def asymmetric_pad_site(net: Net, i: int, shapes: list) -> bool:
    layer = net.layers[i]
    if layer.type == "conv" and not has_filters(layer):
        return False
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    return pt != pb or pl != pr


def _leak(layer: Layer) -> float:
    return float(np.asarray(layer.get("leak", 0.0), dtype=float).ravel()[0]) if layer.type == "relu" else -1.0


def missing_relu_site(net: Net, i: int, shapes: list) -> bool:
    # Near another ReLU, leaving out either can give the same model on the batch (the
    # same leak; or values the first one leaves non-negative): a comparison by value
    # cannot say which one is missing, only that one is.
    # A pooling between two ReLUs may be the identity on the batch (a 1x1 window), so
    # ReLUs with only a pooling between them count as neighbours too.
    n = len(net.layers)
    near = [net.layers[j] for j in (i - 1, i + 1) if 0 <= j < n]
    near += [
        net.layers[j]
        for j, between in ((i - 2, i - 1), (i + 2, i + 1))
        if 0 <= j < n and net.layers[between].type == "pool"
    ]
    return all(l.type != "relu" for l in near)


def extra_relu_site(net: Net, i: int, shapes: list) -> bool:
    nxt = net.layers[i + 1].type if i + 1 < len(net.layers) else None
    return i <= last_body(net) and nxt not in ("relu", "dropout")


def softmax_twice_site(net: Net, i: int, shapes: list) -> bool:
    return i == len(net.layers) - 1 and shapes[i][2] >= 2


def fully_connected_site(net: Net, i: int, shapes: list) -> bool:
    """The last conv before the loss, its filters covering the whole input, with at least
    two of FH, FW, FC above 1 (else F(:) and F.reshape agree)."""
    layer = net.layers[i]
    if i != last_body(net) or not has_filters(layer):
        return False
    h, w, c = shapes[i]
    fh, fw, fc, _ = filters_of(layer).shape
    whole = (fh, fw, fc) == (h, w, c) and not any(pad4(layer.pad, "pad"))
    whole = whole and pair(layer.get("dilate", 1), "dilate") == (1, 1)
    return whole and sum(d > 1 for d in (fh, fw, fc)) >= 2


def off_by_one_site(net: Net, i: int, shapes: list) -> bool:
    if not net.layers or net.layers[-1].type not in LOSSES or i != last_body(net):
        return False
    return shapes[i + 1][2] >= 2


# ------------------------------------------------------------------------------ variants


def variant_zero_padded_pooling(net: Net, i: int) -> list[Layer]:
    layer = net.layers[i]
    pad = Layer("conv", "zero_pad", [np.zeros((0, 0)), np.zeros((0, 0))], pad=layer.pad)
    pool = layer.copy()
    pool.pad = 0.0
    return [pad, pool]


def variant_wrong_stride(net: Net, i: int) -> list[Layer]:
    layer = net.layers[i].copy()
    layer.stride = 1.0
    return [layer]


def variant_wrong_padding_side(net: Net, i: int) -> list[Layer]:
    layer = net.layers[i].copy()
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    layer.pad = np.array([[pb, pt, pr, pl]], float)
    return [layer]


def variant_bnorm_epsilon(net: Net, i: int) -> list[Layer]:
    layer = net.layers[i].copy()
    layer.epsilon = KERAS_BNORM_EPSILON
    return [layer]


def variant_off_by_one(net: Net, i: int) -> list[Layer]:
    k = layer_input_shapes(net)[i + 1][2]
    perm = np.roll(np.eye(k), 1, axis=0)[None, None]  # y_j = x_{(j+1) % K}
    return [net.layers[i].copy(), Layer("conv", "roll", [perm, np.zeros((0, 0))])]


# ------------------------------------------------------------------------------ observers


def observe_missing_groups(net: Net, res: list[Res], i: int, labels) -> bool:
    """The derivative of the Keras-only kernel entries (off the group blocks) is visible."""
    from harness.mcn.conv import vl_nnconv

    layer = net.layers[i]
    x = res[i].x
    f = filters_of(layer).astype(x.dtype)
    groups = x.shape[2] // f.shape[2]
    b = layer.weights[1] if len(layer.weights) > 1 and not is_empty(layer.weights[1]) else None
    b = None if b is None else np.asarray(b, x.dtype)
    opts = {"pad": layer.pad, "stride": layer.stride, "dilate": layer.get("dilate", 1)}
    _, dzdf, _ = vl_nnconv(x, embed_groups(f, groups), b, res[i + 1].dzdx, **opts)
    _, off_blocks = split_groups(dzdf, groups, f.shape)
    scale = float(np.max(np.abs(dzdf), initial=0.0))
    return scale > 0 and float(np.max(np.abs(off_blocks), initial=0.0)) > VISIBLE * scale


def kernel_observer(transform: Callable[[np.ndarray], np.ndarray]) -> Callable[..., bool]:
    """A weight-transfer bug shows when ``transform`` changes the layer's filters."""

    def observe(net: Net, res: list[Res], i: int, labels) -> bool:
        f = filters_of(net.layers[i]).astype(np.float64)
        return differs(transform(f), f)

    return observe


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def observe_softmax_twice(net: Net, res: list[Res], i: int, labels) -> bool:
    p = _softmax(np.asarray(res[i].x, np.float64))
    q = _softmax(p)
    lab = np.asarray(labels, np.float64).reshape(-1)
    # per-image labels: only labelled images enter the loss and its derivatives
    keep = lab > 0 if lab.size == p.shape[3] else np.ones(p.shape[3], bool)
    return differs(q[..., keep], p[..., keep])


def observe_flatten_order(net: Net, res: list[Res], i: int, labels) -> bool:
    f = filters_of(net.layers[i]).astype(np.float64)
    return differs(matlab_order_dense_kernel(f), dense_kernel(f))
