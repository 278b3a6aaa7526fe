"""The Keras side of a comparison: one forward and one backward pass of the model.

The model runs layer by layer under one GradientTape, so that every layer's output, the
loss's derivative with respect to it and every parameter derivative are at hand. A
conv with a fused non-linear activation is run as the linear layer and the activation
after it (the pre-activation is what MatConvNet's conv computes); dropout applies the
masks the reference drew. The loss is MatConvNet's (``keras_batch_loss``), computed
from the 1-based labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.equivalence.align import Alignment, Pair, keras_kind
from harness.translate.weights import to_hwcn, to_nhwc

if TYPE_CHECKING:
    import keras

__all__ = ["KerasPass", "keras_batch_loss", "run_keras", "with_dtype"]

LOSS_TYPES = ("softmaxloss", "loss")


@dataclass
class KerasPass:
    """What the model computed on the batch. Tensors are in MatConvNet's layout
    (``H x W x C x N``), parameter derivatives in Keras' own."""

    input_grad: np.ndarray  # the loss's derivative with respect to the input batch
    # pair index -> (the Keras tensor compared with the layer's output, its label), up to the loss
    tensors: dict[int, tuple[np.ndarray, str]]
    tensor_grads: dict[int, np.ndarray | None]  # pair index -> the loss's derivative w.r.t. it
    # pair index -> derivatives of its parameter layer's trainable variables (None: not reached)
    param_grads: dict[int, list[np.ndarray | None]]
    loss: np.ndarray  # the loss (the sum of the output without a loss pair)
    loss_pair: Pair | None  # the net's loss layer, when the alignment has one


def with_dtype(model: keras.Model, dtype: str) -> keras.Model:
    """The model itself if it computes in ``dtype``, else a clone that does (same
    architecture, layer names and weights): float64 comparisons need float64 layers."""
    import keras

    # the InputLayer computes nothing (and reports float32 whatever Input's dtype)
    layers = [l for l in model.layers if type(l).__name__ != "InputLayer"]
    if all(getattr(l, "compute_dtype", dtype) == dtype for l in layers):
        return model

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = dtype
        return layer.__class__.from_config(config)

    shape = tuple(model.inputs[0].shape[1:])
    copy = keras.models.clone_model(
        model, clone_function=clone, input_tensors=keras.Input(shape, dtype=dtype)
    )
    copy.set_weights([np.asarray(w, dtype=dtype) for w in model.get_weights()])
    return copy


def keras_batch_loss(final, labels: np.ndarray, n: int, dialect: str, probabilities: bool):
    """vl_nnsoftmaxloss of the scores ``final`` (``N x H x W x K`` or ``N x K``; class
    probabilities when ``probabilities``) with MatConvNet's 1-based ``labels`` (0: ignored)
    as a TensorFlow scalar: summed over pixels, divided by ``n`` in dialect 'master'."""
    import tensorflow as tf

    scores = final if len(final.shape) == 4 else final[:, None, None, :]
    k = scores.shape[-1]
    lab = np.asarray(labels, dtype=np.float64)
    lab = lab.reshape(lab.shape + (1,) * (4 - lab.ndim)) if lab.ndim > 2 else lab.reshape(1, 1, 1, -1)
    lab = to_nhwc(np.broadcast_to(lab[:, :, :1, :], (scores.shape[1], scores.shape[2], 1, n)))[..., 0]
    weights = tf.constant((lab > 0).astype(np.float64), dtype=scores.dtype)
    onehot = tf.one_hot(np.maximum(lab, 1).astype(np.int32) - 1, k, dtype=scores.dtype)
    if probabilities:
        per_pixel = -tf.math.log(tf.reduce_sum(scores * onehot, axis=-1))
    else:
        per_pixel = tf.reduce_logsumexp(scores, axis=-1) - tf.reduce_sum(scores * onehot, axis=-1)
    total = tf.reduce_sum(weights * per_pixel)
    return total / n if dialect == "master" else total


def _as_mcn(t: np.ndarray) -> np.ndarray:
    """A Keras tensor (N,H,W,C), (N,K) or scalar in MatConvNet's layout."""
    t = np.asarray(t)
    return to_hwcn(t) if t.ndim in (2, 4) else t


def _identity(z):
    return z


def _nonlinear(kl) -> bool:
    name = getattr(kl.activation, "__name__", "")
    return name not in ("linear", "identity", "_identity")


def fused_owner(alignment: Alignment, pair: Pair) -> Pair:
    """The pair whose Keras layer computes ``pair``'s activation (``activation=`` on the
    layer before it)."""
    for p in reversed(alignment.pairs[: pair.index]):
        if p.param_layer:
            return p
    raise AssertionError("fused activation without an owner")


def _forward(model: keras.Model, h, masks: dict[str, np.ndarray], training: bool) -> tuple[Any, dict, dict]:
    """Every layer's output (and a fused conv's pre-activation), by Keras layer name."""
    import tensorflow as tf

    outputs: dict[str, Any] = {}
    pre: dict[str, Any] = {}
    for kl in (l for l in model.layers if keras_kind(l) != "input"):
        kind = keras_kind(kl)
        if kind == "dropout":
            # a mask of another shape (the model's tensor differs there, which the
            # rows report) is not applied: the mask would not broadcast
            if kl.name in masks and tuple(masks[kl.name].shape) == tuple(h.shape):
                h = h * tf.constant(masks[kl.name], dtype=h.dtype)
        elif kind in ("conv", "convt") and getattr(kl, "activation", None) is not None and _nonlinear(kl):
            act = kl.activation
            kl.activation = _identity
            try:
                z = kl(h)
            finally:
                kl.activation = act
            pre[kl.name] = z
            h = act(z)
        elif kind == "bnorm":
            h = kl(h, training=training)
        else:
            h = kl(h)
        outputs[kl.name] = h
    return h, outputs, pre


def _pair_tensors(alignment: Alignment, outputs: dict, pre: dict, first) -> dict[int, tuple[Any, str]]:
    """The Keras tensor each pair's output is compared with, and its label."""
    carry, carry_name = first, "input"
    out: dict[int, tuple[Any, str]] = {}
    for pair in alignment.pairs:
        if pair.type in LOSS_TYPES:
            break
        if pair.fused_activation:
            # output of the previous pair's layer after its activation
            owner = fused_owner(alignment, pair).param_layer
            carry, carry_name = outputs[owner], f"{owner}(activation)"
        elif pair.keras:
            last = pair.keras[-1]
            if pair.param_layer and pair.param_layer in pre and last == pair.param_layer:
                carry, carry_name = pre[last], f"{last}(pre-activation)"
            else:
                carry, carry_name = outputs[last], last
        out[pair.index] = (carry, pair.keras_label if pair.keras else f"({carry_name})")
    return out


def run_keras(
    model: keras.Model,
    alignment: Alignment,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    dtype: str,
    mode: str,
    dialect: str,
    masks: dict[int, np.ndarray],
) -> KerasPass:
    """Run ``model`` on the batch ``x`` (``H x W x C x N``) with the reference's dropout
    ``masks`` (by MatConvNet layer index), and take every derivative in one backward pass.
    BatchNormalization's moving statistics are left as they were."""
    import tensorflow as tf

    n = x.shape[3]
    keras_masks = {
        name: to_nhwc(masks[pair.index])
        for pair in alignment.pairs
        if pair.index in masks
        for name in pair.keras
    }
    xk = tf.constant(to_nhwc(x))
    tf_dtype = tf.float64 if dtype == "float64" else tf.float32
    loss_pair = alignment.pairs[-1] if alignment.pairs and alignment.pairs[-1].type in LOSS_TYPES else None
    # BatchNormalization(training=True) updates its moving statistics: put them back after
    # the run, so that comparing leaves the model as it was (and a second comparison with
    # weights="model" sees the model's own moments)
    frozen = [(v, np.array(v.numpy())) for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(xk)
        final, outputs, pre = _forward(model, tf.cast(xk, tf_dtype), keras_masks, mode == "normal")
        probabilities = loss_pair is not None and (
            loss_pair.fused_activation == "softmax"
            or any(keras_kind(model.get_layer(k)) == "softmax" for k in loss_pair.keras)
        )
        loss = (
            keras_batch_loss(final, labels, n, dialect, probabilities)
            if loss_pair is not None
            else tf.reduce_sum(final)
        )
    tensors = _pair_tensors(alignment, outputs, pre, xk)
    targets = [t for t, _ in tensors.values()]
    variables = {
        pair.index: model.get_layer(pair.param_layer).trainable_variables
        for pair in alignment.pairs
        if pair.param_layer
    }
    flat_vars = [v for vs in variables.values() for v in vs]
    grads = tape.gradient(loss, [xk, *targets, *flat_vars])  # one backward pass for all
    del tape
    for v, value in frozen:
        v.assign(value)
    dx_input, dtargets = grads[0], grads[1 : 1 + len(targets)]
    rest = iter(None if g is None else g.numpy() for g in grads[1 + len(targets) :])
    return KerasPass(
        input_grad=_as_mcn(dx_input.numpy()),
        tensors={idx: (_as_mcn(t.numpy()), label) for idx, (t, label) in tensors.items()},
        tensor_grads={
            idx: None if dt is None else _as_mcn(dt.numpy())
            for idx, dt in zip(tensors, dtargets, strict=True)
        },
        param_grads={idx: [next(rest) for _ in vs] for idx, vs in variables.items()},
        loss=loss.numpy(),
        loss_pair=loss_pair,
    )
