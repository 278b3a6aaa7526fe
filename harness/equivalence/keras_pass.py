"""The Keras side of a comparison: MatConvNet's loss on Keras tensors
(``keras_batch_loss``), the observed call as the rows read it (``KerasSide``), and
dtype clones.

The comparison observes the model's real call (``observe``) and takes MatConvNet's loss
of its output, computed from the 1-based labels, as the scalar whose derivatives both
sides compare. ``with_dtype`` clones a Sequential or functional model into another
precision (training parity uses it; comparisons use ``precision.float64_copy``, which
copies any style).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.equivalence.match import Match, to_mcn_view
from harness.translate.weights import to_hwcn, to_nhwc

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment

__all__ = ["LOSS_TYPES", "KerasSide", "keras_batch_loss", "with_dtype"]

LOSS_TYPES = ("softmaxloss", "loss")


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

    inputs = [keras.Input(tuple(t.shape[1:]), dtype=dtype) for t in model.inputs]
    copy = keras.models.clone_model(
        model, clone_function=clone, input_tensors=inputs[0] if len(inputs) == 1 else inputs
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


class KerasSide:
    """The observed call as the rows and the blame read it: every capture as a float64
    array, its derivative, the parameter derivatives by pair index, and which Keras
    layers the structural alignment pairs with each MatConvNet layer (none without an
    ``alignment``: a DagNN comparison pairs by layer name)."""

    def __init__(
        self,
        obs,
        variables: dict | None = None,
        alignment: Alignment | None = None,
        has_loss: bool = False,
        probabilities: bool = False,
    ):
        self.obs = obs
        self.values = [np.asarray(c.tensor.numpy(), dtype=np.float64) for c in obs.captures]
        self.labels = [c.label for c in obs.captures]
        self.named = [c.layer is not None for c in obs.captures]
        self.op_types = [c.op_type for c in obs.captures]
        self.leaf_ids = {id(l) for l in obs.leaves}
        # tensors made by a layout op: the only ones that may hold another axis order
        self.layout_ops = [
            c.op_type in ("Transpose", "Reshape", "Squeeze", "ExpandDims") for c in obs.captures
        ]
        # the leaf Keras layer a capture was computed inside (None: a layer's or the model's own)
        self.inside = [c.inside for c in obs.captures]
        self.grads = obs.grads
        self.param_grads = {
            i: [obs.weight_grads.get(id(v)) for v in vs] for i, vs in (variables or {}).items()
        }
        # the model's outputs (one, but for a DagNN net of several) and the captures naming them
        outs = obs.outputs or [obs.output]
        self.outputs = [np.asarray(o.numpy(), dtype=np.float64) for o in outs]
        self.output_labels = [
            next((c.label for c in obs.captures if c.tensor is o), getattr(o, "name", "output")) for o in outs
        ]
        self.output, self.output_label = self.outputs[0], self.output_labels[0]
        self.loss = float(np.asarray(obs.loss.numpy()))
        self.has_loss = has_loss
        self.probabilities = probabilities
        # each MatConvNet layer's own Keras run, and every Keras layer the structure pairs
        pairs = alignment.pairs if alignment is not None else []
        extra = [{n for n in pair.keras if f"extra Keras layer {n}" in pair.notes} for pair in pairs]
        self.runs = [set(pair.keras) - e for pair, e in zip(pairs, extra, strict=True)]
        self.paired = {
            name
            for pair, run in zip(pairs, self.runs, strict=True)
            if pair.type not in LOSS_TYPES
            for name in run
        }

    def in_mcn_layout(self, match: Match, hwc: tuple) -> tuple[np.ndarray, np.ndarray | None]:
        """The matched tensor and its derivative as H x W x C x N (a tensor of another shape
        as it is, moved to MatConvNet's axis order, so that the row shows both shapes)."""
        value, g = self.values[match.capture], self.grads[match.capture]
        if match.view is None:
            as_is = to_hwcn(value) if value.ndim in (2, 4) else value
            return as_is, None if g is None else (to_hwcn(g) if np.ndim(g) in (2, 4) else g)
        return to_mcn_view(value, match.view, hwc), None if g is None else to_mcn_view(g, match.view, hwc)
