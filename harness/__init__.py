"""mcn-harness: find where a Keras port of a MatConvNet network diverges.

The public API lives here; ``harness.mcn`` is the MatConvNet reference. TensorFlow and
Keras load on first use, so the reference works without them.
"""

from . import compare as _compare_package  # noqa: F401  (bind the package before the function)
from .compare.probe import compare
from .compare.training import compare_training
from .mcn import McnError, Net, load_checkpoint, load_net, save_net, seed_net
from .testing import assert_equivalent

__all__ = [
    "McnError",
    "Net",
    "assert_equivalent",
    "compare",
    "compare_training",
    "load_checkpoint",
    "load_net",
    "matconvnet_optimizer",
    "save_net",
    "seed_net",
    "to_keras",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "to_keras":
        from .translate import to_keras

        return to_keras
    if name == "matconvnet_optimizer":
        from .translate.optim import matconvnet_optimizer

        return matconvnet_optimizer
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
