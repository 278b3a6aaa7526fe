"""harness.mcn.geometry: the output sizes the ops produce, layer by layer, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.mcn import McnError, vl_nnconv, vl_nnconvt, vl_nnpool, vl_simplenn, vl_simplenn_tidy
from harness.mcn.geometry import (
    conv_output_size,
    convt_output_size,
    layer_output_shapes,
    pool_output_size,
    transposed_output_length,
    window_output_length,
)
from harness.mcn.net import Layer, Net
from harness.mcn.options import as_4d
from harness.testing.strategies import net_inputs, simplenn_nets


@given(
    n=st.integers(1, 12),
    window=st.integers(1, 5),
    pads=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    stride=st.integers(1, 4),
    dilate=st.integers(1, 3),
)
def test_window_output_length_counts_the_window_positions(n, window, pads, stride, dilate):
    span = (window - 1) * dilate + 1
    positions = range(0, n + sum(pads) - span + 1, stride)  # first padded cell of each window
    expected = (
        len(positions) if n + sum(pads) >= span else window_output_length(n, window, *pads, stride, dilate)
    )
    assert window_output_length(n, window, *pads, stride, dilate) == expected


@given(
    n=st.integers(1, 8),
    window=st.integers(1, 5),
    crops=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    upsample=st.integers(1, 3),
)
def test_transposed_output_length_is_the_scatter_extent_cropped(n, window, crops, upsample):
    covered = {o * upsample + i for o in range(n) for i in range(window)}  # cells the inputs reach
    assert transposed_output_length(n, window, *crops, upsample) == max(covered) + 1 - sum(crops)


def test_sizes_agree_with_the_ops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 7, 4, 2))
    for f, opts in [
        (rng.standard_normal((3, 2, 2, 6)), dict(pad=(1, 0, 2, 1), stride=(2, 3), dilate=(2, 1))),
        (rng.standard_normal((9, 7, 4, 3)), {}),  # fully connected
        (None, dict(pad=(0, 1, 1, 0), stride=(2, 2))),  # no filters: subsample
    ]:
        y = vl_nnconv(x, f, None, **opts)
        assert conv_output_size(x.shape, None if f is None else f.shape, **opts) == y.shape[:3]
    ft = rng.standard_normal((3, 4, 5, 4))
    opts = dict(upsample=(2, 3), crop=(1, 0, 2, 1), num_groups=2)
    assert (
        convt_output_size(x.shape, ft.shape, **opts)
        == vl_nnconvt(x, ft, None, **opts).shape[:3]
        == (
            (9 - 1) * 2 - 1 + 3,
            (7 - 1) * 3 - 3 + 4,
            10,
        )
    )
    opts = dict(pad=(1, 1, 0, 2), stride=(3, 2))
    assert pool_output_size(x.shape, (3, 4), **opts) == vl_nnpool(x, (3, 4), **opts).shape[:3]


@settings(deadline=None, max_examples=60)
@given(net=simplenn_nets(), data=st.data())
def test_layer_output_shapes_are_vl_simplenn_shapes(net, data):
    x, labels = data.draw(net_inputs(net))
    res = vl_simplenn(net, x, None, labels)
    shapes = layer_output_shapes(net)
    assert len(shapes) == len(net.layers) + 1
    assert shapes == [as_4d(r.x).shape[:3] for r in res]
    assert layer_output_shapes(net, net.meta["inputSize"]) == shapes


def _conv(name, fshape, **opts):
    return Layer("conv", name, [np.ones(fshape), np.zeros((0, 0))], **opts)


def test_every_spatial_layer_type():
    layers = [
        _conv("c1", (3, 3, 2, 6), pad=1, stride=2, dilate=(1, 2)),
        Layer(
            "convt",
            "up",
            [np.ones((4, 3, 2, 6)), np.zeros((0, 0))],
            upsample=2,
            crop=(1, 0, 0, 1),
            num_groups=3,
        ),
        Layer("conv", "sub", [np.zeros((0, 0)), np.zeros((0, 0))], pad=(0, 1, 1, 0), stride=3),
        Layer("pool", "p", pool=(2, 1), pad=(1, 0, 0, 0), stride=1, method="avg"),
        Layer("bnorm", "bn", [np.ones(6), np.zeros(6)]),
        Layer("lrn", "n"),
        Layer("softmax", "s"),
    ]
    net = vl_simplenn_tidy(Net(layers, {"inputSize": np.array([[11.0, 8.0, 2.0]])}))
    shapes = layer_output_shapes(net)
    res = vl_simplenn(net, np.random.default_rng(1).standard_normal((11, 8, 2, 1)))
    assert shapes == [as_4d(r.x).shape[:3] for r in res]
    assert shapes[1:4] == [(6, 3, 6), (13, 6, 6), (5, 3, 6)]
    assert layer_output_shapes(net, (11, 8, 2, 5)) == shapes  # [H W C N]: N is ignored
    assert layer_output_shapes(Net([Layer("relu", "r")]), (11, 8)) == [(11, 8, 1)] * 2  # depth 1


def _bad(*layers: Layer, **after_tidy) -> Net:
    """A tidied net on a 5 x 5 x 3 input; ``after_tidy`` sets fields of its last layer that
    vl_simplenn_tidy itself would refuse."""
    net = vl_simplenn_tidy(Net(list(layers), {"inputSize": np.array([[5.0, 5.0, 3.0]])}))
    for key, value in after_tidy.items():
        net.layers[-1].set(key, value)
    return net


BAD_NETS = {
    "unknown type": _bad(Layer("relu", "r"), Layer("fancy", "f")),
    "missing pool": _bad(Layer("pool", "p", pad=0, stride=1)),
    "depth not dividing": _bad(_conv("c", (3, 3, 2, 4))),
    "groups not dividing filters": _bad(_conv("c", (1, 1, 1, 4))),
    "window too large": _bad(_conv("c", (9, 9, 3, 4))),
    "dilated window too large": _bad(_conv("c", (3, 3, 3, 4), dilate=3)),
    "dilated subsample": _bad(Layer("conv", "c", [np.zeros((0, 0)), np.zeros((0, 0))], dilate=2)),
    "bad stride": _bad(_conv("c", (1, 1, 3, 4)), stride=0),
    "pad not below pool": _bad(Layer("pool", "p", pool=2, pad=(0, 0, 2, 0))),
    "pool too large": _bad(Layer("relu", "r"), Layer("pool", "p", pool=(6, 2))),
    "convt groups": _bad(Layer("convt", "t", [np.ones((2, 2, 2, 3)), np.zeros((0, 0))], num_groups=2)),
    "convt depth": _bad(Layer("convt", "t", [np.ones((2, 2, 2, 4)), np.zeros((0, 0))])),
    "convt empty output": _bad(Layer("convt", "t", [np.ones((1, 1, 2, 3)), np.zeros((0, 0))], crop=3)),
    "convt without filters": _bad(Layer("convt", "t", [np.zeros((0, 0)), np.zeros((0, 0))])),
    "too few weights": _bad(Layer("conv", "c", [], pad=0, stride=1)),
    "malformed pad": _bad(_conv("c", (1, 1, 3, 4)), pad="same"),
    "malformed pool": _bad(Layer("pool", "p", pool=2), pool=[[2, None]]),
}


@pytest.mark.parametrize("name", BAD_NETS)
def test_errors_are_vl_simplenns(name):
    """Each refusal is the McnError vl_simplenn raises on one image, naming the layer."""
    net = BAD_NETS[name]
    x = np.zeros((5, 5, 3, 1))
    with pytest.raises(McnError) as ran:
        vl_simplenn(net, x)
    with pytest.raises(McnError) as computed:
        layer_output_shapes(net)
    assert str(computed.value) == str(ran.value)
    assert str(computed.value).startswith("layer ")


@pytest.mark.parametrize(
    "meta, input_size",
    [
        ({}, None),
        ({"inputSize": np.array([[0.0, 3.0, 1.0]])}, None),
        ({}, (2.5, 3, 1)),
        ({}, "abc"),
        ({}, []),
    ],
)
def test_bad_input_sizes(meta, input_size):
    net = Net([Layer("relu", "r")], meta)
    with pytest.raises(McnError, match="input_size|inputSize"):
        layer_output_shapes(net, input_size)
