"""harness.translate: the faithful Keras model, weight transfer both ways, serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import harness
from harness.mcn import seed_net, vl_simplenn, vl_simplenn_tidy
from harness.mcn.net import Layer, Net
from harness.translate import keras_name, net_from_keras, to_hwcn, to_keras, to_nhwc

from ..golden import case_net, load_case
from ..helpers import set_bnorm_moments


def _batch(net, n=3, seed=0):
    h, w, c = (int(v) for v in np.asarray(net.meta["inputSize"]).ravel()[:3])
    rng = np.random.RandomState(seed)
    return rng.randn(h, w, c, n), rng.randint(1, 3, size=(1, n)).astype(float)


@pytest.fixture(scope="module")
def mixed():
    """The golden small_mixed net: padded conv, leaky ReLU, LRN, padded avg and max pooling,
    stride, dropout, a fully-connected conv, and a 'loss' layer."""
    return vl_simplenn_tidy(case_net(load_case("simplenn_small_mixed_master")))


@pytest.mark.parametrize("bn", [False, True], ids=["seed", "seed_bnorm"])
def test_seed_translation_is_equivalent(bn):
    net = seed_net(seed=1, batch_normalization=bn)
    model = to_keras(net)
    assert model.output_shape == (None, 1, 1, 2)
    x, labels = _batch(net, 4)
    report = harness.compare(net, model, x, labels, mode="normal")
    assert report.ok, str(report)
    assert max(r.max_rel for r in report.rows) < 1e-12
    kinds = {r.tensor for r in report.rows}
    assert {"x", "dzdx", "dzdw{1}", "dzdw{2}", "loss"} <= kinds


@pytest.mark.parametrize("mode", ["normal", "test"])
@pytest.mark.parametrize("dialect", ["master", "beta25"])
def test_mixed_translation_is_equivalent(mixed, mode, dialect):
    model = to_keras(mixed)
    x, _ = _batch(mixed, 3, seed=2)
    labels = np.array([[1.0, 4.0, 0.0]])  # label 0 is ignored
    report = harness.compare(mixed, model, x, labels, mode=mode, dialect=dialect)
    assert report.ok, str(report)
    assert any(lim.kind == "lrn-exact-power" and "LRN" in lim.text for lim in report.limitations)
    names = {type(l).__name__ for l in model.layers}
    assert {
        "MatConvNetPooling",
        "MatConvNetLRN",
        "MatConvNetLeakyReLU",
        "ZeroPadding2D",
        "ReLU",
        "Dropout",
    } <= names


def test_translation_matches_reference_forward_in_float32(mixed):
    model = to_keras(mixed, dtype="float32")
    x, _ = _batch(mixed, 2, seed=3)
    ref = vl_simplenn(mixed, x.astype(np.float32), labels=[[1, 2]], mode="test", lrn_exact=True)
    got = to_hwcn(model(to_nhwc(x.astype(np.float32))).numpy())
    np.testing.assert_allclose(got, ref[-2].x, rtol=1e-4, atol=1e-5 * np.abs(ref[-2].x).max())


@pytest.mark.parametrize("bn", [False, True], ids=["seed", "seed_bnorm"])
def test_weight_transfer_round_trips(bn):
    net = seed_net(seed=2, batch_normalization=bn)
    rng = np.random.RandomState(0)
    for layer in net.layers:
        if layer.type == "bnorm":
            c = layer.weights[0].shape[0]
            layer.weights[2] = np.stack([rng.randn(c), 1 + rng.rand(c)], axis=1).astype(np.float32)
    back = net_from_keras(to_keras(net, dtype="float32"), net)
    for a, b in zip(net.layers, back.layers, strict=True):
        for wa, wb in zip(a.weights, b.weights, strict=True):
            assert wa.shape == wb.shape and wa.dtype == wb.dtype
            if a.type == "bnorm":  # sigma -> sigma^2 - eps -> sqrt(. + eps): float32 rounding
                np.testing.assert_allclose(wb, wa, rtol=1e-6)
            else:
                np.testing.assert_array_equal(wb, wa)


def test_custom_layers_serialise(tmp_path, mixed):
    model = to_keras(mixed)
    path = tmp_path / "mixed.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x, _ = _batch(mixed, 2, seed=4)
    np.testing.assert_array_equal(loaded(to_nhwc(x)).numpy(), model(to_nhwc(x)).numpy())
    for layer in model.layers:
        cfg = layer.get_config()
        assert type(layer).from_config(cfg).get_config() == cfg


def test_untrusted_names_are_made_safe():
    assert keras_name("<script>alert(1)</script>") == "_script_alert_1___script_"
    net = seed_net(seed=0)
    net.layers[0].name = "conv/1 <b>"
    model = to_keras(net)
    assert model.layers[1].name == "conv_1__b_"


def test_test_mode_bnorm_quirk_is_a_recorded_limitation():
    net = seed_net(seed=3, batch_normalization=True)
    rng = np.random.RandomState(1)
    set_bnorm_moments(net, rng, mu_scale=0.01, sigma_min=0.5)
    x, labels = _batch(net, 3)
    report = harness.compare(net, to_keras(net), x, labels, mode="test")
    assert report.ok, str(report)
    limited = [r for r in report.rows if r.limitation]
    assert limited and all(r.tensor == "dzdx" or r.tensor.startswith("dzdw") for r in limited)
    assert any(not r.ok for r in limited)  # the difference is real, and shown as "known"
    assert all(r.ok for r in report.rows if r.tensor == "x")  # the forward pass is exact
    assert "known" in str(report) and any(
        lim.kind == "bnorm-test-mode-backward" and "batch statistics" in lim.text
        for lim in report.limitations
    )
    texts = {lim.text for lim in report.limitations}
    assert all(r.limitation in texts for r in limited)  # a row carries its limitation's text


def convt_net(groups: int, rng: np.random.RandomState) -> Net:
    """A strided padded conv, then a convt with crop (Conv2DTranspose + Cropping2D, or
    GroupedConv2DTranspose with filter groups), a fully-connected conv and a softmaxloss,
    for 9 x 9 x 2 images; the weights drawn from ``rng`` in layer order."""
    layers = [
        Layer("conv", "conv1", [rng.randn(3, 3, 2, 4), rng.randn(1, 4)], pad=[1, 0, 0, 1], stride=2),
        Layer("relu", "relu1"),
        Layer(
            "convt",
            "up1",
            [rng.randn(3, 2, 3, 4), rng.randn(1, 3 * groups)],
            upsample=[2, 1],
            crop=[1, 0, 0, 1],
            num_groups=groups,
        ),
        Layer("conv", "fc", [rng.randn(8, 4, 3 * groups, 3), rng.randn(1, 3)]),
        Layer("softmaxloss", "loss"),
    ]
    return Net(layers, {"inputSize": [9, 9, 2]})


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("mode", ["normal", "test"])
def test_convt_translation_is_equivalent(groups, mode):
    rng = np.random.RandomState(groups)
    net = vl_simplenn_tidy(convt_net(groups, rng))
    x = rng.randn(9, 9, 2, 2)
    res = vl_simplenn(net, x, 1.0, [[1, 3]])
    assert res[-2].x.shape == (1, 1, 3, 2)
    model = to_keras(net)
    report = harness.compare(net, model, x, [[1, 3]], mode=mode)
    assert report.ok, str(report)
    assert sum(r.tensor.startswith("dzdw") for r in report.rows) == 6


@pytest.mark.parametrize("groups", [1, 2])
def test_convt_with_filters_smaller_than_the_upsampling(groups):
    """MatConvNet's transposed convolution gives (H-1)*s + FH rows; Keras' gives H*s rows
    when FH < s: the translation crops the extra ones (a 4x4 map upsampled by 2 through a
    1x1 filter is 7x7, not 8x8)."""
    rng = np.random.RandomState(3)
    layers = [
        Layer(
            "convt", "up1", [rng.randn(1, 1, 2, 4), rng.randn(1, 2 * groups)], upsample=2, num_groups=groups
        ),
        Layer("conv", "fc", [rng.randn(7, 7, 2 * groups, 3), rng.randn(1, 3)]),
        Layer("softmaxloss", "loss"),
    ]
    net = vl_simplenn_tidy(Net(layers, {"inputSize": np.array([[4.0, 4.0, 4.0]])}))
    x = rng.randn(4, 4, 4, 2)
    assert vl_simplenn(net, x, None, [[1, 3]])[1].x.shape[:2] == (7, 7)
    model = to_keras(net)
    assert model.get_layer("up1_crop").output.shape[1:3] == (7, 7)
    report = harness.compare(net, model, x, [[1, 3]])
    assert report.ok, str(report)


@pytest.mark.parametrize("dialect", ["master", "beta25"])
def test_keras_loss_matches_the_reference_loss_in_float64(dialect):
    from harness.translate import keras_loss

    net = seed_net(seed=4)
    x, labels = _batch(net, 4, seed=5)
    labels[0, 1] = 0  # ignored, still counted in master's divisor
    ref = vl_simplenn(net, x, None, labels, dialect=dialect)[-1].x
    model = to_keras(net)
    loss = keras_loss(net, dialect)
    got = float(loss(labels.ravel(), model(to_nhwc(x))))
    assert abs(got - float(np.ravel(ref)[0])) <= 1e-13 * abs(float(np.ravel(ref)[0]))
    again = type(loss).from_config(loss.get_config())
    assert again.get_config() == loss.get_config()
