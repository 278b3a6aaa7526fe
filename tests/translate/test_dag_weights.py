"""harness.translate.dag_build: the weights of a DagNN model both ways, its input sizes and
dtypes, its custom layers saved and loaded, and the errors that name the layer (the
equivalence of the models: tests/translate/test_dag_build.py)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from harness.mcn import seed_net
from harness.mcn.dagnn import DagLayer, DagNet, Param
from harness.translate import TranslationError, dag_inputs, dag_keras_layers, dag_outputs, to_keras_dag
from harness.translate.dag_weights import dag_params_from_keras, dag_weights_to_keras
from harness.translate.layers import CUSTOM_OBJECTS, MatConvNetCrop, MatConvNetScale

from .dag_helpers import TOL, as_list, check, keras_call, reference, rel
from .dag_nets import (
    batch,
    blocks_net,
    fcn_net,
    inception_net,
    param,
    residual_net,
    scale_net,
    two_inputs_net,
)


def test_weights_round_trip_in_float32():
    for net in (residual_net(), fcn_net(), scale_net(), blocks_net()):
        for p in net.params:
            p.value = p.value.astype(np.float32)
        depth = 4 if net.layers[0].type == "dagnn.Scale" else None
        model = to_keras_dag(net, "float32", input_sizes={v: (16, 14, depth) for v in dag_inputs(net)})
        back = dag_params_from_keras(net, model)
        for a, b in zip(net.params, back.params, strict=True):
            assert a.name == b.name and a.value.shape == b.value.shape and b.value.dtype == np.float32
            if a.train_method == "average":  # sigma -> sigma^2 - eps -> sqrt(. + eps)
                np.testing.assert_allclose(b.value, a.value, rtol=1e-6)
            else:
                np.testing.assert_array_equal(b.value, a.value)
        assert back.param(net.params[0].name).value is not net.params[0].value


def test_weights_move_into_another_model():
    net = inception_net()
    model = to_keras_dag(net)
    other = inception_net()
    for p in other.params:
        p.value = p.value + 1
    dag_weights_to_keras(other, model)
    x = batch(np.random.RandomState(20), 7, 7, 4, 1)
    for got, want in zip(
        keras_call(other, model, {"x": x}, False), reference(other, {"x": x}, "test"), strict=True
    ):
        assert rel(got, want) < TOL
    with pytest.raises(TranslationError, match=r"\(dagnn\.Conv\): no Keras layer 'b\w+' in the model"):
        dag_weights_to_keras(other, to_keras_dag(residual_net()))


def test_input_sizes_from_meta():
    net = fcn_net()
    net.meta = {"inputs": [{"name": "input", "size": np.array([[12.0, 10.0, 3.0, 8.0]])}]}
    assert to_keras_dag(net).input_shape == (None, 12, 10, 3)
    net.meta = {"inputSize": np.array([[9.0, 9.0, 3.0]])}
    assert to_keras_dag(net).input_shape == (None, 9, 9, 3)
    assert to_keras_dag(net, input_sizes={"input": (None, 7, 3)}).input_shape == (None, None, 7, 3)
    with pytest.raises(TranslationError, match="Expected input_sizes to name input vars"):
        to_keras_dag(net, input_sizes={"label": (1, 1, 1)})


def test_float32_model():
    net = inception_net()
    model = to_keras_dag(net, "float32")
    assert model.input.dtype == "float32" and all(w.dtype == "float32" for w in model.weights)
    x = batch(np.random.RandomState(23), 7, 7, 4, 2)
    got = keras_call(net, model, {"x": x.astype(np.float32)}, False)
    for g, w in zip(got, reference(net, {"x": x}, "test"), strict=True):
        assert g.dtype == np.float32 and rel(g, w) < 1e-5


def test_an_input_read_only_for_its_size():
    """A var read only as a Crop's size input: a Keras input of unknown depth, no derivative."""
    r = np.random.RandomState(24)
    net = DagNet(
        [
            DagLayer("conv", "dagnn.Conv", ["x"], ["c"], ["f", "b"], {"pad": 2}),
            DagLayer("crop", "dagnn.Crop", ["c", "ref"], ["y"], [], {"crop": [3, 0]}),
        ],
        params=[param("f", r, 3, 3, 2, 3), param("b", r, 3, 1)],
    )
    model = check(net, {"x": batch(r, 6, 7, 2, 2), "ref": np.zeros((4, 5, 1, 2))})
    assert dag_inputs(net) == ["x", "ref"] and model.input_shape[1] == (None, None, None, None)


def test_empty_params_are_errors():
    net = residual_net()
    net.param("bn2m").value = None
    with pytest.raises(TranslationError, match=r"'bn2' \(dagnn\.BatchNorm\).*param 'bn2m' \(moments\)"):
        to_keras_dag(net)
    net = residual_net()
    net.layer("fc").block["has_bias"] = True
    net.layer("fc").params = ["fcf"]
    net.rebuild()
    with pytest.raises(TranslationError, match=r"'fc' \(dagnn\.Conv\).*at least 2 params \(biases\)"):
        to_keras_dag(net)


def test_grouped_convt_with_filters_smaller_than_upsampling_is_refused():
    net = DagNet(
        [
            DagLayer(
                "up",
                "dagnn.ConvTranspose",
                ["x"],
                ["y"],
                ["f"],
                {"upsample": 3, "num_groups": 2, "has_bias": False},
            )
        ],
        params=[Param("f", np.ones((1, 1, 2, 4)))],
    )
    with pytest.raises(TranslationError, match=r"'up' \(dagnn\.ConvTranspose\).*at least the upsampling"):
        to_keras_dag(net)


def test_depth_unknown_is_an_error():
    net = DagNet([DagLayer("relu", "dagnn.ReLU", ["x"], ["y"], [])])
    with pytest.raises(TranslationError, match=r"input var 'x'.*input_sizes=\{'x': \(H, W, C\)\}"):
        to_keras_dag(net)
    model = check(
        net, {"x": batch(np.random.RandomState(21), 3, 4, 2, 1)}, input_sizes={"x": (None, None, 2)}
    )
    assert model.input_shape == (None, None, None, 2)


def test_unsupported_blocks_name_the_layer():
    net = two_inputs_net()
    net.add_layer("custom", "dagnn.vllab_dag_loss", ["aux", "binlabel"], ["l1"], [], {"loss_type": "L1"})
    with pytest.raises(TranslationError, match=r"layer 8 'custom' \(dagnn\.vllab_dag_loss\).*remove_layer"):
        to_keras_dag(net)
    net.remove_layer("custom")
    assert dag_outputs(net) == ["prediction", "aux"]
    net.add_layer("pdist", "dagnn.PDist", ["aux", "x1"], ["d"], [])
    with pytest.raises(TranslationError, match=r"'pdist' \(dagnn\.PDist\)"):
        to_keras_dag(net)
    net = two_inputs_net()
    net.add_layer("after", "dagnn.ReLU", ["objective"], ["r"], [])
    with pytest.raises(TranslationError, match="'after'.*output of Loss layer 'loss'"):
        to_keras_dag(net)
    with pytest.raises(TranslationError, match="Expected a DagNN network"):
        to_keras_dag(seed_net())
    with pytest.raises(TranslationError, match="Expected dtype"):
        to_keras_dag(two_inputs_net(), "float16")
    net = blocks_net()
    net.layer("conv_a").block["opts"] = ["NoSuchOption", 1]
    with pytest.raises(TranslationError, match=r"layer 1 'conv_a' \(dagnn\.Conv\).*NoSuchOption"):
        to_keras_dag(net)


def test_names_are_made_safe_and_unique():
    net = DagNet(
        [
            DagLayer("a/b", "dagnn.Conv", ["x y"], ["a_b"], ["f"], {"pad": 1, "has_bias": False}),
            DagLayer("a_b", "dagnn.ReLU", ["a_b"], ["out"], []),
        ],
        params=[Param("f", np.ones((3, 3, 2, 2)))],
    )
    model = to_keras_dag(net)
    assert dag_keras_layers(net) == {"a/b": "a_b", "a_b": "a_b_"}
    assert {l.name for l in model.layers} == {"x_y", "a_b_pad", "a_b", "a_b_"}


def test_custom_layers_serialise(tmp_path):
    for make in (fcn_net, scale_net):
        net = make()
        depth = 4 if make is scale_net else None
        model = to_keras_dag(net, input_sizes={v: (5, 6, depth) for v in dag_inputs(net)})
        path = tmp_path / f"{make.__name__}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        x = np.random.RandomState(22).randn(2, 5, 6, 4 if make is scale_net else 3)
        for a, b in zip(as_list(loaded(x)), as_list(model(x)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for layer in (MatConvNetCrop((1, 2)), MatConvNetScale((1, 1, 1, 3), None, True)):
        cfg = layer.get_config()
        assert type(layer).from_config(cfg).get_config() == cfg
        assert CUSTOM_OBJECTS[type(layer).__name__] is type(layer)


# --------------------------------------------------------------------------- golden cases


def test_the_multipliers_name_exactly_the_models_trainable_variables():
    """dag_multipliers (the optimizer's table) holds one entry per trainable Keras variable,
    also for a Scale without bias that was given a second param (has_bias false)."""
    from harness.mcn.dagnn import DagLayer, DagNet, Param
    from harness.translate import to_keras
    from harness.translate.dag_weights import dag_multipliers

    from .dag_nets import scale_net

    r = np.random.RandomState(0)
    no_bias = DagNet(
        [DagLayer("sc", "dagnn.Scale", ["x"], ["y"], ["w", "b"], {"size": [1, 1, 3], "has_bias": False})],
        params=[Param("w", r.randn(1, 1, 3)), Param("b", r.randn(1, 1, 3))],
    )
    for net in (scale_net(), no_bias):
        model = to_keras(net, input_size=(5, 6, 4) if net is not no_bias else (4, 4, 3))
        assert set(dag_multipliers(net)) == {v.path for v in model.trainable_variables}
