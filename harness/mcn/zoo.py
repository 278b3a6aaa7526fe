"""Network builders: the seed network of the question (cnn_mnist_init style).

The seed maps a 28x28x1 image to 1x1x2 class scores: four conv/max-pool blocks without
ReLUs between them, ``ip1`` (1x1x256x256 filters on 512 channels: a 2-group
convolution), a ReLU, the ``classifier`` and a softmaxloss.
"""

from __future__ import annotations

import numpy as np

from harness.mcn.net import Layer, Net
from harness.mcn.simplenn import vl_simplenn_tidy

__all__ = ["seed_net", "SEED_LEARNING_RATES"]

# 0.01 for 10 epochs, 0.001 for 10, 0.0001 for 10 (the question's schedule).
SEED_LEARNING_RATES = np.concatenate([np.full(10, 0.01), np.full(10, 0.001), np.full(10, 0.0001)])[None, :]

# (name, filter shape FH x FW x FC x K, stride, pad) then a pool (name, pool, stride).
_SEED_BLOCKS = (
    ("conv1", (3, 3, 1, 64), ("pool1", 3, 1)),
    ("conv2", (5, 5, 64, 128), ("pool2", 2, 2)),
    ("conv3", (3, 3, 128, 256), ("pool3", 3, 1)),
    ("conv4", (5, 5, 256, 512), ("pool4", 2, 1)),
)


def _conv(name: str, shape: tuple[int, ...], rng: np.random.RandomState, scale: float, bias: bool) -> Layer:
    # f*randn(...,'single') in cnn_mnist_init: float32 draws scaled in float32.
    filters = rng.randn(*shape).astype(np.float32) * np.float32(scale)
    biases = np.zeros((1, shape[3]), np.float32) if bias else np.zeros((0, 0), np.float32)
    return Layer(
        "conv",
        name,
        [filters, biases],
        stride=1.0,
        pad=0.0,
        learning_rate=np.array([[1.0, 2.0]]),
    )


def _bnorm(name: str, channels: int) -> Layer:
    # The question's insertBnorm gives learningRate [1 1]: two entries only, which makes
    # cnn_train fail on learningRate(3) (kept: it is what the question's code does).
    return Layer(
        "bnorm",
        name,
        [np.ones((channels, 1), np.float32), np.zeros((channels, 1), np.float32)],
        learning_rate=np.array([[1.0, 1.0]]),
        weight_decay=np.array([[0.0, 0.0]]),
    )


def seed_net(seed: int = 0, batch_normalization: bool = False, scale: float = 0.0125) -> Net:
    """The question's MatConvNet network, tidied, with ``scale * randn`` float32 filters
    drawn from ``np.random.RandomState(seed)`` (in layer order) and zero biases.

    With ``batch_normalization`` a bnorm layer follows conv1-conv4 and ip1 (whose biases
    are then removed), as the question's insertBnorm does. ``net.meta`` carries
    ``inputSize`` [28 28 1] and the question's ``trainOpts``: learningRate 0.01/0.001/0.0001
    over 30 epochs, batchSize 256, momentum 0.9, weightDecay 0.0005.
    """
    rng = np.random.RandomState(seed)
    layers: list[Layer] = []
    bn = batch_normalization
    for conv_name, shape, (pool_name, pool, stride) in _SEED_BLOCKS:
        layers.append(_conv(conv_name, shape, rng, scale, bias=not bn))
        if bn:
            layers.append(_bnorm(f"bn_{conv_name}", shape[3]))
        layers.append(
            Layer(
                "pool",
                pool_name,
                method="max",
                pool=np.array([[pool, pool]], float),
                stride=float(stride),
                pad=0.0,
            )
        )
    layers.append(_conv("ip1", (1, 1, 256, 256), rng, scale, bias=not bn))
    if bn:
        layers.append(_bnorm("bn_ip1", 256))
    layers.append(Layer("relu", "relu1"))
    layers.append(_conv("classifier", (1, 1, 256, 2), rng, scale, bias=True))
    layers.append(Layer("softmaxloss", "loss"))
    meta = {
        "inputSize": np.array([[28.0, 28.0, 1.0]]),
        "trainOpts": {
            "learningRate": SEED_LEARNING_RATES.copy(),
            "numEpochs": 30.0,
            "batchSize": 256.0,
            "momentum": 0.9,
            "weightDecay": 0.0005,
        },
    }
    return vl_simplenn_tidy(Net(layers, meta))
