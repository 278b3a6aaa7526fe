"""harness.translate.port: write_port's model.keras, weights.npz, model.py and test_port.py."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import harness
from harness.mcn import save_net, seed_net, vl_simplenn, vl_simplenn_tidy
from harness.mcn.net import Layer, Net
from harness.translate import TranslationError, to_hwcn, to_keras, to_nhwc
from harness.translate.port import PortResult, load_model, write_port

from .test_translate import convt_net

_MODULES = itertools.count()
_STOCK = {name for name in dir(keras.layers) if isinstance(getattr(keras.layers, name), type)}


def _import(path: Path):
    """model.py imported by path under a fresh module name."""
    spec = importlib.util.spec_from_file_location(f"mcn_port_under_test_{next(_MODULES)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _top_modules(source: str) -> set[str]:
    tree = ast.parse(source)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            names.add(node.module.split(".")[0])
    return names


def _classes(source: str) -> set[str]:
    return {node.name for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}


def _custom(model) -> set[str]:
    """The classes of the translation's layers that are not stock Keras layers."""
    return {type(l).__name__ for l in model.layers if type(l).__name__ not in _STOCK}


def _batch(net: Net, classes: int, n: int = 2, seed: int = 0):
    h, w, c = (int(v) for v in np.ravel(net.meta["inputSize"])[:3])
    rng = np.random.RandomState(seed)
    return rng.randn(h, w, c, n), rng.randint(1, classes + 1, size=(1, n)).astype(np.float64)


def _ruff(*paths: Path) -> None:
    """The generated files pass ruff with the project's rules (when ruff is installed)."""
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        return
    rules = ["--isolated", "--line-length", "110", "--select", "E,F,W,I,B,UP,NPY"]
    done = subprocess.run([ruff, "check", *rules, *map(str, paths)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------ the seed


@pytest.fixture(scope="module")
def seed_port(tmp_path_factory):
    net = seed_net(seed=0)
    out = tmp_path_factory.mktemp("seed") / "port"
    return net, write_port(net, out)


@pytest.fixture(scope="module")
def seed_batch():
    rng = np.random.RandomState(7)
    return rng.randn(28, 28, 1, 2), np.array([[1.0, 2.0]])


def test_seed_port_writes_every_file(seed_port):
    _, result = seed_port
    assert isinstance(result, PortResult)
    out = result.out_dir
    assert result.written == [
        out / n for n in ("net.mat", "model.keras", "weights.npz", "model.py", "test_port.py")
    ]
    assert all(p.is_file() for p in result.written)
    assert result.net_path == out / "net.mat" and result.custom_layers == ["MatConvNetPooling"]
    assert any("'loss' (softmaxloss) has no Keras layer" in n for n in result.notes)
    assert any("MatConvNetPooling" in n and "'pool1', 'pool2', 'pool3', 'pool4'" in n for n in result.notes)
    assert not any("cannot align" in n for n in result.notes)
    source = result.model_py.read_text()
    assert _classes(source) == {"MatConvNetPooling"}
    assert "# MatConvNet layer 9: 'ip1' (conv), filters 1 x 1 x 256 x 256" in source
    assert 'x = L.Conv2D(256, (1, 1), groups=2, name="ip1", dtype=dtype)(x)' in source
    _ruff(result.model_py, result.test)


def test_seed_weights_are_the_translations(seed_port):
    net, result = seed_port
    model = to_keras(net)
    with np.load(result.weights) as saved:
        assert sorted(saved.files) == sorted(
            f"{l.name}/{i}" for l in model.layers for i in range(len(l.get_weights()))
        )
        for layer in model.layers:
            for i, value in enumerate(layer.get_weights()):
                np.testing.assert_array_equal(saved[f"{layer.name}/{i}"], value)


def test_seed_model_keras_loads_and_is_equivalent(seed_port, seed_batch):
    net, result = seed_port
    loaded = keras.saving.load_model(result.model_keras)  # the harness' layers are registered here
    assert harness.compare(net, loaded, *seed_batch).ok
    report = harness.compare(net, load_model(result.model_keras), *seed_batch, weights="model")
    assert report.ok, str(report)


def test_seed_model_py_is_equivalent(seed_port, seed_batch):
    net, result = seed_port
    model = _import(result.model_py).build_model()
    translated = to_keras(net)
    assert [l.name for l in model.layers] == [l.name for l in translated.layers]
    assert [type(l).__name__ for l in model.layers] == [type(l).__name__ for l in translated.layers]
    assert harness.compare(net, model, *seed_batch).ok
    report = harness.compare(net, model, *seed_batch, weights="model")  # weights.npz, compared too
    assert report.ok, str(report)
    assert any(r.tensor == "w{1}" for r in report.rows)


def test_seed_model_py_imports_only_keras_numpy_and_stdlib(seed_port):
    _, result = seed_port
    modules = _top_modules(result.model_py.read_text())
    assert {"keras", "numpy"} <= modules
    assert modules - {"keras", "numpy"} <= set(sys.stdlib_module_names)
    assert "tensorflow" not in modules and "harness" not in modules


def test_seed_generated_test_passes(seed_port, tmp_path):
    _, result = seed_port
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--harness-batch",
            "2",
            str(result.test),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout


# ------------------------------------------------------------------------------ small nets


def _pointwise_net() -> Net:
    """Padded conv, leaky ReLU, LRN, padded avg and max pooling, sigmoid, dropout."""
    r = np.random.RandomState(1)
    layers = [
        Layer("conv", "conv1", [r.randn(3, 3, 2, 6) * 0.5, r.randn(1, 6) * 0.1], pad=[1, 0, 2, 1], stride=1),
        Layer("relu", "leaky1", leak=0.1),
        Layer("lrn", "norm1", param=np.array([5.0, 1.0, 1e-2, 0.75])),
        Layer("pool", "avgpad", method="avg", pool=[2, 3], pad=[0, 1, 1, 0], stride=1),
        Layer("pool", "maxpad", method="max", pool=[3, 2], pad=[1, 1, 0, 1], stride=2),
        Layer("sigmoid", "sig1"),
        Layer("dropout", "drop1", rate=0.5),
        Layer("conv", "fc", [r.randn(3, 4, 6, 3) * 0.5, r.randn(1, 3) * 0.1]),
        Layer("softmaxloss", "loss"),
    ]
    return Net(layers, {"inputSize": [7, 7, 2]})


def _strided_net() -> Net:
    """A dilated strided conv (Subsample), a strided conv with empty filters (Subsample +
    AddBias), bnorm and unpadded average pooling (AveragePooling2D)."""
    r = np.random.RandomState(2)
    moments = np.hstack([0.1 * r.randn(4, 1), 1 + r.rand(4, 1)])
    layers = [
        Layer("conv", "dil1", [r.randn(3, 3, 2, 4) * 0.5, r.randn(1, 4) * 0.1], pad=1, stride=2, dilate=2),
        Layer("relu", "relu1"),
        Layer("conv", "bias1", [np.zeros((0, 0)), r.randn(1, 4) * 0.1], stride=[2, 1]),
        Layer("bnorm", "bn1", [1 + 0.1 * r.randn(4, 1), 0.1 * r.randn(4, 1), moments]),
        Layer("pool", "avg1", method="avg", pool=[2, 2], stride=1),
        Layer("conv", "fc", [r.randn(1, 2, 4, 3) * 0.5, r.randn(1, 3) * 0.1]),
        Layer("softmaxloss", "loss"),
    ]
    return Net(layers, {"inputSize": [9, 8, 2]})


def _convt_net(groups: int) -> Net:
    """test_translate's convt net (Conv2DTranspose + Cropping2D, or GroupedConv2DTranspose
    with filter groups), its weights drawn with seed 3."""
    return convt_net(groups, np.random.RandomState(3))


def _softmax_net() -> Net:
    """No loss layer: a padded conv and a softmax."""
    r = np.random.RandomState(4)
    layers = [Layer("conv", "conv1", [r.randn(3, 3, 1, 3), r.randn(1, 3)], pad=1), Layer("softmax", "prob")]
    return Net(layers, {"inputSize": [5, 5, 1]})


CASES = {
    "lrn-leaky-pooling": (_pointwise_net, {"MatConvNetLeakyReLU", "MatConvNetLRN", "MatConvNetPooling"}),
    "subsample-addbias-bnorm": (_strided_net, {"Subsample", "AddBias"}),
    "grouped-convt": (lambda: _convt_net(2), {"GroupedConv2DTranspose"}),
    "convt": (lambda: _convt_net(1), set()),
    "softmax-no-loss": (_softmax_net, set()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_small_net_port_is_equivalent(case, tmp_path):
    make, expected = CASES[case]
    net = make()
    result = write_port(net, tmp_path / "port")
    translated = to_keras(net)
    assert _custom(translated) == expected  # the net makes to_keras use these custom layers
    source = result.model_py.read_text()
    assert _classes(source) == expected == set(result.custom_layers)
    assert _top_modules(source) - {"keras", "numpy"} <= set(sys.stdlib_module_names)
    _ruff(result.model_py, result.test)

    model = _import(result.model_py).build_model()
    assert [(l.name, type(l).__name__) for l in model.layers] == [
        (l.name, type(l).__name__) for l in translated.layers
    ]
    x, labels = _batch(net, int(translated.output_shape[-1]), n=3)
    got = np.asarray(model(to_nhwc(x), training=False))
    np.testing.assert_array_equal(got, np.asarray(translated(to_nhwc(x), training=False)))
    if net.layers[-1].type != "softmaxloss":
        # no loss layer: compared through the sum of its outputs, without labels
        want = vl_simplenn(vl_simplenn_tidy(net), x, mode="test")[-1].x
        np.testing.assert_allclose(to_hwcn(got), want, rtol=1e-12, atol=1e-14)
        assert any("no loss layer" in n for n in result.notes)
        assert "labels = None" in result.test.read_text()
        labels = None
    for mode in ("normal", "test"):
        report = harness.compare(net, model, x, labels, mode=mode, weights="model")
        assert report.ok, str(report)


def test_refuses_to_overwrite(tmp_path):
    net = _softmax_net()
    out = tmp_path / "port"
    first = write_port(net, out)
    stamps = {p: p.stat().st_mtime_ns for p in first.written}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_port(net, out)
    assert {p: p.stat().st_mtime_ns for p in first.written} == stamps
    # one existing file is enough, and nothing else is written before the refusal
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.py").write_text("# mine\n")
    with pytest.raises(FileExistsError, match="model.py"):
        write_port(net, other)
    assert [p.name for p in other.iterdir()] == ["model.py"]
    assert (other / "model.py").read_text() == "# mine\n"
    again = write_port(net, other, overwrite=True)
    assert again.model_py.read_text().startswith('"""Keras port')


def test_mcn_path_is_referred_to_not_copied(tmp_path):
    net = _convt_net(1)
    mat = tmp_path / "nets" / "my net.mat"
    mat.parent.mkdir()
    save_net(mat, net)
    result = write_port(net, tmp_path / "port", mcn_path=mat)
    assert result.net_path == mat.resolve() and not (tmp_path / "port" / "net.mat").exists()
    assert f"NET = Path({ascii(str(mat.resolve()))})" in result.test.read_text()
    by_path = write_port(mat, tmp_path / "by_path")  # the net given as its .mat file
    assert by_path.net_path == mat.resolve() and by_path.model_py.read_text() == result.model_py.read_text()


def test_input_size_for_a_net_without_one(tmp_path):
    net = _convt_net(1)
    net.meta = {}
    result = write_port(net, tmp_path / "port", input_size=(9, 9, 2))
    assert "inputs = keras.Input(shape=(9, 9, 2)" in result.model_py.read_text()
    assert "INPUT_SIZE = (9, 9, 2)" in result.test.read_text()
    assert (
        _import(result.model_py).build_model().output_shape
        == to_keras(net, input_size=(9, 9, 2)).output_shape
    )


def test_untranslatable_net_raises_and_writes_nothing(tmp_path):
    net = Net([Layer("custom_thing", "odd")], {"inputSize": [3, 3, 1]})
    with pytest.raises(TranslationError, match="custom_thing"):
        write_port(net, tmp_path / "port")
    assert not (tmp_path / "port").exists()


def test_hostile_layer_names_stay_comments(tmp_path):
    net = _convt_net(1)
    net.layers[0].name = 'conv"""\nimport os  # \\'
    net.layers[-1].name = 'loss"""\nraise SystemExit'
    result = write_port(net, tmp_path / "port")
    source = result.model_py.read_text()
    assert _top_modules(source) == {"pathlib", "keras", "numpy"}
    assert not any(isinstance(node, ast.Raise) for node in ast.walk(ast.parse(source)))
    model = _import(result.model_py).build_model()
    assert model.layers[1].name == to_keras(net).layers[1].name


def test_custom_layers_are_copied_from_harness_translate_layers(tmp_path):
    """model.py defines each custom layer by its class in harness.translate.layers, the
    source itself (without the registration, with the helpers it calls): the standalone
    file runs the code model.keras runs."""
    from harness.translate import layers

    net = _pointwise_net()
    result = write_port(net, tmp_path / "port")
    source = result.model_py.read_text()
    assert "def _with_arguments(" in source and "register_keras_serializable" not in source
    copied = "MatConvNetPooling in model.py (keras.ops, source copied from harness.translate.layers)"
    assert any(copied in n for n in result.notes)
    for name in result.custom_layers:
        decorator, own = inspect.getsource(getattr(layers, name)).split("\n", 1)
        assert decorator.startswith("@keras.saving.register_keras_serializable") and own.strip() in source
    assert _top_modules(source) - {"keras", "numpy"} <= set(sys.stdlib_module_names)
    model = _import(result.model_py).build_model()
    x, labels = _batch(net, 3)
    report = harness.compare(net, model, x, labels, weights="model")
    assert report.ok, str(report)
