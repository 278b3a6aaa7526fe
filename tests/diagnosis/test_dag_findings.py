"""diagnose() on DagNN nets: the simplenn layer rules through the view of dag_findings.

A small DagNN net (conv > ReLU > max pool > conv > BatchNorm > ConvTranspose > softmaxlog)
against its faithful translation (no findings), against a Keras functional model written
by hand with the DagNN layer names (padding under another name, the ReLU fused into the
conv: no findings), and against that model with one mistake each: every finding names
the DagNN layer.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from harness.diagnosis import diagnose
from harness.mcn.dagnn import DagLayer, DagNet, Param
from harness.translate import to_keras

L = keras.layers


def small_dag() -> DagNet:
    """input 8x8x2 > conv1 3x3 pad 1 > relu1 > pool1 max 2x2 stride 2 > conv2 3x3 (4 -> 6)
    > bn2 > up (ConvTranspose 2x2, upsample 2, 6 -> 3) > softmaxlog against 'label'."""
    r = np.random.RandomState(0)
    layers = [
        DagLayer("conv1", "dagnn.Conv", ["input"], ["c1"], ["f1", "b1"], {"size": [3, 3, 2, 4], "pad": 1}),
        DagLayer("relu1", "dagnn.ReLU", ["c1"], ["r1"], []),
        DagLayer("pool1", "dagnn.Pooling", ["r1"], ["p1"], [], {"pool_size": [2, 2], "stride": 2}),
        DagLayer("conv2", "dagnn.Conv", ["p1"], ["c2"], ["f2", "b2"], {"size": [3, 3, 4, 6], "pad": 1}),
        DagLayer("bn2", "dagnn.BatchNorm", ["c2"], ["n2"], ["g2", "h2", "m2"], {"epsilon": 1e-4}),
        DagLayer("up", "dagnn.ConvTranspose", ["n2"], ["prediction"], ["fu", "bu"], {"upsample": 2}),
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], []),
    ]
    params = [
        Param("f1", 0.3 * r.randn(3, 3, 2, 4)),
        Param("b1", 0.1 * r.randn(4, 1)),
        Param("f2", 0.3 * r.randn(3, 3, 4, 6)),
        Param("b2", 0.1 * r.randn(6, 1)),
        Param("g2", 1 + 0.1 * r.randn(6, 1)),
        Param("h2", 0.1 * r.randn(6, 1)),
        Param("m2", np.column_stack([0.1 * r.randn(6), 1 + 0.1 * r.rand(6)]), learning_rate=0.1),
        Param("fu", 0.3 * r.randn(2, 2, 3, 6)),
        Param("bu", 0.1 * r.randn(3, 1)),
    ]
    net = DagNet(layers, params)
    net.meta["inputSize"] = [8, 8, 2]
    return net


def hand_model(
    *,
    stride: int = 1,
    pad: tuple = ((1, 1), (1, 1)),
    epsilon: float = 1e-4,
    upsample: int = 2,
    pool_name: str = "pool1",
    activation: str | None = None,
) -> keras.Model:
    """The net written by hand: the padding as a ZeroPadding2D of another name, the ReLU
    fused into conv1, conv2 padded by 'same', the moments' rate as momentum 0.9."""
    x = keras.Input((8, 8, 2))
    y = L.ZeroPadding2D(pad, name="zero_pad")(x)
    y = L.Conv2D(4, 3, strides=stride, activation="relu", name="conv1")(y)
    y = L.MaxPooling2D(2, 2, name=pool_name)(y)
    y = L.Conv2D(6, 3, padding="same", activation=activation, name="conv2")(y)
    y = L.BatchNormalization(epsilon=epsilon, momentum=0.9, name="bn2")(y)
    y = L.Conv2DTranspose(3, 2, strides=upsample, name="up")(y)
    return keras.Model(x, y)


def test_the_faithful_translation_has_no_findings():
    net = small_dag()
    assert diagnose(net, to_keras(net)) == []


def test_a_hand_written_model_with_the_layer_names_has_no_findings():
    # max pooling: MatConvNet's tie rule differs from MaxPooling2D's, not a configuration finding
    assert diagnose(small_dag(), hand_model()) == []


@pytest.mark.parametrize(
    "mistake, kind, layer, mcn, keras_value",
    [
        ({"stride": 2}, "stride", "conv1", "[1 1]", "[2 2]"),
        ({"pad": ((1, 1), (0, 1))}, "padding", "conv1", "[T B L R] [1 1 1 1]", "[1 1 0 1]"),
        ({"epsilon": 1e-3}, "bnorm epsilon", "bn2", "0.0001", "0.001"),
        ({"upsample": 1}, "upsampling", "up", "[2 2]", "[1 1]"),
        ({"activation": "sigmoid"}, "activation", "conv2", "none inside the conv", "activation='sigmoid'"),
    ],
)
def test_one_wrong_setting_is_a_finding_naming_the_dagnn_layer(mistake, kind, layer, mcn, keras_value):
    found = diagnose(small_dag(), hand_model(**mistake))
    assert [(f.kind, f.layer) for f in found] == [(kind, layer)]
    assert found[0].mcn_value.startswith(mcn) and found[0].keras_value.startswith(keras_value)


def test_a_layer_without_a_keras_layer_of_its_name_is_an_alignment_finding():
    found = diagnose(small_dag(), hand_model(pool_name="max_pooling"))
    assert [(f.kind, f.layer) for f in found] == [("alignment", "pool1")]
    assert "no Keras layer named 'pool1'" in found[0].keras_value


def test_the_training_set_up_names_the_loss_layer():
    model = hand_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy")
    found = {f.kind: f for f in diagnose(small_dag(), model)}
    assert found["loss reduction"].layer == "loss" and found["label base"].layer == "loss"
    assert not {"stride", "padding", "bnorm epsilon", "alignment"} & set(found)


def test_a_lenet_with_a_dense_head():
    """LeNet as cnn_train_dag saves it (devkicks' MNIST net, no inputSize), written with
    Flatten + Dense(activation='relu') for ip1 and relu1: the Dense is exact (the 4x4
    filter covers its input; the size is the model's) but flattens row-major."""
    r = np.random.RandomState(1)
    conv = lambda n, x, y, p, s: DagLayer(n, "dagnn.Conv", [x], [y], p, {"size": s})  # noqa: E731
    layers = [
        conv("conv1", "data", "c1", ["f1", "b1"], [5, 5, 1, 2]),
        DagLayer("pool1", "dagnn.Pooling", ["c1"], ["p1"], [], {"pool_size": [2, 2], "stride": 2}),
        conv("ip1", "p1", "i1", ["f2", "b2"], [4, 4, 2, 5]),
        DagLayer("relu1", "dagnn.ReLU", ["i1"], ["r1"], []),
        conv("ip2", "r1", "i2", ["f3", "b3"], [1, 1, 5, 3]),
        DagLayer("loss", "dagnn.Loss", ["i2", "label"], ["objective"], []),
    ]
    names = ("f1", "b1", "f2", "b2", "f3", "b3")
    sizes = ((5, 5, 1, 2), (2, 1), (4, 4, 2, 5), (5, 1), (1, 1, 5, 3), (3, 1))
    net = DagNet(layers, [Param(k, r.randn(*s)) for k, s in zip(names, sizes, strict=True)])
    x = keras.Input((12, 12, 1))
    y = L.Conv2D(2, 5, name="conv1")(x)
    y = L.MaxPooling2D(2, 2, name="pool1")(y)
    y = L.Flatten(name="flatten")(y)  # named: Keras numbers unnamed layers per process
    y = L.Dense(5, activation="relu", name="ip1")(y)
    y = L.Dense(3, name="ip2")(y)
    found = diagnose(net, keras.Model(x, y))
    assert [(f.kind, f.layer) for f in found] == [("flatten order", "ip1")]
    assert found[0].keras == "flatten+ip1"


def test_transposed_convolutions_share_one_rule_with_simplenn():
    """ConvTranspose with 2 groups and a crop: faithful on both kinds of net; one
    Conv2DTranspose without groups and with another crop is two findings on both."""
    from harness.mcn.net import Layer, Net

    r = np.random.RandomState(2)
    f, b = r.randn(3, 3, 3, 4), r.randn(1, 6)
    block = {"upsample": 2, "crop": [1, 0, 0, 1], "num_groups": 2}
    dag = DagNet(
        [DagLayer("up", "dagnn.ConvTranspose", ["x"], ["y"], ["f", "b"], block)],
        [Param("f", f), Param("b", b)],
        meta={"inputSize": [4, 4, 4]},
    )
    simple = Net([Layer("convt", "up", [f, b], **block)], {"inputSize": [4, 4, 4]})
    model = keras.Sequential(
        [
            keras.Input((4, 4, 4)),
            L.Conv2DTranspose(6, 3, strides=2, name="up"),
            L.Cropping2D(((1, 0), (0, 0)), name="up_crop"),
        ]
    )
    for net in (dag, simple):
        assert diagnose(net, to_keras(net)) == []
        found = {f.kind: f for f in diagnose(net, model)}
        assert set(found) == {"groups", "crop"} and found["groups"].layer == "up"
        assert found["crop"].mcn_value == "[1 0 0 1]" and found["crop"].keras_value == "[1 0 0 0]"


def test_a_block_the_reference_does_not_run_is_left_out():
    """LapSRN's custom loss (dagnn.vllab_dag_loss): the layers before it are diagnosed."""
    net = small_dag()
    custom = DagLayer("l1", "dagnn.vllab_dag_loss", ["prediction"], ["l1loss"], [])
    with_custom = DagNet([*net.layers, custom], net.params, meta=net.meta)
    assert diagnose(with_custom, to_keras(net)) == []
    assert [(f.kind, f.layer) for f in diagnose(with_custom, hand_model(stride=2))] == [("stride", "conv1")]


def test_check_on_a_dagnn_net_carries_the_findings_beside_the_verdict():
    """harness.check (the CLI's check) includes diagnose()'s findings for DagNN nets too."""
    import harness

    net = small_dag()
    faithful = harness.check(net, to_keras(net), batch=2)
    assert faithful.ok and faithful.findings == []
    result = harness.check(net, hand_model(epsilon=1e-3), batch=2)
    assert [(f.kind, f.layer) for f in result.findings] == [("bnorm epsilon", "bn2")]
    assert not result.ok and result.report.first_divergence.culprit == "bn2"  # var n2, layer bn2
