"""harness.translate.weights: the layout moves between MatConvNet and Keras, one place each."""

from __future__ import annotations

import numpy as np
import pytest

from harness.equivalence.align import align
from harness.mcn import seed_net, vl_nnconv
from harness.translate import to_keras
from harness.translate.weights import (
    ROLES,
    WeightMap,
    embed_groups,
    keras_index,
    parameter_role,
    roles_for,
    split_groups,
    to_hwcn,
    to_nhwc,
)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_embedded_groups_compute_the_grouped_convolution(groups):
    rng = np.random.default_rng(groups)
    fc, kg = 2, 2
    f = rng.standard_normal((3, 2, fc, kg * groups))
    x = rng.standard_normal((5, 4, fc * groups, 2))
    full = embed_groups(f, groups)
    assert full.shape == (3, 2, fc * groups, kg * groups) and full.dtype == f.dtype
    np.testing.assert_allclose(vl_nnconv(x, full, None), vl_nnconv(x, f, None), rtol=1e-13, atol=1e-13)
    diagonal, off = split_groups(full, groups, f.shape)
    np.testing.assert_array_equal(diagonal, f)
    assert off.size == full.size - f.size and not off.any()
    dense = embed_groups(f[:1, :1], groups, (fc * groups, kg * groups))  # a Dense kernel
    np.testing.assert_array_equal(dense, full[:1, :1].reshape(fc * groups, kg * groups))


def test_split_groups_returns_the_entries_off_the_blocks():
    f = np.arange(1.0, 9.0).reshape(1, 1, 2, 4)
    kernel = embed_groups(f, 2) + 100 * (embed_groups(np.ones_like(f), 2) == 0)
    diagonal, off = split_groups(kernel, 2, f.shape)
    np.testing.assert_array_equal(diagonal, f)
    np.testing.assert_array_equal(off, np.full(8, 100.0))


def test_roles_name_every_parameter_once():
    assert {r.variable: (r.index, r.trainable) for r in ROLES.values()} == {
        "kernel": (0, True),
        "bias": (1, True),
        "gamma": (0, True),
        "beta": (1, True),
        "moving_mean": (2, False),
        "moving_variance": (2, False),
    }
    assert [r.variable for r in roles_for("conv", trainable=True)] == ["kernel", "bias"]
    assert [r.variable for r in roles_for("bnorm", trainable=True)] == ["gamma", "beta"]
    assert roles_for("relu") == []
    assert parameter_role("conv1/kernel:0") is ROLES["kernel"] and parameter_role("seed") is None
    assert ROLES["beta"].gradient == "dzdw{2}"


def test_variables_of_a_translated_model_have_roles():
    model = to_keras(seed_net(seed=0, batch_normalization=True))
    for v in model.weights:
        role = parameter_role(v)
        assert role is not None, v.path
        assert role.trainable == v.trainable


def test_data_layout_and_indices():
    x = np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)  # H x W x C x N
    k = to_nhwc(x)
    np.testing.assert_array_equal(to_hwcn(k), x)
    assert k[tuple(keras_index((1, 2, 3, 4)))] == x[1, 2, 3, 4]


def test_weight_map_embeds_missing_groups_and_maps_the_gradient_back():
    from fixtures.seed import question_model

    net = seed_net(seed=0)
    model = question_model.build_model()
    alignment = align(net, model)
    weights = WeightMap(net, model, alignment, "float64", load=True)
    assert not weights.problems and len(weights.embedded) == 1
    ((kname, (groups, fshape)),) = weights.embedded.items()
    i = next(p.index for p in alignment.pairs if p.param_layer == kname)
    klayer = model.get_layer(kname)
    kernel = klayer.get_weights()[0]
    diagonal, off = split_groups(kernel, groups, fshape)
    np.testing.assert_array_equal(
        diagonal.reshape(np.shape(net.layers[i].weights[0])), net.layers[i].weights[0]
    )
    assert not off.any()
    grads = [np.ones(v.shape) for v in klayer.trainable_variables]
    mapped = weights.grads_to_mcn(net.layers[i], klayer, grads)
    assert [name for name, _, _ in mapped] == ["dzdw{1}", "dzdw{2}"]
    assert mapped[0][2] is not None and mapped[0][2].size == kernel.size - np.size(net.layers[i].weights[0])
    with pytest.raises(TypeError):
        WeightMap(net, model, alignment, "float64", True)  # load is keyword-only
