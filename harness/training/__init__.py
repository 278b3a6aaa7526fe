"""Training: cnn_train's steps replayed on the Keras model (``replay``:
``compare_training``) and the reference and Keras trained side by side (``parity``).

Modules: ``replay`` (``compare_training``), ``report`` (``TrainingReport``,
``TrainingRow``, text and JSON), ``keras_step`` (``keras_train_step``: the Keras side of
a step), ``state`` (Keras variables and optimizer slots mapped to MatConvNet's
parameters and ``solverState``), ``parity`` (``train_parity``, ``plot_parity``).
DagNN nets: ``dag_replay`` (``compare_training_dag``, cnn_train_dag's steps; ``compare_training``
dispatches to it), ``dag_state`` (DagNN params as Keras variables), ``dag_parity``
(``train_parity`` on a DagNN net).
"""

from harness.training.replay import compare_training
from harness.training.report import TrainingReport, TrainingRow

__all__ = ["TrainingReport", "TrainingRow", "compare_training"]
