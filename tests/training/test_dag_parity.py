"""train_parity on DagNN nets: cnn_train_dag's steps replayed by compare_training on an imdb
(harness.training.dag_parity), and what it refuses before training."""

from __future__ import annotations

import io
import math

import keras
import numpy as np
import pytest

import harness
from harness.io.imdb import Imdb
from harness.mcn import McnError
from harness.mcn.dagnn import DagLayer, DagNet
from harness.training.dag_parity import check_dag_imdb, dag_training_vars
from harness.training.parity import train_parity

from .test_dag_replay import small_net


def imdb(n: int = 10, shape=(6, 6, 2), classes: int = 4, seed: int = 4) -> Imdb:
    r = np.random.RandomState(seed)
    labels = r.randint(1, classes + 1, size=(1, n)).astype(float)
    sets = np.ones((1, n))
    sets[0, -2:] = 2  # validation images: not trained on
    return Imdb(r.randn(*shape, n).astype(np.float32), labels, sets)


def run(net, model, optimizer="matconvnet", **kwargs):
    return train_parity(
        net, model, imdb(), epochs=2, batch_size=3, optimizer=optimizer, progress=io.StringIO(), **kwargs
    )


def test_the_exact_optimizer_keeps_both_sides_together():
    net = small_net(bnorm=True)
    result = run(net, harness.to_keras(net), dtype="float64")
    # 8 training images in batches of 3: 3 steps per epoch, cnn_train's shuffle per epoch
    assert [(s.step, s.epoch) for s in result.steps] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert all(abs(s.loss_ref - s.loss_keras) < 1e-12 * max(1.0, s.loss_ref) for s in result.steps)
    assert max(s.max_weight_diff for s in result.steps) < 1e-12
    assert all(math.isnan(s.error_ref) and math.isnan(s.error_keras) for s in result.steps)
    assert result.settings["reference"] == "cnn_train_dag" and result.settings["first_divergence"] is None
    assert result.settings["der_outputs"] == {"objective": 1.0} and result.settings["steps_per_epoch"] == 3
    assert result.steps[0].learning_rate == 0.001  # TrainOpts' default rate: the net has no trainOpts


def test_a_plain_keras_optimizer_parts_from_cnn_train_dag():
    """Keras SGD applies one rate to every param: the biases (multiplier 2) step half as far."""
    net = small_net()
    result = run(net, harness.to_keras(net, "float32"), optimizer=keras.optimizers.SGD(0.001, momentum=0.9))
    assert result.steps[-1].max_weight_diff > 1e-6
    first = result.settings["first_divergence"]
    assert first is not None and first["step"] == 1


def test_the_model_optimizer_is_the_compiled_one():
    net = small_net()
    model = harness.to_keras(net, "float32")
    model.compile(optimizer=harness.matconvnet_optimizer(net))
    result = run(net, model, optimizer="model")
    assert result.settings["optimizer"] == "MatConvNetSGD" and result.steps[-1].max_weight_diff < 1e-5
    with pytest.raises(McnError, match="compiled model"):
        run(net, harness.to_keras(net, "float32"), optimizer="model")


def test_the_objective_and_the_labels_of_every_loss():
    """A Loss named otherwise than 'objective' is the objective; a classerror Loss reading
    the same labels is fed too, and not trained on."""
    net = small_net()
    loss = net.layer("loss")
    loss.outputs = ["cost"]
    layers = [
        *net.layers,
        DagLayer("err", "dagnn.Loss", ["prediction", "label"], ["error"], [], {"loss": "classerror"}),
    ]
    dag = DagNet(layers, net.params, meta=net.meta)
    assert dag_training_vars(dag) == ("input", ["label"], {"cost": 1.0})
    result = run(dag, harness.to_keras(dag), dtype="float64")
    assert result.settings["der_outputs"] == {"cost": 1.0} and result.steps[-1].max_weight_diff < 1e-12


def test_what_it_refuses_before_training():
    net = small_net()
    no_loss = DagNet([l for l in net.layers if l.type != "dagnn.Loss"], net.params)
    with pytest.raises(McnError, match="no dagnn.Loss layer"):
        dag_training_vars(no_loss)
    two = DagNet([*net.layers, DagLayer("r2", "dagnn.ReLU", ["other"], ["y2"], [])], net.params)
    with pytest.raises(McnError, match=r"2 image inputs \(input, other\)"):
        dag_training_vars(two)
    model = harness.to_keras(net)
    with pytest.raises(McnError, match=r"--data 'x': images are \(5, 6, 2\)"):
        check_dag_imdb(net, model, imdb(shape=(5, 6, 2)), "--data 'x'")
    with pytest.raises(McnError, match="images.labels in 1..4"):
        check_dag_imdb(net, model, imdb(classes=7, seed=1), "--data 'x'")
    check_dag_imdb(net, model, imdb(), "--data 'x'")
    with pytest.raises(McnError, match="dialect 'master'"):
        run(net, model, dialect="beta25")
