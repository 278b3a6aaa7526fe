"""mcn-harness: find where a Keras port of a MatConvNet network diverges.

The public API lives here; ``harness.mcn`` is the MatConvNet reference.
"""

from .mcn import McnError, Net, load_checkpoint, load_net, save_net, seed_net

__all__ = ["McnError", "Net", "load_checkpoint", "load_net", "save_net", "seed_net"]
__version__ = "0.1.0"
