"""MatConvNet's loss on Keras tensors (``keras_batch_loss``), and dtype clones.

The comparison observes the model's real call (``observe``) and takes MatConvNet's loss
of its output, computed from the 1-based labels, as the scalar whose derivatives both
sides compare. ``with_dtype`` clones a Sequential or functional model into another
precision (training parity uses it; comparisons use ``precision.float64_copy``, which
copies any style).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.translate.weights import to_nhwc

if TYPE_CHECKING:
    import keras

__all__ = ["LOSS_TYPES", "keras_batch_loss", "with_dtype"]

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
