"""vl_simplenn_tidy, vl_simplenn and the seed network."""

from __future__ import annotations

import numpy as np
import pytest

from harness.mcn import (
    McnError,
    seed_net,
    vl_nnbnorm,
    vl_nnconv,
    vl_simplenn,
    vl_simplenn_tidy,
)
from harness.mcn.net import Layer, Net

from ..helpers import set_bnorm_moments


@pytest.fixture(scope="module")
def seed() -> Net:
    return seed_net(seed=0)


def _labels(n: int, classes: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(1, classes + 1, size=(1, n)).astype(float)


def test_seed_maps_28x28x1_to_1x1x2(seed):
    x = np.random.RandomState(1).randn(28, 28, 1, 3).astype(np.float32)
    res = vl_simplenn(seed, x, 1.0, _labels(3))
    assert res[-2].x.shape == (1, 1, 2, 3)
    assert res[-1].x.size == 1
    assert res[0].dzdx.shape == x.shape
    assert [l.name for l in seed.layers] == [
        "conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "conv4", "pool4",
        "ip1", "relu1", "classifier", "loss",
    ]  # fmt: skip


def test_seed_ip1_is_two_groups(seed):
    i = seed.index("ip1")
    f, b = seed.layers[i].weights
    assert f.shape == (1, 1, 256, 256)
    x = np.random.RandomState(2).randn(28, 28, 1, 2).astype(np.float32)
    res = vl_simplenn(seed, x, labels=_labels(2))
    xin = res[i].x
    assert xin.shape[2] == 512  # 512 channels into 256-deep filters: G = 2
    # group g reads channels g*256.. and writes filters g*128..
    lo = vl_nnconv(xin[:, :, :256], f[..., :128], b[:, :128])
    hi = vl_nnconv(xin[:, :, 256:], f[..., 128:], b[:, 128:])
    np.testing.assert_allclose(res[i + 1].x, np.concatenate([lo, hi], axis=2), rtol=1e-5, atol=1e-7)


def test_seed_meta_and_bnorm_variant():
    net = seed_net(seed=0, batch_normalization=True)
    types = [l.type for l in net.layers]
    assert types.count("bnorm") == 5
    bn = net.layer("bn_conv1")
    assert bn.weights[2].shape == (64, 2) and bn.weights[2].dtype == np.float32
    np.testing.assert_array_equal(bn.learning_rate, [[1, 1]])  # as the question writes it
    assert net.layer("conv1").weights[1].size == 0  # bias removed before bnorm
    opts = net.meta["trainOpts"]
    assert opts["batchSize"] == 256 and opts["momentum"] == 0.9 and opts["weightDecay"] == 0.0005
    lr = np.asarray(opts["learningRate"]).ravel()
    assert lr.size == 30 and set(lr[:10]) == {0.01} and set(lr[10:20]) == {0.001} and set(lr[20:]) == {0.0001}


def test_seed_weights_are_gaussian_0125():
    net = seed_net(seed=5)
    f = net.layer("conv4").weights[0]
    assert f.dtype == np.float32
    assert abs(float(f.std()) - 0.0125) < 2e-4 and abs(float(f.mean())) < 2e-4
    assert not np.any(net.layer("conv4").weights[1])
    assert seed_net(seed=5) == net and seed_net(seed=6) != net


def test_tidy_fills_matconvnet_defaults():
    raw = Net(
        [
            Layer("conv", weights=[np.ones((1, 1, 2, 2), np.float32), np.zeros((1, 2), np.float32)]),
            Layer("pool", pool=2),
            Layer("relu"),
            Layer("dropout"),
            Layer("lrn"),
            Layer("bnorm", weights=[np.ones((2, 1), np.float32), np.zeros((2, 1), np.float32)]),
            Layer("convt", filters=np.ones((2, 2, 2, 2), np.float32), biases=np.zeros((1, 2), np.float32)),
            Layer("softmaxloss"),
        ]
    )
    t = vl_simplenn_tidy(raw)
    assert [l.name for l in t.layers] == [f"layer{i}" for i in range(1, 9)]
    conv, pool, relu, drop, lrn, bn, convt, _ = t.layers
    assert (conv.pad, conv.stride, conv.dilate, conv.opts) == (0.0, 1.0, 1.0, [])
    assert (pool.pad, pool.stride) == (0.0, 1.0) and not pool.has("method")  # MatConvNet's tidy quirk
    assert relu.leak == 0.0 and drop.rate == 0.5
    np.testing.assert_allclose(lrn.param, [5, 1, 0.0001 / 5, 0.75])
    assert bn.epsilon == 1e-5 and bn.weights[2].shape == (2, 2) and not bn.weights[2].any()
    assert (convt.crop, convt.upsample, convt.num_groups) == (0.0, 1.0, 1.0) and len(convt.weights) == 2
    assert all(l.precious is False for l in t.layers)
    assert raw.layers[0].name is None  # tidy returns a new net


def test_dialects_differ_by_batch_size_in_loss_and_bnorm_moments():
    net = seed_net(seed=1, batch_normalization=True)
    n = 4
    x = np.random.RandomState(3).randn(28, 28, 1, n)
    m = vl_simplenn(net, x, 1.0, _labels(n), dialect="master")
    b = vl_simplenn(net, x, 1.0, _labels(n), dialect="beta25")
    np.testing.assert_allclose(b[-1].x, n * m[-1].x, rtol=1e-12)
    np.testing.assert_allclose(b[0].dzdx, n * m[0].dzdx, rtol=1e-9, atol=1e-14)
    i = net.index("bn_conv2")
    # gains: a factor n from the loss; moments: beta25 multiplies them by n on top
    np.testing.assert_allclose(b[i].dzdw[0], n * m[i].dzdw[0], rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(b[i].dzdw[2], n * m[i].dzdw[2], rtol=1e-12)
    _, _, _, moments = vl_nnbnorm(m[i].x, *net.layers[i].weights[:2], m[i + 1].dzdx, epsilon=1e-5)
    np.testing.assert_allclose(m[i].dzdw[2], moments, rtol=1e-12)


def test_test_mode_uses_stored_moments_forward_but_batch_statistics_backward():
    net = seed_net(seed=2, batch_normalization=True)
    rng = np.random.RandomState(4)
    set_bnorm_moments(net, rng)
    x = rng.randn(28, 28, 1, 3).astype(np.float32)
    test = vl_simplenn(net, x, 1.0, _labels(3), mode="test")
    normal = vl_simplenn(net, x, 1.0, _labels(3), mode="normal")
    i = net.index("bn_conv1")
    mu, sigma = net.layers[i].weights[2].T
    expected = (test[i].x - mu[None, None, :, None]) / sigma[None, None, :, None]
    np.testing.assert_allclose(test[i + 1].x, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(test[i + 1].x, normal[i + 1].x)
    # backward in test mode: vl_nnbnorm without moments (batch statistics)
    dzdx, *_ = vl_nnbnorm(test[i].x, *net.layers[i].weights[:2], test[i + 1].dzdx, epsilon=1e-5)
    np.testing.assert_allclose(test[i].dzdx, dzdx, rtol=1e-6)


def test_dropout_masks_and_test_mode():
    net = vl_simplenn_tidy(Net([Layer("dropout", "drop", rate=0.5), Layer("relu", "r")]))
    x = np.random.RandomState(0).randn(2, 2, 3, 2).astype(np.float32)
    mask = np.where(np.random.RandomState(1).rand(*x.shape) > 0.5, 2.0, 0.0).astype(np.float32)
    res = vl_simplenn(net, x, np.ones_like(x), masks={0: mask})
    np.testing.assert_array_equal(res[1].x, x * mask)
    np.testing.assert_array_equal(res[0].dzdx, (x * mask > 0) * mask)
    res = vl_simplenn(net, x, np.ones_like(x), mode="test")
    np.testing.assert_array_equal(res[1].x, x)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([Layer("fancy", "f")], r"layer 1 'f'.*type.*'fancy'"),
        ([Layer("pool", "p", pad=0, stride=1)], r"layer 1 'p' \(pool\): missing field 'pool'"),
        (
            [Layer("conv", "c", [np.ones((3, 3, 2, 4), np.float32), np.zeros((1, 4))])],
            r"layer 1 'c' \(conv\)",
        ),
        (
            [Layer("conv", "c", [np.ones((9, 9, 1, 4), np.float32), np.zeros((1, 4))])],
            r"layer 1 'c' \(conv\)",
        ),
        ([Layer("relu", "r"), Layer("softmaxloss", "loss", class_=np.array([[4.0]]))], r"layer 2 'loss'"),
    ],
    ids=["unknown-type", "missing-field", "depth-not-dividing", "window-too-large", "label-out-of-range"],
)
def test_bad_networks_name_the_layer(layers, message):
    net = vl_simplenn_tidy(Net(layers))
    x = np.random.RandomState(0).randn(5, 5, 3, 1).astype(np.float32)
    with pytest.raises(McnError, match=message):
        vl_simplenn(net, x, 1.0)


def test_bad_arguments():
    net = seed_net(seed=0)
    x = np.zeros((28, 28, 1, 1), np.float32)
    with pytest.raises(
        McnError, match=r"layer 12 'loss' \(softmaxloss\): missing field 'class' \(the labels"
    ):
        vl_simplenn(net, x)
    with pytest.raises(McnError, match="mode"):
        vl_simplenn(net, x, mode="train")
    with pytest.raises(McnError, match="dialect"):
        vl_simplenn(net, x, dialect="beta20")
    with pytest.raises(McnError, match="x"):
        vl_simplenn(net, np.zeros((28, 28, 1, 1, 1), np.float32), labels=[[1]])
    with pytest.raises(McnError, match="x"):
        vl_simplenn(net, np.zeros((28, 28, 1, 1), np.int32), labels=[[1]])
    with pytest.raises(McnError, match=r"layer 1 'conv1'"):
        vl_simplenn(net, np.zeros((28, 28, 3, 1), np.float32), labels=[[1]])  # wrong input depth
