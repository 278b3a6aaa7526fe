"""MatConvNet -> Keras: the only place that knows both layouts."""

from harness.translate.build import TranslationError, keras_loss, keras_name, to_keras
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
    "keras_loss",
    "keras_name",
    "load_weights",
    "net_from_keras",
    "to_hwcn",
    "to_keras",
    "to_nhwc",
]


def __getattr__(name: str):
    # optim imports keras at module level: load it on first use only
    if name in _OPTIM:
        from harness.translate import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'harness.translate' has no attribute {name!r}")
