"""MatConvNet -> Keras: the only place that knows both layouts."""

from harness.translate.build import TranslationError, keras_loss, keras_name, to_keras
from harness.translate.dag_build import (
    dag_inputs,
    dag_keras_layers,
    dag_outputs,
    dag_params_from_keras,
    dag_weights_to_keras,
    to_keras_dag,
)
from harness.translate.weights import load_weights, net_from_keras, to_hwcn, to_nhwc

_OPTIM = (
    "MatConvNetSGD",
    "MatConvNetAdam",
    "MatConvNetRMSprop",
    "MatConvNetAdagrad",
    "MatConvNetAdadelta",
    "MatConvNetSchedule",
    "matconvnet_optimizer",
    "matconvnet_multipliers",
)

__all__ = [
    *_OPTIM,
    "TranslationError",
    "dag_inputs",
    "dag_keras_layers",
    "dag_outputs",
    "dag_params_from_keras",
    "dag_weights_to_keras",
    "keras_loss",
    "keras_name",
    "load_weights",
    "net_from_keras",
    "to_hwcn",
    "to_keras",
    "to_keras_dag",
    "to_nhwc",
]


def __getattr__(name: str):
    # optim imports keras at module level: load it on first use only
    if name in _OPTIM:
        from harness.translate import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'harness.translate' has no attribute {name!r}")
