"""Write a MatConvNet net's Keras port to a folder: ``write_port`` (``write_dag_port`` for a
DagNN network).

The folder gets

- ``model.keras``: the faithful translation (``to_keras``) with its weights; it loads
  wherever ``harness.translate.layers`` is imported (``load_model`` here does both);
- ``weights.npz``: every layer's ``get_weights()`` keyed ``"<layer name>/<index>"``;
- ``model.py``: readable, standalone Keras source (imports keras, numpy and pathlib only)
  whose ``build_model()`` rebuilds the translation layer for layer, same names, and
  loads ``weights.npz``: ``port_source`` (harness/translate/port_model.py) writes it;
- ``test_port.py``: a pytest regression test through the harness' pytest plugin
  (``harness_equivalence``) checking ``model.py`` and ``model.keras``, with their own
  weights, against the net's .mat file (``net.mat`` written beside them, or ``mcn_path``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harness.io.text import safe_text
from harness.mcn.net import Net
from harness.translate.build import to_keras
from harness.translate.port_model import WEIGHTS, port_source, py_literal

if TYPE_CHECKING:
    import keras

__all__ = ["PortResult", "load_model", "port_source", "port_weights", "write_dag_port", "write_port"]

MODEL_KERAS = "model.keras"
MODEL_PY = "model.py"
TEST_PY = "test_port.py"
NET_MAT = "net.mat"


@dataclass
class PortResult:
    """What ``write_port`` wrote: the folder, each file, the .mat file the test reads,
    the custom layer classes written into model.py, and notes (MatConvNet layers without
    a Keras layer of their own, layers that need a custom class, ...)."""

    out_dir: Path
    model_keras: Path
    model_py: Path | None  # None for a DagNN network (write_dag_port)
    weights: Path | None
    test: Path
    net_path: Path  # the net the test compares with: out_dir/net.mat, or mcn_path
    written: list[Path] = field(default_factory=list)  # every file written, in order
    custom_layers: list[str] = field(default_factory=list)  # classes defined in model.py
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ the API


def write_port(
    net: Net | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    input_size=None,
    mcn_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> PortResult:
    """Write the Keras port of ``net`` into ``out_dir`` (created if missing): model.keras,
    weights.npz, model.py, test_port.py, and net.mat unless ``mcn_path`` names the net's
    .mat file (``net`` may also be that path). ``input_size`` (H, W, C) overrides
    ``net.meta['inputSize']``, as in ``to_keras``. Existing files are never replaced
    unless ``overwrite``: ``FileExistsError`` names them, before anything is written.
    A net ``to_keras`` cannot translate raises its ``TranslationError``."""
    from harness.mcn.matfile import load_net, require_simplenn, save_net
    from harness.mcn.simplenn import vl_simplenn_tidy

    if not isinstance(net, Net):
        if hasattr(net, "layers"):  # a DagNet: one clear line
            require_simplenn(net, "write_port")
        mcn_path = net if mcn_path is None else mcn_path
        net = require_simplenn(load_net(net), "write_port")
    if mcn_path is not None:
        mcn_path = Path(mcn_path).resolve()
        if not mcn_path.is_file():
            raise FileNotFoundError(f"mcn_path {str(mcn_path)!r}: no such file")
    out = Path(out_dir)
    _check_out_dir(out, [MODEL_KERAS, WEIGHTS, MODEL_PY, TEST_PY], mcn_path=mcn_path, overwrite=overwrite)

    model = to_keras(net, "float64", input_size=input_size)  # TranslationError propagates
    tidy = vl_simplenn_tidy(net)
    source, classes, notes = port_source(model, tidy)
    notes += _alignment_notes(model, tidy)
    hwc = tuple(int(d) for d in model.input_shape[1:])
    has_loss = bool(tidy.layers) and tidy.layers[-1].type in ("softmaxloss", "loss")
    if not has_loss:
        notes.append(
            "the net has no loss layer: test_port.py compares it through the sum of its outputs "
            "(the derivatives of that sum on both sides)"
        )
    net_file = mcn_path if mcn_path is not None else out / NET_MAT
    test = _test_source(hwc, int(model.output_shape[-1]), has_loss, mcn_path)

    out.mkdir(parents=True, exist_ok=True)
    result = PortResult(
        out_dir=out,
        model_keras=out / MODEL_KERAS,
        model_py=out / MODEL_PY,
        weights=out / WEIGHTS,
        test=out / TEST_PY,
        net_path=net_file,
        custom_layers=classes,
        notes=notes,
    )
    if mcn_path is None:  # first: a net MATLAB cannot hold fails before the rest is written
        save_net(result.net_path, net)
        result.written.append(result.net_path)
    model.save(result.model_keras)
    result.written.append(result.model_keras)
    weights = port_weights(model)
    with open(result.weights, "wb") as fh:  # np.savez on a path would append '.npz' to odd names
        np.savez(fh, **weights)
    result.written.append(result.weights)
    result.model_py.write_text(source, encoding="utf-8")
    result.written.append(result.model_py)
    result.test.write_text(test, encoding="utf-8")
    result.written.append(result.test)
    return result


def _check_out_dir(out: Path, names: list[str], *, mcn_path, overwrite: bool) -> None:
    """Refuse, before anything is written, an ``out`` that is not a folder, or one already
    holding one of ``names`` (and ``net.mat`` unless ``mcn_path``) unless ``overwrite``."""
    names = names + ([] if mcn_path else [NET_MAT])
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {str(out)!r} exists and is not a directory")
    taken = [n for n in names if (out / n).exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds {', '.join(taken)}: pass overwrite=True to replace them"
        )


def _alignment_notes(model, net: Net) -> list[str]:
    """The harness' own alignment of the translation with the net: a problem here means
    ``harness.check`` (and so test_port.py) cannot pair the two."""
    from harness.equivalence.align import align

    problems = align(net, model).problems
    if not problems:
        return []
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return [
        "harness.check cannot align the translation with the net, so test_port.py fails until "
        f"harness.equivalence.align pairs them: {safe_text(problems[0])}{more}"
    ]


def load_model(path: str | os.PathLike) -> keras.Model:
    """A saved ``model.keras`` (or any model saved from ``to_keras``), with the harness'
    custom layers registered first (Keras' safe mode, not compiled)."""
    import keras

    from harness.translate import layers  # noqa: F401  (registers the custom layers)

    return keras.saving.load_model(path, compile=False, safe_mode=True)


def port_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """``{"<layer name>/<index>": layer.get_weights()[index]}`` for every layer of ``model``."""
    return {
        f"{layer.name}/{i}": np.asarray(value)
        for layer in model.layers
        for i, value in enumerate(layer.get_weights())
    }


# ------------------------------------------------------------------------ test_port.py


_TEST_HEAD = '''"""Regression test of the Keras port beside this file (generated by mcn-harness).

    python -m pytest test_port.py{options}

{what}
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import harness
{imports}
HERE = Path(__file__).resolve().parent
{net_line}
INPUT_SIZE = {input_size}  # H, W, C of the port's input


@pytest.fixture(scope="module")
def net():
    net = harness.load_net(NET)
    net.meta.setdefault("inputSize", list(INPUT_SIZE))  # the port's, if the net names none
    return net


def _port_module():
    spec = importlib.util.spec_from_file_location("mcn_harness_port_model", HERE / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved_model():
    from harness.translate.port import load_model

    return load_model(HERE / "model.keras")
'''

_TEST_CHECK = '''

@pytest.fixture
def batch(request):
    """x (H x W x C x N, MatConvNet's layout) and 1-based labels (1 x N; None for a net
    without a loss layer, compared through the sum of its outputs)."""
    n = request.config.getoption("harness_batch")
    rng = np.random.RandomState(0)
    x = rng.randn(*INPUT_SIZE, n)
    {labels}
    return x, labels


def test_model_py_matches_matconvnet(harness_equivalence, net, batch):
    model = _port_module().build_model()
    harness_equivalence(net=net, model=model, x=batch[0], labels=batch[1], weights="model")


def test_model_keras_matches_matconvnet(harness_equivalence, net, batch):
    harness_equivalence(net=net, model=_saved_model(), x=batch[0], labels=batch[1], weights="model")
'''


def _test_source(hwc: tuple[int, ...], classes: int, has_loss: bool, mcn_path: Path | None) -> str:
    """test_port.py: the plugin's ``harness_equivalence`` on model.py and model.keras with
    their own weights (a net without a loss layer is compared through the sum of its
    outputs, with no labels)."""
    options = " [--harness-mode test] [--harness-batch 8] [--harness-report DIR]"
    what = (
        "checks model.py's build_model() and model.keras, each with its own weights, against the\n"
        "MatConvNet net layer by layer (outputs, derivatives and the weights themselves) through\n"
        "the mcn-harness pytest plugin's ``harness_equivalence`` fixture (with\n"
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD set, add ``-p mcn_harness``)."
    )
    labels = (
        f"labels = rng.randint(1, {classes} + 1, size=(1, n)).astype(np.float64)"
        if has_loss
        else "labels = None  # the net has no loss layer"
    )
    head = _TEST_HEAD.format(
        options=options,
        what=what,
        imports="",
        net_line=_net_line(mcn_path),
        input_size=py_literal(tuple(hwc)),
    )
    return head + _TEST_CHECK.replace("{labels}", labels)


def _net_line(mcn_path: Path | None) -> str:
    """test_port.py's ``NET = ...`` line: net.mat beside it, or the (absolute) ``mcn_path``."""
    if mcn_path is None:
        return f'NET = HERE / "{NET_MAT}"  # the MatConvNet net the port was made from'
    return f"NET = Path({ascii(str(mcn_path))})  # the MatConvNet net the port was made from"


_DAG_TEST = '''"""Regression test of the Keras port of a DagNN network beside this file (generated by
mcn-harness): model.keras against the MatConvNet net, var by var (values, derivatives,
the params themselves), through harness.check.

    python -m pytest test_port.py
"""

from pathlib import Path

import harness
from harness.io.specs import runnable_dag
from harness.translate.port import load_model

HERE = Path(__file__).resolve().parent
{net_line}


def test_model_keras_matches_matconvnet():
    net = runnable_dag(harness.load_net(NET))  # layers the reference cannot run removed
    result = harness.check(net, load_model(HERE / "model.keras"), batch=2, weights="model")
    assert result.ok, str(result)
'''


def write_dag_port(net, out_dir, *, mcn_path=None, input_size=None, overwrite: bool = False) -> PortResult:
    """The port of a DagNN network (``harness.mcn.DagNet``, custom layers already removed):
    ``model.keras`` (``to_keras_dag``), ``test_port.py`` (``harness.check`` with the model's
    own weights) and ``net.mat`` unless ``mcn_path`` names the net's file. The standalone
    model.py is written for simplenn networks only so far."""
    from harness.mcn.matfile import save_net

    out = Path(out_dir)
    _check_out_dir(out, [MODEL_KERAS, TEST_PY], mcn_path=mcn_path, overwrite=overwrite)
    model = to_keras(net, "float64", input_size=input_size)
    out.mkdir(parents=True, exist_ok=True)
    net_path = Path(mcn_path).resolve() if mcn_path else out / NET_MAT
    result = PortResult(
        out_dir=out,
        model_keras=out / MODEL_KERAS,
        model_py=None,
        weights=None,
        test=out / TEST_PY,
        net_path=net_path,
        notes=["a DagNN network: model.py (standalone source) is written for simplenn networks only so far"],
    )
    if not mcn_path:
        save_net(result.net_path, net)
        result.written.append(result.net_path)
    model.save(result.model_keras)
    result.written.append(result.model_keras)
    result.test.write_text(_DAG_TEST.format(net_line=_net_line(net_path if mcn_path else None)))
    result.written.append(result.test)
    return result
