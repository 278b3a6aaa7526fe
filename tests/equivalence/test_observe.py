"""Observing the user's real Keras call: one test per private hook the observer uses
(``Operation.__call__``, TensorFlow op callbacks), the hooks' removal, the float64 copy
of every model style, labels in MATLAB's shapes, and cause probes that are never vacuous."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import harness
from harness.equivalence.observe import discover, observe
from harness.equivalence.precision import float64_copy, model_dtype
from harness.equivalence.run import matlab_labels
from harness.mcn.options import McnError

L = keras.layers


def _x(n=2, h=6, w=6, c=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, h, w, c)).astype("float32")


def _sum(out):
    return tf.reduce_sum(out)


def test_operation_hook_sees_keras_ops_of_a_functional_graph():
    inp = keras.Input((6, 6, 3))
    h = L.Conv2D(4, 3, name="c")(inp)
    h = keras.ops.relu(h)
    out = L.Flatten(name="f")(h)
    model = keras.Model(inp, out)
    obs = observe(model, _x(), training=False, loss=_sum)
    assert [type(l).__name__ for l in obs.leaves] == ["Conv2D", "Relu", "Flatten"]
    k = next(k for k, c in enumerate(obs.captures) if c.op_type == "Relu")
    assert np.all(obs.captures[k].tensor.numpy() >= 0) and obs.grads[k] is not None


def test_op_callback_sees_the_code_of_a_subclass_call():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.conv = L.Conv2D(4, 3, name="c")

        def call(self, x):
            return keras.ops.relu(self.conv(x)) * 2.0

    model = Net()
    obs = observe(model, _x(), training=False, loss=_sum)
    labels = [c.label for c in obs.captures]
    assert "net:Relu" in labels  # keras.ops.relu inside call(): no Keras layer, an eager TF op
    last = obs.captures[-1]  # `* 2.0`, the model's own output
    assert last.op_type == "Mul" and last.tensor is obs.output


def test_hooks_are_removed_even_when_the_model_raises():
    from keras.src.ops.operation import Operation
    from tensorflow.python.framework import op_callbacks

    before = Operation.__call__

    class Broken(keras.Model):
        def call(self, x):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        observe(Broken(), _x(), training=False, loss=_sum)
    assert Operation.__call__ is before
    assert not op_callbacks.should_invoke_op_callbacks()
    assert not tf.config.functions_run_eagerly()


def test_training_call_applies_the_masks_and_restores_the_moments():
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), L.BatchNormalization(name="bn"), L.Dropout(0.5, name="d")]
    )
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    mask = (np.random.default_rng(1).random((2, 6, 6, 3)) < 0.5) * 2.0
    obs = observe(model, _x(), training=True, loss=_sum, masks=[mask])
    bn = next(c for c in obs.captures if c.label == "bn").tensor.numpy()
    np.testing.assert_allclose(obs.output.numpy(), bn * mask, rtol=1e-6)
    for v, value in zip(model.non_trainable_variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), value)


def test_discover_names_the_op_that_made_the_output():
    model = keras.Sequential([keras.Input((6, 6, 3)), L.Flatten(), L.Dense(2, activation="softmax")])
    assert discover(model, _x()).output_op == "Softmax"


def test_float64_copy_of_every_style():
    inp = keras.Input((6, 6, 3))
    out = L.Lambda(lambda t: t * 2.0, name="twice")(keras.ops.relu(L.Conv2D(2, 3)(inp)))
    functional = keras.Model(inp, out)

    class Sub(keras.Model):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.conv = L.Conv2D(2, 3)

        def call(self, x):
            return keras.ops.relu(self.conv(x))

    sub = Sub()
    sub(_x())
    for model in (functional, sub):
        copy, why = float64_copy(model, _x())
        assert copy is not None, why
        assert model_dtype(copy) == "float64" and model_dtype(model) == "float32"
        np.testing.assert_allclose(copy(_x().astype("float64")), model(_x()), rtol=1e-5, atol=1e-6)


def test_a_model_without_a_float64_kernel_is_compared_in_its_own_dtype():
    lrn = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Lambda(lambda t: tf.nn.local_response_normalization(t, 1, 1.0, 1e-3, 0.75)),
        ]
    )
    copy, why = float64_copy(lrn, _x())
    assert copy is None and "float" in why  # TF's LRN has no float64 kernel


@pytest.mark.parametrize("shape", [(3,), (1, 3), (3, 1), (1, 1, 1, 3), (1, 3, 1, 1)])
def test_labels_in_matlab_and_python_shapes(shape):
    labels = np.arange(1.0, 4.0).reshape(shape)
    np.testing.assert_array_equal(matlab_labels(labels, 3), [[1.0, 2.0, 3.0]])


def test_labels_of_another_count_are_refused():
    with pytest.raises(McnError, match="labels"):
        matlab_labels(np.ones((1, 4)), 3)


def test_seed_demo_prints_no_vacuous_cause():
    """ip1 has 1x1 kernels: no flip or transpose changes them, so neither may be a cause."""
    from fixtures.seed.question_model import build_model

    result = harness.check(harness.seed_net(seed=0), build_model(), batch=2)
    assert not result.ok
    assert not {c.alternative for c in result.causes} & {"flipped_kernel", "transposed_kernel"}, result.causes
