"""harness.compare.diagnose: static findings without running the networks."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fixtures.seed import fixed_model, question_model
from harness.diagnosis.findings import diagnose
from harness.mcn import seed_net
from harness.mcn.net import Layer, Net
from harness.mcn.simplenn import vl_simplenn_tidy
from harness.translate import to_keras


@pytest.fixture(scope="module")
def seed():
    return seed_net(seed=0)


def _kinds(findings):
    return {f.kind: f for f in findings}


def test_question_model_findings(seed):
    found = _kinds(diagnose(seed, question_model.build_model()))
    groups = found["groups"]
    assert groups.layer == "ip1" and "2 filter groups" in groups.mcn_value and groups.keras_value == "1"
    assert (
        "SGD with momentum 0.9" in found["optimizer"].mcn_value
        and found["optimizer"].keras_value == "RMSprop"
    )
    wd = found["weight decay"]
    assert "0.0005" in wd.mcn_value and "learning-rate decay, not weight decay" in wd.keras_value
    sched = found["learning-rate schedule"]
    assert sched.mcn_value == "0.01 for 10 epochs, 0.001 for 10 epochs, 0.0001 for 10 epochs"
    assert "InverseTimeDecay" in sched.keras_value
    assert "[1 2]" in found["bias learning-rate multiplier"].mcn_value
    inits = [f for f in diagnose(seed, question_model.build_model()) if f.kind == "initialisation"]
    assert len(inits) == 6 and all("GlorotUniform" in f.keras_value for f in inits)
    assert all("Gaussian(0, 0.01" in f.mcn_value for f in inits)
    assert "binary_accuracy" in found["metric"].keras_value


def test_fixed_model_has_no_architecture_or_init_findings(seed):
    kinds = {f.kind for f in diagnose(seed, fixed_model.build_model())}
    assert not kinds & {"groups", "initialisation", "optimizer", "stride", "padding", "alignment"}
    # its optimizer is harness.matconvnet_optimizer: coupled weight decay exactly cnn_train's
    assert "weight decay" not in kinds
    # ... but its schedule has steps_per_epoch=1, which counts epochs in steps
    assert "schedule steps" in kinds


def test_faithful_translation_has_no_layer_findings(seed):
    findings = diagnose(seed, to_keras(seed))
    assert [f for f in findings if f.layer and f.kind not in ("initialisation",)] == []


def test_layer_config_findings():
    rng = np.random.RandomState(0)
    net = vl_simplenn_tidy(
        Net(
            [
                Layer("conv", "c1", [rng.randn(3, 3, 1, 4), np.zeros((1, 4))], pad=[1, 0, 2, 1], stride=2),
                Layer("pool", "p1", pool=3, pad=1, stride=1, method="avg"),
                Layer("bnorm", "bn", [np.ones((4, 1)), np.zeros((4, 1))]),
                Layer("conv", "fc", [rng.randn(4, 4, 4, 2), np.zeros((1, 2))]),
                Layer("softmaxloss", "loss"),
            ],
            {"inputSize": np.array([[8.0, 8.0, 1.0]])},
        )
    )
    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.ZeroPadding2D(((0, 1), (1, 2)), name="pad"),  # sides swapped
            L.Conv2D(4, 3, strides=2, name="conv"),
            L.ZeroPadding2D(1, name="ppad"),
            L.AveragePooling2D(3, 1, name="pool"),  # zero padding counts in the average
            L.BatchNormalization(name="bn"),  # epsilon 1e-3
            L.Flatten(),
            L.Dense(2, name="dense"),
        ]
    )
    found = _kinds(diagnose(net, model))
    assert "(sides swapped)" in found["padding"].keras_value
    assert found["pooling padding"].keras_value == "zero padding"
    assert found["bnorm epsilon"].mcn_value == "1e-05" and found["bnorm epsilon"].keras_value == "0.001"
    assert "F.reshape(-1, K)" in found["flatten order"].fix


def test_findings_render_and_serialise(seed):
    findings = diagnose(seed, question_model.build_model())
    text = str(findings[0])
    assert text.startswith("[groups] ip1 / conv2d_5") and "Fix:" in text
    assert set(findings[0].to_dict()) == {"kind", "layer", "keras", "mcn_value", "keras_value", "fix"}


def _chain(model, replace=None, after=None, drop=()):
    """Rebuild a translated model's layer chain in float64 with planted changes."""
    x = inputs = keras.Input(model.inputs[0].shape[1:], dtype="float64")
    for layer in model.layers[1:]:
        if layer.name in drop:
            continue
        x = (replace or {}).get(layer.name, layer)(x)
        for extra in (after or {}).get(layer.name, []):
            x = extra(x)
    return keras.Model(inputs, x)


@pytest.fixture(scope="module")
def padded_net():
    rng = np.random.RandomState(3)
    return vl_simplenn_tidy(
        Net(
            [
                Layer("conv", "c1", [rng.randn(3, 3, 2, 4), rng.randn(1, 4)], pad=[1, 0, 2, 1]),
                Layer("bnorm", "bn1", [1 + rng.rand(4, 1), rng.randn(4, 1)]),
                Layer("relu", "r1"),
                Layer("pool", "p1", pool=3, pad=1, stride=2, method="avg"),
                Layer("conv", "fc", [rng.randn(4, 4, 4, 3), rng.randn(1, 3)]),
                Layer("softmaxloss", "loss"),
            ],
            {"inputSize": np.array([[8.0, 7.0, 2.0]])},
        )
    )


@pytest.mark.parametrize(
    "bug, culprit, cause, key",
    [
        ("zero_padded_pool", "p1", "zero-padded", "zero_padded_pooling"),
        ("swapped_padding", "c1", "padding sides are swapped", "wrong_padding_side"),
        ("bnorm_epsilon", "bn1", "bnorm epsilon is 0.001", "bnorm_epsilon"),
        ("missing_relu", "r1", "the ReLU is missing", "missing_relu"),
    ],
)
def test_cause_probes_name_the_planted_mistake(padded_net, bug, culprit, cause, key):
    from harness import compare
    from harness.diagnosis import Cause, probe_causes

    L = keras.layers
    model = to_keras(padded_net)
    if bug == "zero_padded_pool":
        planted = _chain(
            model,
            after={"r1": [L.ZeroPadding2D(1, dtype="float64")]},
            replace={"p1": L.AveragePooling2D(3, 2, dtype="float64")},
        )
    elif bug == "swapped_padding":
        planted = _chain(model, replace={"c1_pad": L.ZeroPadding2D(((0, 1), (1, 2)), dtype="float64")})
    elif bug == "bnorm_epsilon":
        planted = _chain(model, replace={"bn1": L.BatchNormalization(epsilon=1e-3, dtype="float64")})
    else:
        planted = _chain(model, drop=("r1",))
    rng = np.random.RandomState(0)
    x, labels = rng.randn(8, 7, 2, 3), np.array([[1.0, 3.0, 2.0]])
    report = compare(padded_net, planted, x, labels)
    assert not report.ok and report.first_divergence.culprit == culprit, str(report)
    causes = probe_causes(padded_net, planted, report, x, labels)
    assert all(isinstance(c, Cause) and c.layer == culprit for c in causes), causes
    assert any(cause in str(c) for c in causes), [str(c) for c in causes]
    found = next(c for c in causes if cause in str(c))
    assert found.alternative == key and found.to_dict() == {
        "layer": culprit,
        "alternative": key,
        "text": str(found),
    }
    # and the faithful translation has nothing to probe
    clean = compare(padded_net, to_keras(padded_net), x, labels)
    assert clean.ok and probe_causes(padded_net, model, clean, x, labels) == []


def test_diagnose_and_compare_training_state_the_optimizer_facts_of_one_table():
    """The optimizer rules (harness.diagnosis.optimizer_rules) give diagnose its Findings
    and compare_training its notes: the same facts, from one table."""
    import harness
    from harness.diagnosis.optimizer_rules import optimizer_differences
    from harness.mcn.train import TrainOpts

    rng = np.random.RandomState(0)
    net = vl_simplenn_tidy(
        Net(
            [
                Layer(
                    "conv",
                    "c1",
                    [rng.randn(3, 3, 1, 3), rng.randn(1, 3)],
                    learning_rate=np.array([[1.0, 2.0]]),
                ),
                Layer("softmaxloss", "loss"),
            ],
            {"inputSize": np.array([[3.0, 3.0, 1.0]])},
        )
    )
    net.meta["trainOpts"] = {"learningRate": np.array([[2.0**-10]]), "weightDecay": 0.0, "solver": "adam"}
    opts = TrainOpts.from_matconvnet(net.meta["trainOpts"])
    shared = {d.kind: d for d in optimizer_differences(keras.optimizers.Adam(2.0**-10), opts, net)}
    assert {"optimizer constants", "float32 constants", "bias learning-rate multiplier"} <= set(shared)
    findings = {f.kind: f for f in diagnose(net, to_keras(net), optimizer=keras.optimizers.Adam(2.0**-10))}
    batches = [(rng.randn(3, 3, 1, 2), np.array([[1.0, 3.0]]))]
    report = harness.compare_training(net, to_keras(net), keras.optimizers.Adam(2.0**-10), batches, opts)
    for kind in ("optimizer constants", "float32 constants"):
        assert findings[kind] == shared[kind].finding()
        assert shared[kind].note in report.notes, report.notes
    assert "c1 w{2} x2" in next(n for n in report.notes if "learningRate(j)" in n)  # per variable
    assert "[1 2]" in findings["bias learning-rate multiplier"].mcn_value  # from the net's multipliers
