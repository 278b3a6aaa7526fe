"""MatConvNet -> Keras: the only place that knows both layouts."""

from .build import TranslationError, keras_loss, keras_name, to_keras
from .weights import load_weights, net_from_keras, to_hwcn, to_nhwc

__all__ = [
    "TranslationError",
    "keras_loss",
    "keras_name",
    "load_weights",
    "net_from_keras",
    "to_hwcn",
    "to_keras",
    "to_nhwc",
]
