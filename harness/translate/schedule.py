"""cnn_train's learning-rate schedule as a Keras ``LearningRateSchedule``.

cnn_train takes epoch e's rate from ``opts.learningRate(min(e, end))``; Keras asks a
schedule for the rate at each optimizer iteration. ``MatConvNetSchedule`` maps one to the
other and keeps the rates in float64 (``harness.translate.optim`` uses it for a
``train_opts.learning_rate`` with several values).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from harness.mcn.options import McnError
from harness.mcn.train_options import learning_rate_schedule, real_part

__all__ = ["MatConvNetSchedule"]


@keras.saving.register_keras_serializable(package="mcn_harness")
class MatConvNetSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """cnn_train's learning rate: ``learningRate(min(epoch, end))`` (1-based epoch).

    Keras counts optimizer iterations from 0; iteration k belongs to epoch
    ``floor(k / steps_per_epoch) + 1``. The rates are returned as float64 (a float32
    schedule would change 0.01 by 2e-10 relative).
    """

    def __init__(self, learning_rate, steps_per_epoch: int = 1, name: str = "matconvnet_schedule"):
        super().__init__()
        try:
            rates = learning_rate_schedule(learning_rate, "learning_rate")
        except McnError:  # a Keras schedule raises ValueError
            raise ValueError(
                "Expected learning_rate to be a finite number or a non-empty list of them. "
                f"Received learning_rate={learning_rate!r}"
            ) from None
        spe = real_part(steps_per_epoch, "steps_per_epoch")
        if spe != round(spe) or spe < 1:
            raise ValueError(
                "Expected steps_per_epoch to be a positive integer. "
                f"Received steps_per_epoch={steps_per_epoch!r}"
            )
        self.learning_rate = [float(r) for r in rates]
        self.steps_per_epoch = int(spe)
        self.name = name

    def epoch(self, step: int) -> int:
        """The 1-based epoch of the 0-based iteration ``step``."""
        return int(step) // self.steps_per_epoch + 1

    def rate(self, step: int) -> float:
        """The learning rate at the 0-based iteration ``step``, as a Python float."""
        return self.learning_rate[min(self.epoch(step), len(self.learning_rate)) - 1]

    def __call__(self, step):
        rates = ops.convert_to_tensor(np.asarray(self.learning_rate, dtype=np.float64))
        epoch = ops.floor_divide(ops.cast(step, "int64"), self.steps_per_epoch)
        return ops.take(rates, ops.minimum(epoch, len(self.learning_rate) - 1))

    def get_config(self):
        return {
            "learning_rate": list(self.learning_rate),
            "steps_per_epoch": self.steps_per_epoch,
            "name": self.name,
        }
