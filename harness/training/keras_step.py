"""The Keras side of a training step: ``keras_train_step`` does what ``model.fit`` does
for one batch (forward in training mode, the loss, its gradient, ``optimizer.apply``)
with the loss scaled as cnn_train scales the derivative it gives the solver:

- master: the loss is the batch mean (ignored labels still count in N), so its gradient is
  ``dzdw / numWorkers`` with numSubBatches 1; with S sub-batches cnn_train averages S
  sub-batch means, which is the same number only when S divides N and there is no bnorm;
- beta25: the loss is the batch sum and cnn_train divides its derivative by the batch size:
  the Keras step divides the summed loss by N before differentiating (the regularisation
  losses are not divided);
- a user ``loss`` (a Keras loss name, object or callable on one-hot targets ``(N, K)``) is
  used as Keras would use it, plus the regularisation losses (``model.losses``).

``keras_apply_step`` is the step itself for any data loss (the DagNN replay's too).
``ends_in_probabilities`` says whether the model's output is probabilities (a softmax
before the loss) rather than class scores; ``current_learning_rate`` reads the rate of
the optimizer's next step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.equivalence.align import keras_kind
from harness.equivalence.keras_pass import keras_batch_loss
from harness.equivalence.run import CONVENTIONS
from harness.mcn.options import McnError, as_4d

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment

__all__ = ["current_learning_rate", "ends_in_probabilities", "keras_apply_step", "keras_train_step"]


def _one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    lab = np.asarray(labels, dtype=np.float64).ravel()
    out = np.zeros((lab.size, k))
    for i, c in enumerate(lab):
        if c > 0:
            out[i, int(c) - 1] = 1.0
    return out


def ends_in_probabilities(model: keras.Model, alignment: Alignment) -> bool:
    """Whether the model's output is probabilities (a softmax before the loss)."""
    pairs = alignment.pairs
    if not pairs or pairs[-1].type not in ("softmaxloss", "loss"):
        return False
    last = pairs[-1]
    return last.fused_activation == "softmax" or any(
        keras_kind(model.get_layer(k)) == "softmax" for k in last.keras
    )


def keras_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    x: np.ndarray,
    labels: Any,
    *,
    dialect: str = "master",
    loss: Any = None,
    probabilities: bool = False,
    dtype: str = "float64",
) -> float:
    """One Keras training step as ``compare_training`` runs it: ``model(x, training=True)``,
    the loss (MatConvNet's for the dialect, see the module docstring, or ``loss``) plus
    ``model.losses``, its gradient, ``optimizer.apply``. ``x`` is ``H x W x C x N``,
    ``labels`` 1-based (0 = ignore). Returns the data loss per image before the step."""
    import keras
    import tensorflow as tf

    if dialect not in CONVENTIONS:
        raise McnError(f"Expected dialect to be one of {list(CONVENTIONS)}. Received dialect={dialect!r}")
    x = as_4d(np.asarray(x, dtype=dtype), "x")
    n = x.shape[3]
    lab = np.asarray(labels, dtype=np.float64)
    fn = keras.losses.get(loss) if isinstance(loss, str) else loss

    def data_loss(out):
        if fn is None:
            data = keras_batch_loss(out, lab, n, dialect, probabilities)
            if dialect == "beta25":
                data = data / tf.constant(float(n), dtype=data.dtype)  # cnn_train: dzdw / batchSize
            return data
        k = int(out.shape[-1])
        target = tf.constant(_one_hot(lab, k).reshape((n,) + (1,) * (len(out.shape) - 2) + (k,)), out.dtype)
        target = tf.broadcast_to(target, tf.shape(out))
        # a Keras loss function gives per-image values, averaged as compile() does; a
        # Loss object reduces itself (in its own dtype: floatx() unless given)
        return tf.reduce_mean(tf.cast(fn(target, out), out.dtype))

    return keras_apply_step(model, optimizer, tf.constant(x.transpose(3, 0, 1, 2)), data_loss)


def keras_apply_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, inputs: Any, data_loss: Callable[[Any], Any]
) -> float:
    """What ``model.fit`` does for one batch: ``model(inputs, training=True)``, the data loss
    ``data_loss(output)`` plus the regularisation losses ``model.losses``, its gradient with
    respect to ``model.trainable_variables``, ``optimizer.apply``. ``inputs`` is what the model
    takes (NHWC). Returns the data loss before the step."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        data = data_loss(model(inputs, training=True))
        total = data
        for extra in model.losses:
            total = total + tf.cast(extra, total.dtype)
    variables = model.trainable_variables
    grads = tape.gradient(total, variables)
    optimizer.apply(grads, variables)
    return float(data.numpy())


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float | None:
    """Keras' learning rate for its next step, in float64 (None if it cannot be read)."""
    import keras

    lr = getattr(optimizer, "_learning_rate", None)
    try:
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            return float(np.asarray(lr(optimizer.iterations)))
        if callable(lr) and not isinstance(lr, keras.Variable):
            return float(np.asarray(lr()))
        return float(np.asarray(lr))
    except (TypeError, ValueError):  # an exotic learning rate: reported as unknown
        return None
