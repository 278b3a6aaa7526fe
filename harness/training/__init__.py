"""Training: cnn_train's steps replayed on the Keras model (``replay``:
``compare_training``) and the reference and Keras trained side by side (``parity``)."""

from harness.training.replay import TrainingReport, TrainingRow, compare_training

__all__ = ["TrainingReport", "TrainingRow", "compare_training"]
