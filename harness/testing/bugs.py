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
  MatConvNet layer ``Report.first_divergence.culprit`` should name;
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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.net import Layer, Net
from harness.mcn.options import McnError, pad4
from harness.mcn.simplenn import vl_simplenn_tidy
from harness.testing.observability import (
    LOSSES,
    asymmetric_pad_site,
    differs,
    extra_relu_site,
    filter_groups,
    fully_connected_site,
    has_filters,
    kernel_observer,
    last_body,
    layer_input_shapes,
    missing_relu_site,
    observe_flatten_order,
    observe_missing_groups,
    observe_softmax_twice,
    off_by_one_site,
    reference,
    run_variant,
    softmax_twice_site,
    stride_site,
    variant_bnorm_epsilon,
    variant_off_by_one,
    variant_wrong_padding_side,
    variant_wrong_stride,
    variant_zero_padded_pooling,
)
from harness.testing.planting import (
    KERAS_BNORM_EPSILON,
    flip_kernel,
    kernel_planter,
    plant_bnorm_epsilon,
    plant_extra_relu,
    plant_flatten_order,
    plant_missing_groups,
    plant_missing_relu,
    plant_off_by_one,
    plant_softmax_twice,
    plant_wrong_padding_side,
    plant_wrong_stride,
    plant_zero_padded_pooling,
    transpose_kernel,
)
from harness.translate.weights import filters_of

if TYPE_CHECKING:
    import keras

__all__ = ["Bug", "CATALOGUE", "BUGS", "layer_input_shapes", "reference"]


@dataclass(frozen=True)
class Bug:
    """A planted translation bug; see the module docstring."""

    name: str
    description: str
    layer_types: tuple[str, ...]
    weights: str  # compare(..., weights=...): "net" or "model"
    modes: tuple[str, ...]  # vl_simplenn modes in which it shows
    _site: Callable[[Net, int, list], bool] = field(repr=False)
    _plant: Callable[[Net, keras.Model, int], keras.Model] = field(repr=False)
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

    def plant(self, net: Net, model: keras.Model, index: int | None = None) -> tuple[keras.Model, str]:
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

    def observable(
        self, net: Net, res: list, index: int, labels: Any = None, *, mode: str = "normal"
    ) -> bool:
        """Whether the batch behind ``res`` (see ``reference``) can show the bug at
        ``index``: the computation the buggy model does there differs from MatConvNet's
        (a tensor of another shape only when the net's output differs too)."""
        net = vl_simplenn_tidy(net)
        if mode not in self.modes:
            return False
        if self._observe is not None:
            return self._observe(net, res, index, labels)
        variant = self._variant(net, index)
        out = run_variant(variant, res[index].x, mode)
        if not differs(out, res[index + 1].x):
            return False
        if np.shape(out) == np.shape(res[index + 1].x):
            return True
        # another shape: visible unless the layers after it undo the change on this batch
        # (a stride-1 pooling of a 1-pixel map, subsampled back by the next pooling)
        rest = net.layers[index + 1 : last_body(net) + 1]
        if not rest or any(l.type == "dropout" for l in rest) and mode == "normal":
            return True
        try:
            buggy = run_variant(rest, out, mode)
        except McnError:
            return True  # the buggy tensor does not even fit the next layers
        return differs(buggy, res[last_body(net) + 1].x)


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
        lambda net, i, s: has_filters(net.layers[i]) and filter_groups(net, i, s) > 1,
        plant_missing_groups,
        _observe=observe_missing_groups,
    ),
    Bug(
        "zero_padded_pooling",
        "ZeroPadding2D + stock MaxPooling2D/AveragePooling2D instead of MatConvNet's clipped windows "
        "(max: differs where a window's real cells are all negative; avg: divides by the full window)",
        ("pool",),
        "net",
        _BOTH,
        lambda net, i, s: any(pad4(net.layers[i].pad, "pad")),
        plant_zero_padded_pooling,
        variant_zero_padded_pooling,
    ),
    Bug(
        "flipped_kernel",
        "the weight transfer flips each kernel spatially (convolution vs MatConvNet's and Keras' "
        "cross-correlation); compare with weights='model'",
        ("conv",),
        "model",
        _BOTH,
        lambda net, i, s: has_filters(net.layers[i]) and np.prod(filters_of(net.layers[i]).shape[:2]) > 1,
        kernel_planter(flip_kernel),
        _observe=kernel_observer(flip_kernel),
    ),
    Bug(
        "transposed_kernel",
        "the weight transfer reads each FH x FW kernel as FW x FH and reshapes it back (a square "
        "kernel is transposed, a non-square one scrambled); compare with weights='model'",
        ("conv",),
        "model",
        _BOTH,
        lambda net, i, s: has_filters(net.layers[i]) and min(filters_of(net.layers[i]).shape[:2]) > 1,
        kernel_planter(transpose_kernel),
        _observe=kernel_observer(transpose_kernel),
    ),
    Bug(
        "wrong_stride",
        "stride 1 where MatConvNet strides (a forgotten stride=): a larger output",
        ("conv", "pool"),
        "net",
        _BOTH,
        stride_site,
        plant_wrong_stride,
        variant_wrong_stride,
    ),
    Bug(
        "wrong_padding_side",
        "asymmetric padding [T B L R] applied with the sides swapped ((B, T), (R, L))",
        ("conv", "pool"),
        "net",
        _BOTH,
        asymmetric_pad_site,
        plant_wrong_padding_side,
        variant_wrong_padding_side,
    ),
    Bug(
        "missing_relu",
        "a ReLU MatConvNet has is left out of the Keras model (not next to another ReLU, nor one "
        "pooling away: leaving out either of two such ReLUs can give the same model on the batch)",
        ("relu",),
        "net",
        _BOTH,
        missing_relu_site,
        plant_missing_relu,
        lambda net, i: [],
    ),
    Bug(
        "extra_relu",
        "a ReLU after a layer where MatConvNet has none (e.g. Conv2D(activation='relu') by habit)",
        ("conv", "pool", "bnorm", "lrn"),
        "net",
        _BOTH,
        extra_relu_site,
        plant_extra_relu,
        lambda net, i: [net.layers[i].copy(), Layer("relu", "extra")],
    ),
    Bug(
        "bnorm_epsilon",
        f"BatchNormalization with Keras' default epsilon {KERAS_BNORM_EPSILON:g} instead of the net's "
        "(MatConvNet: 1e-5 after vl_simplenn_tidy). With stored moments ('test' mode) compare transfers "
        "sigma for the Keras layer's own epsilon, which hides it: it shows in 'normal' mode",
        ("bnorm",),
        "net",
        ("normal",),
        lambda net, i, s: float(np.asarray(net.layers[i].epsilon).ravel()[0]) != KERAS_BNORM_EPSILON,
        plant_bnorm_epsilon,
        variant_bnorm_epsilon,
    ),
    Bug(
        "softmax_twice",
        "softmax applied twice: the model ends with a softmax and the loss applies another (as "
        "categorical cross-entropy with from_logits=True on probabilities does); blamed on the loss layer",
        LOSSES,
        "net",
        _BOTH,
        softmax_twice_site,
        plant_softmax_twice,
        _observe=observe_softmax_twice,
    ),
    Bug(
        "flatten_order",
        "the fully-connected conv (filters covering the whole input) as Flatten + Dense with the kernel "
        "in MATLAB's column-major F(:) order instead of Flatten's row-major (H, W, C) order; compare "
        "with weights='model'",
        ("conv",),
        "model",
        _BOTH,
        fully_connected_site,
        plant_flatten_order,
        _observe=observe_flatten_order,
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
        off_by_one_site,
        plant_off_by_one,
        variant_off_by_one,
    ),
)

CATALOGUE: dict[str, Bug] = {bug.name: bug for bug in BUGS}
