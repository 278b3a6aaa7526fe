"""harness.strategies: argument validation, valid nets, reachable features, shrinking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.mcn import Layer, Net, vl_nnconv, vl_nnpool, vl_simplenn, vl_simplenn_tidy
from harness.mcn.geometry import layer_output_shapes
from harness.mcn.options import pad4, pair
from harness.testing.strategies import (
    BODY_TYPES,
    bnorm_layers,
    classifier_layers,
    conv_layers,
    dropout_layers,
    lrn_layers,
    net_inputs,
    pool_layers,
    relu_layers,
    sigmoid_layers,
    simplenn_nets,
)

_NET = vl_simplenn_tidy(
    Net(
        [Layer("conv", "fc", [np.ones((2, 2, 1, 3)), np.zeros((1, 3))]), Layer("softmaxloss", "loss")],
        {"inputSize": np.array([[2.0, 2.0, 1.0]])},
    )
)
_SHAPE = (4, 5, 2)
_FIND = settings(database=None, max_examples=2000, deadline=None)
_REACH = settings(_FIND, phases=[Phase.generate])  # any example will do: no shrinking

BAD_ARGUMENTS = [
    (simplenn_nets, {"max_layers": -1}, "max_layers"),
    (simplenn_nets, {"max_layers": 2.5}, "max_layers"),
    (simplenn_nets, {"max_layers": True}, "max_layers"),
    (simplenn_nets, {"input_size": (0, 3, 1)}, "input_size"),
    (simplenn_nets, {"input_size": (3, 3)}, "input_size"),
    (simplenn_nets, {"input_size": (13, 3, 1)}, "input_size"),
    (simplenn_nets, {"max_side": 0}, "max_side"),
    (simplenn_nets, {"max_channels": 0}, "max_channels"),
    (simplenn_nets, {"layer_types": "conv"}, "layer_types"),
    (simplenn_nets, {"layer_types": ("conv", "convt")}, "layer_types"),
    (simplenn_nets, {"loss": "yes"}, "loss"),
    (simplenn_nets, {"bnorm": 1}, "bnorm"),
    (simplenn_nets, {"lrn": None}, "lrn"),
    (simplenn_nets, {"dropout": "no"}, "dropout"),
    (simplenn_nets, {"dtype": np.int32}, "dtype"),
    (simplenn_nets, {"dtype": "float16"}, "dtype"),
    (conv_layers, {"input_shape": (3, 3)}, "input_shape"),
    (conv_layers, {"input_shape": (3, 30, 1)}, "input_shape"),
    (conv_layers, {"input_shape": _SHAPE, "filters": 0}, "filters"),
    (conv_layers, {"input_shape": _SHAPE, "max_filters": 0}, "max_filters"),
    (conv_layers, {"input_shape": _SHAPE, "groups": "x"}, "groups"),
    (conv_layers, {"input_shape": _SHAPE, "name": ""}, "name"),
    (conv_layers, {"input_shape": _SHAPE, "dtype": "int8"}, "dtype"),
    (classifier_layers, {"input_shape": _SHAPE, "classes": 0}, "classes"),
    (classifier_layers, {"input_shape": "abc"}, "input_shape"),
    (pool_layers, {"input_shape": (20, 3, 1)}, "input_shape"),
    (pool_layers, {"input_shape": _SHAPE, "max_side": -1}, "max_side"),
    (relu_layers, {"input_shape": (1, 1, 0)}, "input_shape"),
    (sigmoid_layers, {"input_shape": _SHAPE, "name": 3}, "name"),
    (bnorm_layers, {"input_shape": _SHAPE, "dtype": "complex64"}, "dtype"),
    (lrn_layers, {"input_shape": None}, "input_shape"),
    (dropout_layers, {"input_shape": (1.5, 2, 2)}, "input_shape"),
    (net_inputs, {"net": "not a net"}, "net"),
    (net_inputs, {"net": Net([Layer("relu")])}, "inputSize"),
    (net_inputs, {"net": _NET, "batch": 0}, "batch"),
    (net_inputs, {"net": _NET, "max_batch": 0}, "max_batch"),
    (net_inputs, {"net": _NET, "ignore": "x"}, "ignore"),
]


@pytest.mark.parametrize(
    "strategy, kwargs, name",
    BAD_ARGUMENTS,
    ids=[f"{s.__name__}-{'-'.join(k)}-{i}" for i, (s, k, _) in enumerate(BAD_ARGUMENTS)],
)
def test_bad_arguments_raise_naming_the_argument(strategy, kwargs, name):
    kwargs = dict(kwargs)
    if strategy is net_inputs:
        net = kwargs.pop("net")
        with pytest.raises(InvalidArgument, match=name):
            strategy(net, **kwargs)
    else:
        with pytest.raises(InvalidArgument, match=name):
            strategy(**kwargs)


# ------------------------------------------------------------------------------ validity


@settings(deadline=None)
@given(
    net=simplenn_nets(),
    data=st.data(),
    mode=st.sampled_from(["normal", "test"]),
    dialect=st.sampled_from(["master", "beta25"]),
)
def test_nets_are_valid_and_run_forward_and_backward(net, data, mode, dialect):
    assert vl_simplenn_tidy(net) == net  # tidied
    names = [l.name for l in net.layers]
    assert len(set(names)) == len(names)
    assert names[-2:] == ["classifier", "loss"] and net.layers[-1].type in ("softmaxloss", "loss")
    assert {l.type for l in net.layers[:-2]} <= set(BODY_TYPES) and len(net.layers) <= 6 + 2
    for layer in net.layers:
        if layer.type == "pool":  # MatConvNet's pad < pool
            (ph, pw), (pt, pb, pl, pr) = pair(layer.pool, "pool"), pad4(layer.pad, "pad")
            assert max(pt, pb) < ph and max(pl, pr) < pw
    x, labels = data.draw(net_inputs(net))
    h, w, c = (int(v) for v in net.meta["inputSize"].ravel())
    assert x.shape[:3] == (h, w, c) and 1 <= x.shape[3] <= 3 and x.dtype == np.float64
    k = net.layers[-2].weights[0].shape[3]
    assert 2 <= k <= 5 and labels.shape == (1, x.shape[3])
    assert np.all((labels >= 0) & (labels <= k)) and np.any(labels > 0)
    res = vl_simplenn(net, x, 1.0, labels, mode=mode, dialect=dialect)
    for r, shape in zip(res[1:-1], layer_output_shapes(net)[1:-1], strict=True):
        assert r.x.shape[:3] == shape and max(shape[:2]) <= 12 and shape[2] <= 8
    assert res[-2].x.shape[2] == k and np.isfinite(res[-1].x).all()
    assert all(np.isfinite(r.dzdx).all() for r in res)
    assert all(np.isfinite(g).all() for r in res for g in r.dzdw)


@settings(deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 8)),
    data=st.data(),
)
def test_layer_specs_report_the_output_shape_the_reference_computes(shape, data):
    x = np.random.default_rng(0).standard_normal((*shape, 2))
    conv = data.draw(conv_layers(input_shape=shape))
    f, b = conv.layer.weights
    y = vl_nnconv(x, f, b, pad=conv.layer.pad, stride=conv.layer.stride, dilate=conv.layer.dilate)
    assert y.shape[:3] == conv.output_shape and max(conv.output_shape[:2]) <= 12
    classifier = data.draw(classifier_layers(input_shape=shape, classes=3))
    f, b = classifier.layer.weights
    y = vl_nnconv(
        x, f, b, pad=classifier.layer.pad, stride=classifier.layer.stride, dilate=classifier.layer.dilate
    )
    assert y.shape[:3] == classifier.output_shape and classifier.output_shape[2] == 3
    pool = data.draw(pool_layers(input_shape=shape))
    p = pool.layer
    y = vl_nnpool(x, p.pool, pad=p.pad, stride=p.stride, method=p.method)
    assert y.shape[:3] == pool.output_shape
    for strategy in (relu_layers, sigmoid_layers, bnorm_layers, lrn_layers, dropout_layers):
        assert data.draw(strategy(input_shape=shape)).output_shape == shape


def test_float32_nets_and_inputs():
    net = find(simplenn_nets(dtype=np.float32), lambda n: len(n.layers) > 3, settings=_FIND)
    assert all(np.asarray(w).dtype == np.float32 for l in net.layers for w in l.weights if np.size(w))
    x, _ = find(net_inputs(net), lambda xl: True, settings=_FIND)
    assert x.dtype == np.float32


# ------------------------------------------------------------------------------ reachable features


def _conv_groups(net: Net, i: int) -> int:
    return layer_output_shapes(net)[i][2] // net.layers[i].weights[0].shape[2]


FEATURES = {
    "grouped conv": lambda n: any(
        l.type == "conv" and _conv_groups(n, i) > 1 for i, l in enumerate(n.layers)
    ),
    "asymmetric conv pad": lambda n: any(
        l.type == "conv" and len(set(pad4(l.pad, "pad"))) > 1 for l in n.layers[:-2]
    ),
    "dilated, strided conv": lambda n: any(
        l.type == "conv" and max(pair(l.dilate, "d")) > 1 and max(pair(l.stride, "s")) > 1 for l in n.layers
    ),
    "conv without bias": lambda n: any(l.type == "conv" and np.size(l.weights[1]) == 0 for l in n.layers),
    "padded avg pool": lambda n: any(
        l.type == "pool" and l.method == "avg" and any(pad4(l.pad, "p")) for l in n.layers
    ),
    "leaky relu": lambda n: any(l.type == "relu" and l.leak > 0 for l in n.layers),
    "bnorm, lrn, dropout, sigmoid": lambda n: (
        {"bnorm", "lrn", "dropout", "sigmoid"} <= {l.type for l in n.layers}
    ),
    "'loss' layer": lambda n: n.layers[-1].type == "loss",
    "scores at several pixels": lambda n: layer_output_shapes(n)[-2][:2] != (1, 1),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_every_feature_is_reachable(feature):
    find(simplenn_nets(), FEATURES[feature], settings=_REACH)


def test_ignored_labels_are_drawn_but_never_all():
    x, labels = find(net_inputs(_NET, batch=3), lambda xl: 0 in xl[1], settings=_FIND)
    assert np.any(labels > 0) and labels.shape == (1, 3) and x.shape == (2, 2, 1, 3)
    _, labels = find(net_inputs(_NET, ignore=False), lambda xl: True, settings=_FIND)
    assert np.all(labels > 0)


@given(simplenn_nets(bnorm=False, lrn=False, dropout=False, layer_types=("relu", "bnorm", "lrn")))
def test_flags_remove_layer_types(net):
    assert {l.type for l in net.layers[:-2]} <= {"relu"}


@given(net=simplenn_nets(loss=False, max_layers=0, input_size=(3, 4, 2)), data=st.data())
def test_fixed_input_size_and_no_loss(net, data):
    assert [l.type for l in net.layers] == ["conv"] and net.meta["inputSize"].tolist() == [[3, 4, 2]]
    x, labels = data.draw(net_inputs(net, batch=2))
    assert labels is None and x.shape == (3, 4, 2, 2)


# ------------------------------------------------------------------------------ shrinking


def _types(net: Net) -> list[str]:
    return [l.type for l in net.layers]


def test_shrinks_to_the_smallest_net():
    net = find(simplenn_nets(), lambda n: True, settings=_FIND)
    assert _types(net) == ["conv", "softmaxloss"] and net.meta["inputSize"].tolist() == [[1, 1, 1]]
    assert net.layers[0].weights[0].shape == (1, 1, 1, 2)  # a fully-connected classifier, 2 classes


def test_a_net_with_a_conv_shrinks_to_one_minimal_conv():
    net = find(simplenn_nets(), lambda n: "conv" in _types(n)[:-2], settings=_FIND)
    assert _types(net) == ["conv", "conv", "softmaxloss"] and net.meta["inputSize"].tolist() == [[1, 1, 1]]
    conv = net.layers[0]
    assert conv.weights[0].shape == (1, 1, 1, 1) and conv.weights[1].shape == (1, 1)
    assert pad4(conv.pad, "pad") == (0, 0, 0, 0) and pair(conv.stride, "s") == (1, 1)
    assert pair(conv.dilate, "d") == (1, 1)


def test_a_net_with_a_pool_shrinks_to_one_trivial_max_pool():
    net = find(simplenn_nets(), lambda n: "pool" in _types(n), settings=_FIND)
    assert _types(net) == ["pool", "conv", "softmaxloss"]
    pool = net.layers[0]
    assert pool.method == "max" and pair(pool.pool, "p") == (1, 1) and not any(pad4(pool.pad, "p"))


def test_a_padded_net_keeps_only_what_the_condition_needs():
    net = find(
        simplenn_nets(),
        lambda n: any(l.type == "conv" and any(pad4(l.pad, "p")) for l in n.layers),
        settings=_FIND,
    )
    # the classifier itself may be a padded conv: no hidden layer is needed
    assert _types(net) == ["conv", "softmaxloss"] and net.meta["inputSize"].tolist() == [[1, 1, 1]]
    assert sum(pad4(net.layers[0].pad, "p")) == 1 and net.layers[0].weights[0].shape == (1, 1, 1, 2)


def test_inputs_shrink_to_one_image_of_class_one():
    x, labels = find(net_inputs(_NET), lambda xl: True, settings=_FIND)
    assert x.shape == (2, 2, 1, 1) and labels.tolist() == [[1.0]]
