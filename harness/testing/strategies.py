"""Hypothesis strategies for MatConvNet simplenn networks and their inputs.

In the style of ``hypothesis.extra.numpy``: every strategy takes keyword-only arguments
with documented defaults, validates them when it is called (``InvalidArgument`` naming
the bad argument) and draws values that are valid by construction -- no ``assume`` and
no ``filter``. Each layer strategy is told the shape of its input and draws only options
for which MatConvNet accepts that input (the window fits the padded input, the output is
at least 1 x 1, pad < pool, the filter groups divide the channels and the filters), and
returns a ``LayerSpec``: the tidied ``Layer`` and its output shape ``(H, W, C)``.

Numbers come from NumPy generators seeded by a drawn integer, not from Hypothesis'
float strategies: weights and data are well scaled standard-normal draws, and every
drawn value is a continuous random number (no hand-picked zeros or duplicates).

Shrinking: towards fewer hidden layers, layer types earlier in ``layer_types`` (relu
first; Hypothesis shrinks the sequence of choices, so a type that takes fewer draws can
win over an earlier one), smaller inputs and fewer channels, 1 x 1 kernels without
padding, dilation or stride, one filter group, max pooling with 1 x 1 windows, a plain
ReLU, a fully-connected classifier with two classes, a ``softmaxloss`` layer, batches of
one image, and seed 0 for the weights and the data (a different draw, not smaller
numbers). The minimal net is ``classifier`` (1x1x1x2 filters) + ``loss`` on a 1 x 1 x 1
input.

Max pooling and ties. MatConvNet sends a max-pooling derivative to the first maximum of
its window in column-major order; TensorFlow's MaxPooling2D to the first in row-major
order. They disagree only when a window holds its maximum more than once and the two
scans meet different copies first. Among continuous random values exact ties have
probability ~0, but networks make exact duplicates themselves: a plain ReLU (or dropout
in 'normal' mode) writes exact zeros, overlapping max-pooling windows copy one value
into neighbouring outputs, and a conv whose window lies entirely in the padding outputs
its bias all around the border -- a 1x1 conv padded by 1 followed by a 2 x 2 max pool
puts three copies of the bias in the bottom-right window, and there the scans disagree.
These strategies do not avoid such nets -- they are ordinary ones -- so whoever
compares max pooling on them has to reproduce MatConvNet's tie rule (the faithful
translation does: ``harness.translate.layers.MatConvNetPooling``) or compare tie-aware.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.mcn.geometry import window_output_length
from harness.mcn.net import Layer, Net
from harness.mcn.simplenn import vl_simplenn_tidy

__all__ = [
    "BODY_TYPES",
    "LayerSpec",
    "bnorm_layers",
    "classifier_layers",
    "conv_layers",
    "dropout_layers",
    "lrn_layers",
    "net_inputs",
    "pool_layers",
    "relu_layers",
    "sigmoid_layers",
    "simplenn_nets",
]

# Hidden-layer types, in shrinking order (a failing net shrinks towards the first ones).
BODY_TYPES = ("relu", "conv", "pool", "sigmoid", "bnorm", "lrn", "dropout")
LOSS_TYPES = ("softmaxloss", "loss")

_SEEDS = st.integers(0, 2**32 - 1)
_MAX_PAD = 2  # conv padding per side
_MAX_KERNEL = 5
_MAX_POOL = 4
_MAX_STRIDE = 3
_MAX_CLASSES = 5


class LayerSpec(NamedTuple):
    """A drawn layer and the shape ``(H, W, C)`` of its output."""

    layer: Layer
    output_shape: tuple[int, int, int]


# ------------------------------------------------------------------------------ validation


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InvalidArgument(f"Expected {name} to be an integer >= {minimum}. Received {name}={value!r}")
    return int(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidArgument(f"Expected {name} to be True or False. Received {name}={value!r}")
    return bool(value)


def _check_shape(value: Any, name: str, max_side: int | None = None) -> tuple[int, int, int]:
    try:
        shape = tuple(value)
    except TypeError:
        shape = ()
    if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in shape):
        raise InvalidArgument(f"Expected {name} to be (H, W, C), three integers. Received {name}={value!r}")
    if min(shape) < 1:
        raise InvalidArgument(f"Expected {name} to hold positive sizes. Received {name}={value!r}")
    if max_side is not None and max(shape[:2]) > max_side:
        raise InvalidArgument(
            f"Expected {name} to have H and W <= max_side={max_side}. Received {name}={value!r}"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def _check_dtype(value: Any, name: str = "dtype") -> np.dtype:
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InvalidArgument(f"Expected {name} to be float32 or float64. Received {name}={value!r}")
    return dt


def _check_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"Expected name to be a non-empty string. Received name={value!r}")
    return value


# ------------------------------------------------------------------------------ geometry


@st.composite
def _side_geometry(draw, size: int, max_side: int, max_pad: int | None, max_window: int, dilated: bool):
    """One axis of a conv (``max_pad`` given) or pool (pad < window): (window, dilate,
    pad_before, pad_after, stride), the window fitting the padded input and the output
    between 1 and ``max_side`` long. Shrinks to (1, 1, 0, 0, 1)."""
    dilate = draw(st.integers(1, 2)) if dilated else 1
    pad_cap = max_pad if max_pad is not None else max_window - 1
    # the dilated window must fit size + both pads
    window = draw(st.integers(1, max(1, min(max_window, (size + 2 * pad_cap - 1) // dilate + 1))))
    ext = (window - 1) * dilate + 1
    cap = max_pad if max_pad is not None else window - 1  # pool: pad < pool
    # before + after >= ext - size (fits) and size + before + after - ext + 1 <= max_side
    room = max_side - size + ext - 1
    before = draw(st.integers(max(0, ext - size - cap), min(cap, room)))
    after = draw(st.integers(max(0, ext - size - before), min(cap, room - before)))
    stride = draw(st.integers(1, _MAX_STRIDE))
    out = window_output_length(size, window, before, after, stride, dilate)
    return window, dilate, before, after, stride, out


def _row(values) -> np.ndarray:
    return np.array([list(values)], dtype=float)


# ------------------------------------------------------------------------------ layers


def conv_layers(
    *,
    input_shape: tuple[int, int, int],
    filters: int | None = None,
    max_filters: int = 8,
    max_side: int = 12,
    groups: bool = True,
    name: str = "conv",
    dtype: Any = np.float64,
) -> st.SearchStrategy[LayerSpec]:
    """A ``conv`` layer on an ``input_shape`` input: kernel up to 5 x 5, pads ``[T B L R]``
    of 0..2 each (asymmetric), stride 1..3 per axis, dilation 1..2 per axis, and with
    ``groups`` implicit filter groups G (a divisor of the input channels that divides
    the filters; filter depth C / G). ``filters`` fixes K, else K is 1..``max_filters``
    (a multiple of G). The bias is empty about half the time. Output sides stay within
    ``max_side``. Weights: ``randn * sqrt(2 / (FH*FW*FC))``, biases ``0.1 * randn``.

    Shrinks towards a 1 x 1 kernel, no pad, stride or dilation, one group, one filter.
    """
    max_side = _check_int(max_side, "max_side", 1)
    h, w, c = _check_shape(input_shape, "input_shape", max_side)
    if filters is not None:
        filters = _check_int(filters, "filters", 1)
    max_filters = _check_int(max_filters, "max_filters", 1)
    groups = _check_bool(groups, "groups")
    name = _check_name(name)
    dt = _check_dtype(dtype)
    return _conv(h, w, c, filters, max_filters, max_side, groups, name, dt)


@st.composite
def _conv(draw, h, w, c, filters, max_filters, max_side, groups, name, dt):
    kh, dy, pt, pb, sy, ho = draw(_side_geometry(h, max_side, _MAX_PAD, _MAX_KERNEL, True))
    kw, dx, pl, pr, sx, wo = draw(_side_geometry(w, max_side, _MAX_PAD, _MAX_KERNEL, True))
    if filters is not None:
        options = [g for g in range(1, c + 1) if c % g == 0 and filters % g == 0] if groups else [1]
        g = draw(st.sampled_from(options))
        k = filters
    else:
        options = [g for g in range(1, c + 1) if c % g == 0 and g <= max_filters] if groups else [1]
        g = draw(st.sampled_from(options))
        k = g * draw(st.integers(1, max(1, max_filters // g)))
    empty_bias = draw(st.booleans())
    rng = np.random.default_rng(draw(_SEEDS))
    fc = c // g
    f = (rng.standard_normal((kh, kw, fc, k)) * np.sqrt(2.0 / (kh * kw * fc))).astype(dt)
    b = np.zeros((0, 0), dt) if empty_bias else (0.1 * rng.standard_normal((1, k))).astype(dt)
    layer = Layer(
        "conv",
        name,
        [f, b],
        pad=_row([pt, pb, pl, pr]),
        stride=_row([sy, sx]),
        dilate=_row([dy, dx]),
    )
    return LayerSpec(layer, (ho, wo, k))


def classifier_layers(
    *,
    input_shape: tuple[int, int, int],
    classes: int | None = None,
    max_side: int = 12,
    name: str = "classifier",
    dtype: Any = np.float64,
) -> st.SearchStrategy[LayerSpec]:
    """The conv that produces K class scores (``classes`` fixes K, else 2..5): usually
    'fully connected' -- the filters cover the whole input, giving 1 x 1 x K -- and
    otherwise any ``conv_layers`` conv with K filters (scores at several pixels, which
    the loss sums). Shrinks towards the fully-connected form and two classes."""
    max_side = _check_int(max_side, "max_side", 1)
    h, w, c = _check_shape(input_shape, "input_shape", max_side)
    if classes is not None:
        classes = _check_int(classes, "classes", 1)
    name = _check_name(name)
    dt = _check_dtype(dtype)
    return _classifier(h, w, c, classes, max_side, name, dt)


@st.composite
def _classifier(draw, h, w, c, classes, max_side, name, dt):
    k = classes if classes is not None else draw(st.integers(2, _MAX_CLASSES))
    if draw(st.booleans()):
        return draw(_conv(h, w, c, k, k, max_side, True, name, dt))
    rng = np.random.default_rng(draw(_SEEDS))
    f = (rng.standard_normal((h, w, c, k)) * np.sqrt(2.0 / (h * w * c))).astype(dt)
    b = (0.1 * rng.standard_normal((1, k))).astype(dt)
    layer = Layer("conv", name, [f, b], pad=0.0, stride=1.0, dilate=1.0)
    return LayerSpec(layer, (1, 1, k))


def pool_layers(
    *, input_shape: tuple[int, int, int], max_side: int = 12, name: str = "pool"
) -> st.SearchStrategy[LayerSpec]:
    """A ``pool`` layer: 'max' or 'avg', window 1..4 per axis, pads ``[T B L R]`` each
    smaller than the window on its axis (MatConvNet's pad < pool), stride 1..3.
    Shrinks towards 1 x 1 max pooling without pad or stride."""
    max_side = _check_int(max_side, "max_side", 1)
    h, w, c = _check_shape(input_shape, "input_shape", max_side)
    name = _check_name(name)
    return _pool(h, w, c, max_side, name)


@st.composite
def _pool(draw, h, w, c, max_side, name):
    method = draw(st.sampled_from(["max", "avg"]))
    ph, _, pt, pb, sy, ho = draw(_side_geometry(h, max_side, None, _MAX_POOL, False))
    pw, _, pl, pr, sx, wo = draw(_side_geometry(w, max_side, None, _MAX_POOL, False))
    layer = Layer(
        "pool", name, method=method, pool=_row([ph, pw]), pad=_row([pt, pb, pl, pr]), stride=_row([sy, sx])
    )
    return LayerSpec(layer, (ho, wo, c))


def relu_layers(*, input_shape: tuple[int, int, int], name: str = "relu") -> st.SearchStrategy[LayerSpec]:
    """A ``relu`` layer, leak 0 or one of 0.01, 0.1, 0.2, 0.5. Shrinks towards leak 0."""
    shape = _check_shape(input_shape, "input_shape")
    name = _check_name(name)
    leaks = st.sampled_from([0.0, 0.1, 0.01, 0.2, 0.5])
    return leaks.map(lambda leak: LayerSpec(Layer("relu", name, leak=leak), shape))


def sigmoid_layers(
    *, input_shape: tuple[int, int, int], name: str = "sigmoid"
) -> st.SearchStrategy[LayerSpec]:
    """A ``sigmoid`` layer."""
    shape = _check_shape(input_shape, "input_shape")
    name = _check_name(name)
    return st.builds(lambda: LayerSpec(Layer("sigmoid", name), shape))


def bnorm_layers(
    *, input_shape: tuple[int, int, int], name: str = "bnorm", dtype: Any = np.float64
) -> st.SearchStrategy[LayerSpec]:
    """A ``bnorm`` layer: gains ``1 + 0.2 randn``, biases ``0.1 randn`` (C x 1 each),
    moments ``[mu sigma]`` (C x 2, mu ``0.5 randn``, sigma in [0.5, 1.5) -- the stored
    statistics 'test' mode uses), epsilon 1e-5 (tidy's) or 1e-4 (vl_nnbnorm's)."""
    _, _, c = shape = _check_shape(input_shape, "input_shape")
    name = _check_name(name)
    dt = _check_dtype(dtype)

    def build(epsilon: float, seed: int) -> LayerSpec:
        rng = np.random.default_rng(seed)
        g = (1 + 0.2 * rng.standard_normal((c, 1))).astype(dt)
        b = (0.1 * rng.standard_normal((c, 1))).astype(dt)
        m = np.concatenate([0.5 * rng.standard_normal((c, 1)), 0.5 + rng.random((c, 1))], axis=1).astype(dt)
        layer = Layer(
            "bnorm",
            name,
            [g, b, m],
            epsilon=epsilon,
            learning_rate=_row([2, 1, 0.05]),
            weight_decay=_row([0, 0, 0]),
        )
        return LayerSpec(layer, shape)

    return st.builds(build, st.sampled_from([1e-5, 1e-4]), _SEEDS)


def lrn_layers(*, input_shape: tuple[int, int, int], name: str = "lrn") -> st.SearchStrategy[LayerSpec]:
    """A ``lrn`` layer, ``param = [N KAPPA ALPHA BETA]`` with N 1..5 (odd or even),
    KAPPA 1 or 2, ALPHA 1e-4/5 (tidy's), 0.1 or 0.5 (large enough to matter), BETA 0.75
    or 0.5. Shrinks towards [1 1 2e-5 0.75]."""
    shape = _check_shape(input_shape, "input_shape")
    name = _check_name(name)

    def build(depth, kappa, alpha, beta):
        return LayerSpec(Layer("lrn", name, param=_row([depth, kappa, alpha, beta])), shape)

    return st.builds(
        build,
        st.integers(1, 5),
        st.sampled_from([1.0, 2.0]),
        st.sampled_from([0.0001 / 5, 0.1, 0.5]),
        st.sampled_from([0.75, 0.5]),
    )


def dropout_layers(
    *, input_shape: tuple[int, int, int], name: str = "dropout"
) -> st.SearchStrategy[LayerSpec]:
    """A ``dropout`` layer, rate 0.5 (tidy's), 0.25 or 0.1."""
    shape = _check_shape(input_shape, "input_shape")
    name = _check_name(name)
    return st.sampled_from([0.5, 0.25, 0.1]).map(
        lambda rate: LayerSpec(Layer("dropout", name, rate=rate), shape)
    )


# ------------------------------------------------------------------------------ nets


def simplenn_nets(
    *,
    max_layers: int = 6,
    input_size: tuple[int, int, int] | None = None,
    max_side: int = 12,
    max_channels: int = 8,
    layer_types: tuple[str, ...] = BODY_TYPES,
    loss: bool = True,
    bnorm: bool = True,
    lrn: bool = True,
    dropout: bool = True,
    dtype: Any = np.float64,
) -> st.SearchStrategy[Net]:
    """Tidied simplenn nets: up to ``max_layers`` hidden layers drawn from
    ``layer_types`` (default: relu, conv, pool, sigmoid, bnorm, lrn, dropout; ``bnorm``,
    ``lrn`` and ``dropout`` set to False remove those types), then a classifier conv
    producing K = 2..5 class scores, then (with ``loss``) a 'softmaxloss' or 'loss'
    layer. ``input_size`` fixes ``(H, W, C)``, else H and W are drawn in
    1..``max_side`` and C in 1..4; sides stay within ``max_side`` and channels within
    ``max_channels`` throughout. ``net.meta['inputSize']`` is ``[H W C]``; parameters
    are in ``dtype``. Layer names: ``conv1``, ``relu1``, ``pool1`` ..., ``classifier``,
    ``loss``.

    Shrinks towards fewer hidden layers, earlier entries of ``layer_types``, a smaller
    input, and each layer's simplest options (see the layer strategies).
    """
    max_layers = _check_int(max_layers, "max_layers", 0)
    max_side = _check_int(max_side, "max_side", 1)
    max_channels = _check_int(max_channels, "max_channels", 1)
    if input_size is not None:
        input_size = _check_shape(input_size, "input_size", max_side)
    if isinstance(layer_types, str) or not isinstance(layer_types, tuple | list):
        raise InvalidArgument(
            f"Expected layer_types to be a tuple of layer types from {BODY_TYPES}. "
            f"Received layer_types={layer_types!r}"
        )
    unknown = [t for t in layer_types if t not in BODY_TYPES]
    if unknown:
        raise InvalidArgument(
            f"Expected layer_types to hold only {BODY_TYPES}. Received layer_types={layer_types!r}"
        )
    loss = _check_bool(loss, "loss")
    flags = {"bnorm": _check_bool(bnorm, "bnorm"), "lrn": _check_bool(lrn, "lrn")}
    flags["dropout"] = _check_bool(dropout, "dropout")
    dt = _check_dtype(dtype)
    types = tuple(dict.fromkeys(t for t in layer_types if flags.get(t, True)))
    return _nets(max_layers, input_size, max_side, max_channels, types, loss, dt)


@st.composite
def _nets(draw, max_layers, input_size, max_side, max_channels, types, loss, dt):
    if input_size is None:
        shape = (
            draw(st.integers(1, max_side)),
            draw(st.integers(1, max_side)),
            draw(st.integers(1, min(4, max_channels))),
        )
    else:
        shape = input_size
    h0, w0, c0 = shape
    layers: list[Layer] = []
    counts: dict[str, int] = {}
    n_hidden = draw(st.integers(0, max_layers)) if types else 0
    for _ in range(n_hidden):
        kind = draw(st.sampled_from(types))
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{kind}{counts[kind]}"
        if kind == "conv":
            spec = draw(_conv(*shape, None, max_channels, max_side, True, name, dt))
        elif kind == "pool":
            spec = draw(_pool(*shape, max_side, name))
        elif kind == "relu":
            spec = draw(relu_layers(input_shape=shape, name=name))
        elif kind == "sigmoid":
            spec = draw(sigmoid_layers(input_shape=shape, name=name))
        elif kind == "bnorm":
            spec = draw(bnorm_layers(input_shape=shape, name=name, dtype=dt))
        elif kind == "lrn":
            spec = draw(lrn_layers(input_shape=shape, name=name))
        else:
            spec = draw(dropout_layers(input_shape=shape, name=name))
        layers.append(spec.layer)
        shape = spec.output_shape
    spec = draw(_classifier(*shape, None, max_side, "classifier", dt))
    layers.append(spec.layer)
    if loss:
        layers.append(Layer(draw(st.sampled_from(LOSS_TYPES)), "loss"))
    meta = {"inputSize": _row([h0, w0, c0])}
    return vl_simplenn_tidy(Net(layers, meta))


# ------------------------------------------------------------------------------ inputs


def net_inputs(
    net: Net, *, batch: int | None = None, max_batch: int = 3, ignore: bool = True
) -> st.SearchStrategy[tuple[np.ndarray, np.ndarray | None]]:
    """``(x, labels)`` for ``net``: ``x`` is ``H x W x C x N`` standard-normal data in the
    dtype of the net's first filters (float64 when there are none), ``labels`` a
    ``1 x N`` row of 1-based classes (K = the classifier's filter count), or None when
    the net does not end with a loss layer. ``batch`` fixes N, else N is 1..``max_batch``.
    With ``ignore`` some labels are 0 (MatConvNet ignores those images), but never all
    of them: an all-ignored batch has zero loss and zero derivatives, which would make
    every backward comparison vacuous. Shrinks towards one image of class 1.
    """
    if not isinstance(net, Net):
        raise InvalidArgument(f"Expected net to be a harness.mcn.Net. Received net={type(net).__name__}")
    size = net.meta.get("inputSize")
    if size is None or np.size(size) < 1:
        raise InvalidArgument("Expected net.meta['inputSize'] ([H W C]). Received net.meta without it")
    dims = [int(v) for v in np.asarray(size, dtype=float).ravel()[:3]]
    dims += [1] * (3 - len(dims))
    if batch is not None:
        batch = _check_int(batch, "batch", 1)
    max_batch = _check_int(max_batch, "max_batch", 1)
    ignore = _check_bool(ignore, "ignore")
    convs = [l for l in net.layers if l.type == "conv" and l.weights and np.size(l.weights[0])]
    dt = np.asarray(convs[0].weights[0]).dtype if convs else np.dtype(np.float64)
    has_loss = bool(net.layers) and net.layers[-1].type in LOSS_TYPES
    classes = 1
    if convs:
        f = np.asarray(convs[-1].weights[0])
        classes = f.reshape(f.shape + (1,) * (4 - f.ndim)).shape[3]
    return _inputs(tuple(dims), batch, max_batch, ignore, dt, has_loss, classes)


@st.composite
def _inputs(draw, dims, batch, max_batch, ignore, dt, has_loss, classes):
    n = batch if batch is not None else draw(st.integers(1, max_batch))
    x = np.random.default_rng(draw(_SEEDS)).standard_normal((*dims, n)).astype(dt)
    if not has_loss:
        return x, None
    low = 0 if ignore else 1
    labels = [draw(st.integers(low, classes)) for _ in range(n)]
    if not any(labels):
        labels[draw(st.integers(0, n - 1))] = draw(st.integers(1, classes))
    return x, np.array([labels], dtype=float)
