"""mcn-harness: find where a Keras port of a MatConvNet network diverges.

The public API lives here; ``harness.mcn`` is the MatConvNet reference. TensorFlow and
Keras load on first use, so the reference works without them.
"""

from harness.equivalence.run import compare
from harness.mcn import McnError, Net, load_checkpoint, load_net, save_net, seed_net
from harness.pipeline import CheckResult, check
from harness.testing.asserts import assert_equivalent
from harness.training.replay import compare_training

__all__ = [
    "CheckResult",
    "McnError",
    "Net",
    "assert_equivalent",
    "check",
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
        from harness.translate import to_keras

        return to_keras
    if name == "matconvnet_optimizer":
        from harness.translate.optim import matconvnet_optimizer

        return matconvnet_optimizer
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
