"""The small DagNN nets of the translation tests: each exercises some blocks, sharing or
inputs and outputs (see each docstring), with params drawn from a seeded RandomState."""

from __future__ import annotations

import numpy as np

from harness.mcn.dagnn import DagLayer, DagNet, Param


def param(name: str, r: np.random.RandomState, *shape: int, scale: float = 0.5) -> Param:
    """A param of ``shape`` drawn from ``r``: ``scale`` times standard normal."""
    return Param(name, scale * r.randn(*shape))


def moments(name: str, r: np.random.RandomState, c: int) -> Param:
    """BatchNorm moments ``[mu, sigma]`` of ``c`` channels drawn from ``r`` (learning rate 0.1)."""
    return Param(name, np.stack([0.3 * r.randn(c), 0.5 + r.rand(c)], axis=1), learning_rate=0.1)


def conv_params(name: str, r: np.random.RandomState, *shape: int, biases: int | None = None) -> list[Param]:
    """Filters ``{name}f`` of ``shape`` then biases ``{name}b`` (``biases`` x 1, by default the
    filter count), drawn from ``r`` in that order as ``param`` draws them."""
    return [param(f"{name}f", r, *shape), param(f"{name}b", r, shape[3] if biases is None else biases, 1)]


def bnorm_params(name: str, r: np.random.RandomState, c: int) -> list[Param]:
    """BatchNorm gains ``{name}g`` (about 1), biases ``{name}b`` and moments ``{name}m`` of
    ``c`` channels, drawn from ``r`` in that order."""
    return [Param(f"{name}g", 1 + 0.2 * r.randn(c, 1)), param(f"{name}b", r, c, 1), moments(f"{name}m", r, c)]


def blocks_net() -> DagNet:
    """A chain through every single-input block: Conv with asymmetric padding and stride,
    a strided dilated conv without bias, a grouped 1x1 conv, leaky and plain ReLU, max
    pooling with padding, LRN, DropOut, avg pooling with and without padding, Sigmoid,
    SoftMax (followed by a conv: the sum of a softmax has no derivative)."""
    r = np.random.RandomState(0)
    layers = [
        DagLayer("conv_a", "dagnn.Conv", ["x"], ["a"], ["fa", "ba"], {"pad": [1, 0, 2, 1], "stride": [2, 1]}),
        DagLayer("relu_a", "dagnn.ReLU", ["a"], ["ar"], [], {"leak": 0.1}),
        DagLayer(
            "conv_d",
            "dagnn.Conv",
            ["ar"],
            ["d"],
            ["fd"],
            {"pad": 2, "stride": 2, "dilate": 2, "has_bias": False},
        ),
        DagLayer("conv_g", "dagnn.Conv", ["d"], ["g"], ["fg", "bg"]),
        DagLayer("relu_g", "dagnn.ReLU", ["g"], ["gr"], []),
        DagLayer(
            "pool_m",
            "dagnn.Pooling",
            ["gr"],
            ["pm"],
            [],
            {"method": "max", "pool_size": 3, "pad": [1, 1, 0, 1], "stride": 2},
        ),
        DagLayer("lrn", "dagnn.LRN", ["pm"], ["l"], [], {"param": [5, 1, 0.1, 0.75]}),
        DagLayer("drop", "dagnn.DropOut", ["l"], ["dr"], [], {"rate": 0.3}),
        DagLayer(
            "pool_a",
            "dagnn.Pooling",
            ["dr"],
            ["pa"],
            [],
            {"method": "avg", "pool_size": 2, "pad": [0, 1, 1, 0]},
        ),
        DagLayer("pool_b", "dagnn.Pooling", ["pa"], ["pb"], [], {"method": "avg", "pool_size": [2, 1]}),
        DagLayer("sig", "dagnn.Sigmoid", ["pb"], ["s"], []),
        DagLayer("soft", "dagnn.SoftMax", ["s"], ["h"], []),
        DagLayer("conv_h", "dagnn.Conv", ["h"], ["y"], ["fh", "bh"]),
    ]
    params = [
        param("fa", r, 3, 3, 3, 4),
        param("ba", r, 4, 1),
        param("fd", r, 3, 3, 4, 6),
        param("fg", r, 1, 1, 3, 6),  # 2 groups of 3 channels
        param("bg", r, 6, 1),
        param("fh", r, 1, 1, 6, 5, scale=2.0),
        param("bh", r, 5, 1),
    ]
    return DagNet(layers, params=params)


def residual_net() -> DagNet:
    """conv-bn-relu-conv-bn plus a projection, Sum, ReLU, global avg pool, fc, softmaxlog."""
    r = np.random.RandomState(1)
    layers = [
        DagLayer("conv1", "dagnn.Conv", ["input"], ["c1"], ["c1f", "c1b"], {"pad": 1}),
        DagLayer("bn1", "dagnn.BatchNorm", ["c1"], ["b1"], ["bn1g", "bn1b", "bn1m"], {"epsilon": 1e-4}),
        DagLayer("relu1", "dagnn.ReLU", ["b1"], ["r1"], []),
        DagLayer("conv2", "dagnn.Conv", ["r1"], ["c2"], ["c2f", "c2b"], {"pad": 1}),
        DagLayer("bn2", "dagnn.BatchNorm", ["c2"], ["b2"], ["bn2g", "bn2b", "bn2m"]),
        DagLayer("proj", "dagnn.Conv", ["input"], ["p"], ["pf", "pb"]),
        DagLayer("sum", "dagnn.Sum", ["b2", "p"], ["s"], []),
        DagLayer("relu2", "dagnn.ReLU", ["s"], ["r2"], []),
        DagLayer("pool", "dagnn.Pooling", ["r2"], ["gp"], [], {"method": "avg", "pool_size": 6}),
        DagLayer("fc", "dagnn.Conv", ["gp"], ["prediction"], ["fcf", "fcb"]),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], [], {"loss": "softmaxlog"}),
    ]
    params = [
        *conv_params("c1", r, 3, 3, 3, 4),
        *bnorm_params("bn1", r, 4),
        *conv_params("c2", r, 3, 3, 4, 4),
        *bnorm_params("bn2", r, 4),
        *conv_params("p", r, 1, 1, 3, 4),
        *conv_params("fc", r, 1, 1, 4, 3),
    ]
    return DagNet(layers, params=params)


def inception_net() -> DagNet:
    """Four branches joined by Concat over channels; a Concat over H; a three-input Sum
    reading one var twice; three outputs."""
    r = np.random.RandomState(2)
    layers = [
        DagLayer("b1", "dagnn.Conv", ["x"], ["o1"], ["b1f", "b1b"]),
        DagLayer("b2a", "dagnn.Conv", ["x"], ["o2a"], ["b2af", "b2ab"]),
        DagLayer("b2r", "dagnn.ReLU", ["o2a"], ["o2r"], []),
        DagLayer("b2b", "dagnn.Conv", ["o2r"], ["o2"], ["b2bf", "b2bb"], {"pad": 1}),
        DagLayer("b3", "dagnn.Conv", ["x"], ["o3"], ["b3f", "b3b"], {"pad": 2}),
        DagLayer("b4p", "dagnn.Pooling", ["x"], ["o4p"], [], {"pool_size": 3, "pad": 1}),
        DagLayer("b4", "dagnn.Conv", ["o4p"], ["o4"], ["b4f", "b4b"]),
        DagLayer("cat", "dagnn.Concat", ["o1", "o2", "o3", "o4"], ["cat"], [], {"dim": 3}),
        DagLayer("head", "dagnn.Conv", ["cat"], ["out1"], ["hf", "hb"]),
        DagLayer("cat_h", "dagnn.Concat", ["o1", "o3"], ["out2"], [], {"dim": 1}),
        DagLayer("sum3", "dagnn.Sum", ["o1", "o4", "o1"], ["out3"], []),
    ]
    params = [
        *conv_params("b1", r, 1, 1, 4, 2),
        *conv_params("b2a", r, 1, 1, 4, 3),
        *conv_params("b2b", r, 3, 3, 3, 2),
        *conv_params("b3", r, 5, 5, 4, 2),
        *conv_params("b4", r, 1, 1, 4, 2),
        *conv_params("h", r, 1, 1, 8, 3),
    ]
    return DagNet(layers, params=params)


def fcn_net() -> DagNet:
    """FCN-style skip: a stride-2 branch upsampled by ConvTranspose, cropped by Crop to the
    skip score's size and summed; a grouped ConvTranspose with crop; a ConvTranspose whose
    filters are smaller than its upsampling; a per-pixel softmaxlog Loss."""
    r = np.random.RandomState(3)
    layers = [
        DagLayer("conv1", "dagnn.Conv", ["input"], ["c1"], ["c1f", "c1b"], {"pad": 1}),
        DagLayer("relu1", "dagnn.ReLU", ["c1"], ["r1"], []),
        DagLayer("score_skip", "dagnn.Conv", ["r1"], ["skip"], ["sf", "sb"]),
        DagLayer("pool", "dagnn.Pooling", ["r1"], ["p"], [], {"pool_size": 2, "stride": 2}),
        DagLayer("score_low", "dagnn.Conv", ["p"], ["low"], ["lf", "lb"], {"pad": 1}),
        DagLayer("up", "dagnn.ConvTranspose", ["low"], ["up"], ["uf", "ub"], {"upsample": 2, "crop": 0}),
        DagLayer("crop", "dagnn.Crop", ["up", "skip"], ["upc"], [], {"crop": [1, 1]}),
        DagLayer("fuse", "dagnn.Sum", ["upc", "skip"], ["prediction"], []),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], [], {"loss": "softmaxlog"}),
        DagLayer(
            "up_g",
            "dagnn.ConvTranspose",
            ["low"],
            ["upg"],
            ["gf", "gb"],
            {"upsample": 2, "crop": [0, 1, 1, 0], "num_groups": 2},
        ),
        DagLayer(
            "up_s", "dagnn.ConvTranspose", ["low"], ["ups"], ["nf"], {"upsample": [2, 3], "has_bias": False}
        ),
    ]
    params = [
        *conv_params("c1", r, 3, 3, 3, 4),
        *conv_params("s", r, 1, 1, 4, 2),
        *conv_params("l", r, 3, 3, 4, 2),
        *conv_params("u", r, 4, 4, 2, 2),
        *conv_params("g", r, 3, 3, 3, 2, biases=6),  # 2 groups: 3 outputs each from 1 input channel
        param("nf", r, 1, 2, 2, 2),
    ]
    return DagNet(layers, params=params)


def recursive_net() -> DagNet:
    """One conv's params used by three layers (recursive block, as LapSRN; the third with
    its own padding, a helper layer of its own), a skip Sum."""
    r = np.random.RandomState(4)
    rec = {"pad": 1}
    layers = [
        DagLayer("in_conv", "dagnn.Conv", ["x"], ["c0"], ["in_f", "in_b"], {"pad": 1}),
        DagLayer("relu0", "dagnn.ReLU", ["c0"], ["r0"], [], {"leak": 0.2}),
        DagLayer("rec1", "dagnn.Conv", ["r0"], ["c1"], ["shared_f", "shared_b"], rec),
        DagLayer("relu1", "dagnn.ReLU", ["c1"], ["r1"], [], {"leak": 0.2}),
        DagLayer("rec2", "dagnn.Conv", ["r1"], ["c2"], ["shared_f", "shared_b"], rec),
        DagLayer("relu2", "dagnn.ReLU", ["c2"], ["r2"], [], {"leak": 0.2}),
        DagLayer("rec3", "dagnn.Conv", ["r2"], ["c3"], ["shared_f", "shared_b"], {"pad": [2, 0, 1, 1]}),
        DagLayer("skip", "dagnn.Sum", ["c3", "r0"], ["s"], []),
        DagLayer("out_conv", "dagnn.Conv", ["s"], ["res"], ["out_f", "out_b"], {"pad": 1}),
        DagLayer("out", "dagnn.Sum", ["res", "x"], ["y"], []),
    ]
    params = [
        *conv_params("in_", r, 3, 3, 1, 4),
        param("shared_f", r, 3, 3, 4, 4, scale=0.3),
        param("shared_b", r, 1, 4),
        *conv_params("out_", r, 3, 3, 4, 1),
    ]
    return DagNet(layers, params=params)


def scale_net() -> DagNet:
    """Scale by params (scale and bias), by a var with a bias param, by a spatial map without
    bias, by a var without bias, and by a var with a bias var."""
    r = np.random.RandomState(5)
    layers = [
        DagLayer("scale1", "dagnn.Scale", ["x"], ["s1"], ["w1", "b1"], {"size": [1, 1, 4]}),
        DagLayer("sig", "dagnn.Sigmoid", ["s1"], ["g"], []),
        DagLayer("scale2", "dagnn.Scale", ["s1", "g"], ["s2"], ["b2"]),
        DagLayer("scale3", "dagnn.Scale", ["s2"], ["s3"], ["w3"], {"has_bias": False}),
        DagLayer("gpool", "dagnn.Pooling", ["g"], ["gp"], [], {"method": "avg", "pool_size": [5, 6]}),
        DagLayer("scale4", "dagnn.Scale", ["s3", "gp"], ["s4"], [], {"has_bias": False}),
        DagLayer("scale5", "dagnn.Scale", ["s4", "gp", "gp"], ["y"], []),
    ]
    params = [
        param("w1", r, 1, 1, 4, scale=1.0),
        param("b1", r, 1, 1, 4),
        param("b2", r, 1, 1, 4),
        param("w3", r, 5, 6, scale=1.0),
    ]
    return DagNet(layers, params=params)


def two_inputs_net() -> DagNet:
    """Two data inputs, labels, two Loss types on one score var, a second score read from
    the first: outputs [prediction, aux]."""
    r = np.random.RandomState(6)
    layers = [
        DagLayer("ca", "dagnn.Conv", ["x1"], ["a"], ["af", "ab"]),
        DagLayer("cb", "dagnn.Conv", ["x2"], ["b"], ["bf", "bb"], {"pad": [1, 1, 0, 0]}),
        DagLayer("sum", "dagnn.Sum", ["a", "b"], ["prediction"], []),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], []),
        DagLayer("err", "dagnn.Loss", ["prediction", "label"], ["top1err"], [], {"loss": "classerror"}),
        DagLayer("aux", "dagnn.Conv", ["prediction"], ["aux"], ["xf", "xb"]),
        DagLayer("aux_loss", "dagnn.Loss", ["aux", "binlabel"], ["aux_objective"], [], {"loss": "hinge"}),
    ]
    params = [
        *conv_params("a", r, 3, 3, 2, 3),
        *conv_params("b", r, 3, 1, 2, 3),
        *conv_params("x", r, 1, 1, 3, 1),
    ]
    return DagNet(layers, params=params)


def batch(r: np.random.RandomState, *shape: int) -> np.ndarray:
    """Input data of ``shape`` (``H x W x C x N``) drawn from ``r``: standard normal."""
    return r.randn(*shape)


# --------------------------------------------------------------------------- equivalence
