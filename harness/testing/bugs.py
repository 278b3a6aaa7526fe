"""A catalogue of planted translation bugs: the mistakes people make porting MatConvNet.

Each ``Bug`` names one mistake, the MatConvNet layer types it applies to, how to compare
it (``weights``: "net" loads the net's parameters into the model, "model" keeps the
model's own, which is where weight-transfer bugs live; ``modes``: the vl_simplenn modes
in which it shows), and three functions:

- ``bug.sites(net)``: the layers (0-based indices) where the mistake can be planted and
  changes the model's function for some input (structural: e.g. a kernel flip needs a
  kernel larger than 1 x 1, a padding-side swap an asymmetric pad);
- ``bug.plant(net, model, index=None)``: ``(buggy model, planted layer name)``. ``model``
  is the faithful translation ``harness.translate.to_keras(net)``; the buggy model is a
  new functional model rebuilt from its layer chain (every layer cloned with its
  weights, one spot changed), so ``model`` itself is left alone. The name is the
  MatConvNet layer ``Report.first_divergence['culprit']`` should name;
- ``bug.observable(net, res, index, labels, mode)``: whether this batch can show the
  mistake, judged from the reference alone (``res`` from ``reference``): the
  MatConvNet layers that compute what the buggy Keras layer computes, run on the layer's
  input, give a different output (or, for weight-transfer bugs, the transferred
  parameters differ; for ``missing_groups``, the derivative of the Keras-only weights
  is non-zero). A ReLU that never sees a negative value cannot be missed.

``python -c "from harness.testing.bugs import CATALOGUE; print(*CATALOGUE.values(), sep='\\n')"``
lists them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.mcn.net import Layer, Net
from harness.mcn.options import McnError, is_empty, pad4, pair
from harness.mcn.simplenn import vl_simplenn, vl_simplenn_tidy

__all__ = ["Bug", "CATALOGUE", "BUGS", "layer_input_shapes", "reference"]

_LOSSES = ("softmaxloss", "loss")
# A batch shows a bug when the buggy computation differs by more than this (relative):
# far above float64 rounding, far below any real difference.
_VISIBLE = 1e-6


# ------------------------------------------------------------------------------ net facts


def layer_input_shapes(net: Net) -> list[tuple[int, int, int]]:
    """The ``(H, W, C)`` input of every layer of a tidied net, from ``meta['inputSize']``."""
    size = [int(v) for v in np.asarray(net.meta["inputSize"], dtype=float).ravel()[:3]]
    h, w, c = (size + [1, 1, 1])[:3]
    shapes = []
    for layer in net.layers:
        shapes.append((h, w, c))
        if layer.type in ("conv", "pool"):
            pt, pb, pl, pr = pad4(layer.get("pad", 0), "pad")
            sy, sx = pair(layer.get("stride", 1), "stride")
            if layer.type == "pool":
                (fh, fw), (dy, dx) = pair(layer.pool, "pool"), (1, 1)
            elif is_empty(layer.weights[0]):
                fh, fw, dy, dx = 1, 1, 1, 1
            else:
                f = _filters(layer)
                fh, fw, c = f.shape[0], f.shape[1], f.shape[3]
                dy, dx = pair(layer.get("dilate", 1), "dilate")
            h = (h + pt + pb - (fh - 1) * dy - 1) // sy + 1
            w = (w + pl + pr - (fw - 1) * dx - 1) // sx + 1
        elif layer.type == "convt":
            f = _filters(layer)
            uy, ux = pair(layer.upsample, "upsample")
            ct, cb, cl, cr = pad4(layer.crop, "crop")
            h, w = (h - 1) * uy - ct - cb + f.shape[0], (w - 1) * ux - cl - cr + f.shape[1]
            c = f.shape[2] * int(np.asarray(layer.num_groups).ravel()[0])
    return shapes


def _filters(layer: Layer) -> np.ndarray:
    f = np.asarray(layer.weights[0])
    return f.reshape(f.shape + (1,) * (4 - f.ndim))


def _has_filters(layer: Layer) -> bool:
    return layer.type == "conv" and bool(layer.weights) and not is_empty(layer.weights[0])


def _last_body(net: Net) -> int:
    return len(net.layers) - (2 if net.layers and net.layers[-1].type in _LOSSES else 1)


def reference(
    net: Net, x: np.ndarray, labels: Any, mode: str = "normal", dialect: str = "master", seed: int = 0
) -> list:
    """vl_simplenn's ``res`` as ``harness.compare`` computes it (float64 net, LRN with the
    exact power, dropout masks drawn from ``np.random.default_rng(seed)``, ``dzdy = 1``)."""
    net = vl_simplenn_tidy(net)
    for layer in net.layers:
        layer.weights = [np.asarray(w, np.float64) if np.size(w) else np.asarray(w) for w in layer.weights]
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels, np.float64)
    probe = vl_simplenn(
        net, x, None, labels, mode=mode, dialect=dialect, lrn_exact=True, rng=np.random.default_rng(seed)
    )
    masks = {
        i: probe[i + 1].aux for i, l in enumerate(net.layers) if l.type == "dropout" and mode == "normal"
    }
    return vl_simplenn(net, x, 1.0, labels, mode=mode, dialect=dialect, lrn_exact=True, masks=masks)


def _differs(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return True
    scale = max(float(np.max(np.abs(b), initial=0.0)), float(np.max(np.abs(a), initial=0.0)))
    return bool(np.any(np.abs(a - b) > _VISIBLE * scale))


def _run_variant(layers: list[Layer], x: np.ndarray, mode: str) -> np.ndarray:
    if not layers:
        return x
    return vl_simplenn(vl_simplenn_tidy(Net(layers)), x, mode=mode, lrn_exact=True)[-1].x


# ------------------------------------------------------------------------------ rebuilding


def _keras_name(name: str) -> str:
    from harness.translate.build import keras_name

    return keras_name(name)


def _run_names(model, name: str) -> list[str]:
    """The Keras layers to_keras made for MatConvNet layer ``name``, in model order."""
    kn = _keras_name(name)
    own = {kn, f"{kn}_pad", f"{kn}_subsample", f"{kn}_crop"}
    return [l.name for l in model.layers if l.name in own]


def _clone(kl, x, changes: dict | None = None, weights: list | None = None):
    """Apply a fresh copy of Keras layer ``kl`` (config ``changes`` applied) to ``x``;
    the copy holds ``weights`` or ``kl``'s own."""
    config = kl.get_config()
    config.update(changes or {})
    new = type(kl).from_config(config)
    y = new(x)
    values = kl.get_weights() if weights is None else weights
    if values:
        new.set_weights(
            [np.asarray(v, dtype=w.dtype) for v, w in zip(values, new.get_weights(), strict=True)]
        )
    return y


def _rebuild(model, edit: Callable[[Any, Any], Any] | None = None, tail: Callable[[Any], Any] | None = None):
    """A new functional model: ``model``'s layer chain with every layer cloned, except
    that ``edit(klayer, x)`` may return the tensor to use instead (``None``: clone), and
    ``tail(x)`` is applied at the end."""
    import keras

    spec = model.inputs[0]
    inputs = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name="input")
    x = inputs
    for kl in model.layers:
        if type(kl).__name__ == "InputLayer":
            continue
        y = edit(kl, x) if edit is not None else None
        x = _clone(kl, x) if y is None else y
    if tail is not None:
        x = tail(x)
    return keras.Model(inputs, x, name=f"{model.name}_planted")


def _dtype(model) -> str:
    return str(model.inputs[0].dtype)


@functools.cache
def _roll_classes():
    import keras

    class RollClasses(keras.layers.Layer):
        """``y[..., k] = x[..., (k + shift) % K]``: class k's score read from class k + shift."""

        def __init__(self, shift: int = 1, **kwargs):
            super().__init__(**kwargs)
            self.shift = int(shift)

        def call(self, x):
            return keras.ops.roll(x, -self.shift, axis=-1)

        def get_config(self):
            return {**super().get_config(), "shift": self.shift}

    return RollClasses


# ------------------------------------------------------------------------------ the bugs


@dataclass(frozen=True)
class Bug:
    """A planted translation bug; see the module docstring."""

    name: str
    description: str
    layer_types: tuple[str, ...]
    weights: str  # compare(..., weights=...): "net" or "model"
    modes: tuple[str, ...]  # vl_simplenn modes in which it shows
    _site: Callable[[Net, int, list], bool] = field(repr=False)
    _plant: Callable[[Net, Any, int], Any] = field(repr=False)
    # MatConvNet layers computing what the buggy Keras layer computes (observability)
    _variant: Callable[[Net, int], list[Layer]] | None = field(default=None, repr=False)
    _observe: Callable[..., bool] | None = field(default=None, repr=False)
    # the layer the divergence is blamed on, when not the planted site itself
    _culprit: Callable[[Net, int], str] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.description} [layers: {', '.join(self.layer_types)}; "
            f"weights={self.weights!r}; modes: {', '.join(self.modes)}]"
        )

    def sites(self, net: Net) -> list[int]:
        """0-based indices of the layers of ``net`` where this bug can be planted."""
        net = vl_simplenn_tidy(net)
        shapes = layer_input_shapes(net)
        return [
            i for i, l in enumerate(net.layers) if l.type in self.layer_types and self._site(net, i, shapes)
        ]

    def plant(self, net: Net, model, index: int | None = None) -> tuple[Any, str]:
        """``(buggy model, MatConvNet layer name the divergence should be blamed on)``;
        ``index`` defaults to the first site."""
        net = vl_simplenn_tidy(net)
        sites = self.sites(net)
        if not sites:
            raise McnError(f"Expected a net with a layer where {self.name} applies. Received none")
        if index is None:
            index = sites[0]
        if index not in sites:
            raise McnError(
                f"Expected index to be one of the sites {sites} of {self.name}. Received index={index}"
            )
        culprit = self._culprit(net, index) if self._culprit else net.layers[index].name
        return self._plant(net, model, index), culprit

    def observable(self, net: Net, res: list, index: int, labels: Any = None, mode: str = "normal") -> bool:
        """Whether the batch behind ``res`` (see ``reference``) can show the bug at
        ``index``: the computation the buggy model does there differs from MatConvNet's."""
        net = vl_simplenn_tidy(net)
        if mode not in self.modes:
            return False
        if self._observe is not None:
            return self._observe(net, res, index, labels)
        variant = self._variant(net, index)
        return _differs(_run_variant(variant, res[index].x, mode), res[index + 1].x)


def _edit_layer(name: str, fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    kn = _keras_name(name)
    return lambda kl, x: fn(kl, x) if kl.name == kn else None


# --- missing_groups


def _groups(net: Net, i: int, shapes: list) -> int:
    return shapes[i][2] // _filters(net.layers[i]).shape[2]


def _block_diagonal(f: np.ndarray, channels: int) -> np.ndarray:
    fh, fw, fc, k = f.shape
    groups = channels // fc
    full = np.zeros((fh, fw, channels, k), f.dtype)
    kg = k // groups
    for g in range(groups):
        full[:, :, g * fc : (g + 1) * fc, g * kg : (g + 1) * kg] = f[..., g * kg : (g + 1) * kg]
    return full


def _plant_missing_groups(net: Net, model, i: int):
    channels = layer_input_shapes(net)[i][2]

    def edit(kl, x):
        values = kl.get_weights()
        return _clone(kl, x, {"groups": 1}, [_block_diagonal(values[0], channels), *values[1:]])

    return _rebuild(model, _edit_layer(net.layers[i].name, edit))


def _observe_missing_groups(net: Net, res: list, i: int, labels) -> bool:
    from harness.mcn.conv import vl_nnconv

    layer = net.layers[i]
    x = res[i].x
    f = _filters(layer).astype(x.dtype)
    full = _block_diagonal(f, x.shape[2])
    b = layer.weights[1] if len(layer.weights) > 1 and not is_empty(layer.weights[1]) else None
    b = None if b is None else np.asarray(b, x.dtype)
    opts = {"pad": layer.pad, "stride": layer.stride, "dilate": layer.get("dilate", 1)}
    _, dzdf, _ = vl_nnconv(x, full, b, res[i + 1].dzdx, **opts)
    on_blocks = _block_diagonal(np.ones(f.shape, bool), x.shape[2])
    scale = float(np.max(np.abs(dzdf), initial=0.0))
    return scale > 0 and float(np.max(np.abs(dzdf[~on_blocks]), initial=0.0)) > _VISIBLE * scale


# --- zero_padded_pooling


def _plant_zero_padded_pooling(net: Net, model, i: int):
    import keras

    layer = net.layers[i]
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    dt = _dtype(model)

    def edit(kl, x):
        kn = kl.name
        x = keras.layers.ZeroPadding2D(((pt, pb), (pl, pr)), name=f"{kn}_pad", dtype=dt)(x)
        cls = (
            keras.layers.MaxPooling2D
            if layer.get("method", "max") == "max"
            else keras.layers.AveragePooling2D
        )
        size, stride = pair(layer.pool, "pool"), pair(layer.stride, "stride")
        return cls(size, stride, padding="valid", name=kn, dtype=dt)(x)

    return _rebuild(model, _edit_layer(layer.name, edit))


def _variant_zero_padded_pooling(net: Net, i: int) -> list[Layer]:
    layer = net.layers[i]
    pad = Layer("conv", "zero_pad", [np.zeros((0, 0)), np.zeros((0, 0))], pad=layer.pad)
    pool = layer.copy()
    pool.pad = 0.0
    return [pad, pool]


# --- kernel-layout bugs (weights="model")


def _kernel_bug(transform: Callable[[np.ndarray], np.ndarray]):
    def plant(net: Net, model, i: int):
        def edit(kl, x):
            values = kl.get_weights()
            return _clone(kl, x, weights=[transform(values[0]), *values[1:]])

        return _rebuild(model, _edit_layer(net.layers[i].name, edit))

    def observe(net: Net, res: list, i: int, labels) -> bool:
        f = _filters(net.layers[i]).astype(np.float64)
        return _differs(transform(f), f)

    return plant, observe


def _flip(f: np.ndarray) -> np.ndarray:
    return f[::-1, ::-1].copy()


def _transpose(f: np.ndarray) -> np.ndarray:
    # FW x FH read where FH x FW was stored, then reshaped to the expected FH x FW
    return np.ascontiguousarray(f.transpose(1, 0, 2, 3)).reshape(f.shape)


_plant_flipped, _observe_flipped = _kernel_bug(_flip)
_plant_transposed, _observe_transposed = _kernel_bug(_transpose)


# --- wrong_stride


def _stride_site(net: Net, i: int, shapes: list) -> bool:
    layer = net.layers[i]
    if layer.type == "conv" and not _has_filters(layer):
        return False
    h, w, _ = shapes[i]
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    sy, sx = pair(layer.stride, "stride")
    if layer.type == "pool":
        (fh, fw), (dy, dx) = pair(layer.pool, "pool"), (1, 1)
    else:
        fh, fw = _filters(layer).shape[:2]
        dy, dx = pair(layer.get("dilate", 1), "dilate")
    # stride 1 gives a larger output unless the window fits only once along that axis
    return (sy > 1 and h + pt + pb - (fh - 1) * dy - 1 > 0) or (
        sx > 1 and w + pl + pr - (fw - 1) * dx - 1 > 0
    )


def _plant_wrong_stride(net: Net, model, i: int):
    kn = _keras_name(net.layers[i].name)

    def edit(kl, x):
        if kl.name == f"{kn}_subsample":
            return x  # the stride of a dilated conv lives here
        if kl.name == kn:
            return _clone(kl, x, {"strides": (1, 1)})
        return None

    return _rebuild(model, edit)


def _variant_wrong_stride(net: Net, i: int) -> list[Layer]:
    layer = net.layers[i].copy()
    layer.stride = 1.0
    return [layer]


# --- wrong_padding_side


def _asymmetric(net: Net, i: int, shapes: list) -> bool:
    layer = net.layers[i]
    if layer.type == "conv" and not _has_filters(layer):
        return False
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    return pt != pb or pl != pr


def _plant_wrong_padding_side(net: Net, model, i: int):
    layer = net.layers[i]
    kn = _keras_name(layer.name)
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    swapped = ((pb, pt), (pr, pl))

    def edit(kl, x):
        if layer.type == "conv" and kl.name == f"{kn}_pad":
            return _clone(kl, x, {"padding": swapped})
        if layer.type == "pool" and kl.name == kn:
            return _clone(kl, x, {"padding": swapped})
        return None

    return _rebuild(model, edit)


def _variant_wrong_padding_side(net: Net, i: int) -> list[Layer]:
    layer = net.layers[i].copy()
    pt, pb, pl, pr = pad4(layer.pad, "pad")
    layer.pad = np.array([[pb, pt, pr, pl]], float)
    return [layer]


# --- ReLUs


def _leak(layer: Layer) -> float:
    return float(np.asarray(layer.get("leak", 0.0), dtype=float).ravel()[0]) if layer.type == "relu" else -1.0


def _missing_relu_site(net: Net, i: int, shapes: list) -> bool:
    # Next to a ReLU with the same leak, leaving out either gives the same model: no
    # comparison can say which one is missing.
    near = [net.layers[j] for j in (i - 1, i + 1) if 0 <= j < len(net.layers)]
    return all(_leak(l) != _leak(net.layers[i]) for l in near)


def _plant_missing_relu(net: Net, model, i: int):
    return _rebuild(model, _edit_layer(net.layers[i].name, lambda kl, x: x))


def _extra_relu_site(net: Net, i: int, shapes: list) -> bool:
    nxt = net.layers[i + 1].type if i + 1 < len(net.layers) else None
    return i <= _last_body(net) and nxt not in ("relu", "dropout")


def _plant_extra_relu(net: Net, model, i: int):
    import keras

    last = _run_names(model, net.layers[i].name)[-1]

    def edit(kl, x):
        if kl.name != last:
            return None
        y = _clone(kl, x)
        return keras.layers.ReLU(name=f"{_keras_name(net.layers[i].name)}_extra_relu", dtype=_dtype(model))(y)

    return _rebuild(model, edit)


# --- bnorm_epsilon

_KERAS_BNORM_EPSILON = 1e-3


def _plant_bnorm_epsilon(net: Net, model, i: int):
    edit = _edit_layer(net.layers[i].name, lambda kl, x: _clone(kl, x, {"epsilon": _KERAS_BNORM_EPSILON}))
    return _rebuild(model, edit)


def _variant_bnorm_epsilon(net: Net, i: int) -> list[Layer]:
    layer = net.layers[i].copy()
    layer.epsilon = _KERAS_BNORM_EPSILON
    return [layer]


# --- softmax_twice


def _softmax_twice_site(net: Net, i: int, shapes: list) -> bool:
    return i == len(net.layers) - 1 and shapes[i][2] >= 2


def _plant_softmax_twice(net: Net, model, i: int):
    import keras

    dt = _dtype(model)

    def tail(x):
        x = keras.layers.Softmax(name="prob", dtype=dt)(x)
        return keras.layers.Softmax(name="prob_again", dtype=dt)(x)

    return _rebuild(model, tail=tail)


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def _observe_softmax_twice(net: Net, res: list, i: int, labels) -> bool:
    p = _softmax(np.asarray(res[i].x, np.float64))
    q = _softmax(p)
    lab = np.asarray(labels, np.float64).reshape(-1)
    # per-image labels: only labelled images enter the loss and its derivatives
    keep = lab > 0 if lab.size == p.shape[3] else np.ones(p.shape[3], bool)
    return _differs(q[..., keep], p[..., keep])


# --- flatten_order (weights="model")


def _fully_connected_site(net: Net, i: int, shapes: list) -> bool:
    layer = net.layers[i]
    if i != _last_body(net) or not _has_filters(layer):
        return False
    h, w, c = shapes[i]
    fh, fw, fc, _ = _filters(layer).shape
    whole = (fh, fw, fc) == (h, w, c) and not any(pad4(layer.pad, "pad"))
    whole = whole and pair(layer.get("dilate", 1), "dilate") == (1, 1)
    return whole and sum(d > 1 for d in (fh, fw, fc)) >= 2  # else F(:) and F.reshape agree


def _plant_flatten_order(net: Net, model, i: int):
    import keras

    dt = _dtype(model)

    def edit(kl, x):
        values = kl.get_weights()
        f = values[0]
        kernel = f.reshape(-1, f.shape[3], order="F")  # MATLAB's F(:) order, not Flatten's
        y = keras.layers.Flatten(name=f"{kl.name}_flatten", dtype=dt)(x)
        dense = keras.layers.Dense(f.shape[3], use_bias=len(values) > 1, name=kl.name, dtype=dt)
        y = dense(y)
        dense.set_weights([kernel, *values[1:]])
        return y

    return _rebuild(model, _edit_layer(net.layers[i].name, edit))


def _observe_flatten_order(net: Net, res: list, i: int, labels) -> bool:
    f = _filters(net.layers[i]).astype(np.float64)
    return _differs(f.reshape(-1, f.shape[3], order="F"), f.reshape(-1, f.shape[3]))


# --- off_by_one_labels


def _off_by_one_site(net: Net, i: int, shapes: list) -> bool:
    if not net.layers or net.layers[-1].type not in _LOSSES or i != _last_body(net):
        return False
    return shapes[i + 1][2] >= 2


def _plant_off_by_one(net: Net, model, i: int):
    roll = _roll_classes()
    return _rebuild(model, tail=lambda x: roll(1, name="labels_0_based", dtype=_dtype(model))(x))


def _variant_off_by_one(net: Net, i: int) -> list[Layer]:
    k = layer_input_shapes(net)[i + 1][2]
    perm = np.roll(np.eye(k), 1, axis=0)[None, None]  # y_j = x_{(j+1) % K}
    return [net.layers[i].copy(), Layer("conv", "roll", [perm, np.zeros((0, 0))])]


_BOTH = ("normal", "test")

BUGS: tuple[Bug, ...] = (
    Bug(
        "missing_groups",
        "Conv2D without groups where MatConvNet has G > 1 filter groups (C / FC); compare embeds the "
        "filters block-diagonally, so the forward pass agrees and the derivative of the Keras-only "
        "weights off the diagonal blocks is the divergence",
        ("conv",),
        "net",
        _BOTH,
        lambda net, i, s: _has_filters(net.layers[i]) and _groups(net, i, s) > 1,
        _plant_missing_groups,
        _observe=_observe_missing_groups,
    ),
    Bug(
        "zero_padded_pooling",
        "ZeroPadding2D + stock MaxPooling2D/AveragePooling2D instead of MatConvNet's clipped windows "
        "(max: differs where a window's real cells are all negative; avg: divides by the full window)",
        ("pool",),
        "net",
        _BOTH,
        lambda net, i, s: any(pad4(net.layers[i].pad, "pad")),
        _plant_zero_padded_pooling,
        _variant_zero_padded_pooling,
    ),
    Bug(
        "flipped_kernel",
        "the weight transfer flips each kernel spatially (convolution vs MatConvNet's and Keras' "
        "cross-correlation); compare with weights='model'",
        ("conv",),
        "model",
        _BOTH,
        lambda net, i, s: _has_filters(net.layers[i]) and np.prod(_filters(net.layers[i]).shape[:2]) > 1,
        _plant_flipped,
        _observe=_observe_flipped,
    ),
    Bug(
        "transposed_kernel",
        "the weight transfer reads each FH x FW kernel as FW x FH and reshapes it back (a square "
        "kernel is transposed, a non-square one scrambled); compare with weights='model'",
        ("conv",),
        "model",
        _BOTH,
        lambda net, i, s: _has_filters(net.layers[i]) and min(_filters(net.layers[i]).shape[:2]) > 1,
        _plant_transposed,
        _observe=_observe_transposed,
    ),
    Bug(
        "wrong_stride",
        "stride 1 where MatConvNet strides (a forgotten stride=): a larger output",
        ("conv", "pool"),
        "net",
        _BOTH,
        _stride_site,
        _plant_wrong_stride,
        _variant_wrong_stride,
    ),
    Bug(
        "wrong_padding_side",
        "asymmetric padding [T B L R] applied with the sides swapped ((B, T), (R, L))",
        ("conv", "pool"),
        "net",
        _BOTH,
        _asymmetric,
        _plant_wrong_padding_side,
        _variant_wrong_padding_side,
    ),
    Bug(
        "missing_relu",
        "a ReLU MatConvNet has is left out of the Keras model (not next to a ReLU with the same "
        "leak: leaving out either of two such ReLUs gives the same model)",
        ("relu",),
        "net",
        _BOTH,
        _missing_relu_site,
        _plant_missing_relu,
        lambda net, i: [],
    ),
    Bug(
        "extra_relu",
        "a ReLU after a layer where MatConvNet has none (e.g. Conv2D(activation='relu') by habit)",
        ("conv", "pool", "bnorm", "lrn"),
        "net",
        _BOTH,
        _extra_relu_site,
        _plant_extra_relu,
        lambda net, i: [net.layers[i].copy(), Layer("relu", "extra")],
    ),
    Bug(
        "bnorm_epsilon",
        f"BatchNormalization with Keras' default epsilon {_KERAS_BNORM_EPSILON:g} instead of the net's "
        "(MatConvNet: 1e-5 after vl_simplenn_tidy). With stored moments ('test' mode) compare transfers "
        "sigma for the Keras layer's own epsilon, which hides it: it shows in 'normal' mode",
        ("bnorm",),
        "net",
        ("normal",),
        lambda net, i, s: float(np.asarray(net.layers[i].epsilon).ravel()[0]) != _KERAS_BNORM_EPSILON,
        _plant_bnorm_epsilon,
        _variant_bnorm_epsilon,
    ),
    Bug(
        "softmax_twice",
        "softmax applied twice: the model ends with a softmax and the loss applies another (as "
        "categorical cross-entropy with from_logits=True on probabilities does); blamed on the loss layer",
        _LOSSES,
        "net",
        _BOTH,
        _softmax_twice_site,
        _plant_softmax_twice,
        _observe=_observe_softmax_twice,
    ),
    Bug(
        "flatten_order",
        "the fully-connected conv (filters covering the whole input) as Flatten + Dense with the kernel "
        "in MATLAB's column-major F(:) order instead of Flatten's row-major (H, W, C) order; compare "
        "with weights='model'",
        ("conv",),
        "model",
        _BOTH,
        _fully_connected_site,
        _plant_flatten_order,
        _observe=_observe_flatten_order,
    ),
    Bug(
        "off_by_one_labels",
        "the loss reads MatConvNet's 1-based labels as 0-based (class c scored as class c+1). compare "
        "computes the loss itself from the 1-based labels, so the mistake is planted as the equivalent "
        "model-side fault: the scores rolled by one class (class c's score read from class c+1; the "
        "last class wraps to the first, where a real 0-based loss would index out of range). It shows "
        "as an extra Keras layer after the last scoring layer, which is blamed",
        ("conv", "pool", "relu", "sigmoid", "bnorm", "lrn", "dropout"),
        "net",
        _BOTH,
        _off_by_one_site,
        _plant_off_by_one,
        _variant_off_by_one,
    ),
)

CATALOGUE: dict[str, Bug] = {bug.name: bug for bug in BUGS}
