"""Loading what a user names: a MatConvNet net, a Keras model, a probe batch.

Shared by the command line and the pytest plugin. Errors are ``InputError`` (a
``McnError``) with one line naming the option and the value.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

from harness.mcn.options import McnError

__all__ = [
    "InputError",
    "SEED_MODELS",
    "build_model",
    "input_size",
    "keras_model_factory",
    "load_mcn_spec",
    "num_classes",
    "parse_model_spec",
    "probe_batch",
    "resolve_input_size",
    "runnable_net",
    "with_input_size",
]

_MODEL_FILE_SUFFIXES = (".keras", ".h5")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SEED_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "seed"
# bundled Keras models of the seed network
SEED_MODELS = {"seed-question": "question_model.py", "seed-fixed": "fixed_model.py"}


class InputError(McnError):
    """A bad net, model or option value: one line naming what was given."""


def parse_model_spec(spec: str, option: str, base: Path) -> tuple[str, str] | Path:
    """(module, attribute path) for ``module:callable``; a Path for a saved model."""
    if spec.lower().endswith(_MODEL_FILE_SUFFIXES):
        path = base / spec
        if not path.is_file():
            raise InputError(f"{option} {spec!r}: no such file ({path})")
        return path
    module, sep, attr = spec.partition(":")
    if not sep or not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise InputError(
            f"{option} {spec!r}: expected module:callable (e.g. mypkg.model:build_model) "
            f"or a path to a {' / '.join(_MODEL_FILE_SUFFIXES)} file"
        )
    return module, attr


def keras_model_factory(spec: str | None, option: str, base: Path):
    if spec in SEED_MODELS:
        return _seed_model(spec, option)
    where = parse_model_spec(spec, option, base)
    if isinstance(where, Path):

        def load():
            import keras

            from harness.translate import layers  # noqa: F401  (registers the harness' custom layers)

            return keras.models.load_model(where, compile=False, safe_mode=True)

        return load
    module_name, attr = where
    # module:callable is the one form that imports from where the user stands, and only
    # after the installed packages: a keras.py there must not replace Keras
    if str(base) not in sys.path:
        sys.path.append(str(base))
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"{option} {spec!r}: cannot import module {module_name!r} ({err})") from None
    except SystemExit as err:  # sys.exit() in the user's module must not end the run as a verdict
        raise InputError(
            f"{option} {spec!r}: importing module {module_name!r} called sys.exit({err.code!r})"
        ) from None
    except Exception as err:  # the user's module itself failed: still one line, not a traceback
        raise InputError(
            f"{option} {spec!r}: importing module {module_name!r} failed: {type(err).__name__}: {err}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{option} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{option} {spec!r}: {attr!r} is not callable ({type(obj).__name__})")
    return obj


def load_mcn_spec(spec: str | None, option: str, base: Path, *, upto: str | None = None, dagnn: bool = False):
    """The net ``spec`` names ('seed' or a .mat file), tidied, cut to the layers the
    reference can run (``runnable_net``); what was cut or adapted is in ``net.notes``.
    A DagNN file gives a ``DagNet`` with ``dagnn`` (the layers the reference cannot run
    removed, ``runnable_dag``), else one line saying the command does not support it yet."""
    from harness.mcn import McnError, load_net, seed_net, vl_simplenn_tidy
    from harness.mcn.dagnn import DagNet
    from harness.mcn.matfile import require_simplenn

    try:
        net = seed_net(seed=0) if spec == "seed" else load_net(base / spec)
        if isinstance(net, DagNet) and dagnn:
            return runnable_dag(net)
        net = require_simplenn(net, "this command")
        net, notes = runnable_net(net, upto)
        net = vl_simplenn_tidy(net)
    except InputError as err:
        raise InputError(f"{option} {spec!r}: {err}") from None
    except (McnError, OSError, ValueError) as err:
        text = str(err)
        for named in (str(base / str(spec)), str(spec)):  # the option names the file already
            if text.startswith(f"{named}: "):
                text = text[len(named) + 2 :]
        raise InputError(f"{option} {spec!r}: {text}") from None
    net.notes = [*net.notes, *notes]
    return net


def runnable_dag(net):
    """A DagNet without the layers the reference cannot run (custom blocks, a Loss whose
    type vl_nnloss does not know), each removed with a note."""
    from harness.mcn import dagnn_blocks

    out = net.copy()
    out.notes = [n for n in net.notes if "net.remove_layer" not in n]  # done here, said below
    for layer in list(out.layers):
        loss = layer.block.get("loss")
        custom_loss = layer.type == "dagnn.Loss" and not (
            isinstance(loss, str) and loss.lower() in dagnn_blocks.LOSSES
        )
        if custom_loss or not dagnn_blocks.supported(layer.type):
            what = f"loss {loss!r}" if custom_loss else "a custom layer"
            out.remove_layer(layer.name)
            out.notes.append(
                f"layer '{layer.name}' ({layer.type}, {what}) removed: the reference cannot run it"
            )
    if not out.layers:
        raise InputError("no layer of the DagNN network is one the reference can run")
    return out


def runnable_net(net, upto: str | None = None):
    """``(net, notes)``: the net up to layer ``upto`` (its name, or its 1-based index), and
    in any case up to the last layer before the first one the reference cannot run (a
    ``custom`` layer holding MATLAB function handles, a type vl_simplenn does not know),
    with a note saying where the comparison stops and why."""
    from harness.mcn.net import LAYER_TYPES

    layers = list(net.layers)
    notes: list[str] = []
    stop = len(layers)
    if upto is not None:
        names = [getattr(l, "name", None) for l in layers]
        if upto in names:
            stop = names.index(upto) + 1
        elif str(upto).isdigit() and 1 <= int(upto) <= len(layers):
            stop = int(upto)
        else:
            shown = ", ".join(str(n) for n in names[:12]) + (" ..." if len(names) > 12 else "")
            raise InputError(
                f"--upto {upto!r}: Expected a layer name or index of the net. Received names: {shown}"
            )
    for i, layer in enumerate(layers[:stop]):
        kind = getattr(layer, "type", None)
        if kind not in LAYER_TYPES:
            if i == 0:
                raise InputError(
                    f"layer 1 '{getattr(layer, 'name', '')}' is of type {kind!r}, which the reference "
                    "cannot run: nothing left to compare"
                )
            what = "a custom layer (MATLAB code)" if kind == "custom" else f"type {kind!r}"
            before = layers[i - 1]
            notes.append(
                f"compared up to layer {i} '{before.name}': layer {i + 1} '{layer.name}' is {what}, "
                "which the reference cannot run"
            )
            stop = i
            break
    else:
        if upto is not None and stop < len(layers):
            notes.append(f"compared up to layer {stop} '{layers[stop - 1].name}' (--upto)")
    if stop == len(layers):
        return net, notes
    cut = net.copy()
    cut.layers = cut.layers[:stop]
    return cut, notes


def resolve_input_size(net, model=None, given=None) -> tuple[tuple[int, int, int], str]:
    """The input size ``(H, W, C)`` to probe the net with, and where it came from, in
    this order: ``net.meta.inputSize``; the Keras model's input shape; ``given`` (the
    user's ``--input-size``); inferred from the net (``geometry.infer_input_size``).
    An ``inputSize`` of one or two numbers (some nets keep a tracker's target size
    there) is read as a square or ``H x W``, its depth taken from the first filters."""
    import numpy as np

    from harness.mcn.geometry import infer_input_size, input_hwc

    declared = net.meta.get("inputSize") if isinstance(net.meta, dict) else None
    if declared is not None:
        hwc = input_size(net)  # a malformed inputSize is an error naming it, never skipped
        if np.size(declared) >= 3:
            return hwc, "net.meta.inputSize"
    shape = _model_input_hwc(model)
    if shape is not None:
        if given is not None and tuple(input_hwc(given, "--input-size")) != shape:
            raise InputError(
                f"--input-size {' '.join(map(str, given))}: the Keras model takes inputs of {shape} (H, W, C)"
            )
        return shape, "the Keras model's input shape"
    if given is not None:
        return input_hwc(given, "--input-size"), "--input-size"
    if declared is not None and np.size(declared) in (1, 2):
        v = input_hwc(declared, "net.meta.inputSize")
        h, w = (v[0], v[0]) if np.size(declared) == 1 else v[:2]
        depth = infer_input_size(net)[0][2] if _has_filters(net) else 1
        shown = " ".join(f"{float(d):g}" for d in np.ravel(declared))
        return (h, w, depth), (
            f"net.meta.inputSize [{shown}] read as {h} x {w}, depth {depth} from the first filters"
        )
    hwc, how = infer_input_size(net)
    return hwc, f"inferred from the net ({how}); give --input-size H W C to choose"


def _has_filters(net) -> bool:
    import numpy as np

    return any(l.type in ("conv", "convt") and l.weights and np.size(l.weights[0]) for l in net.layers)


def with_input_size(net, hwc, source: str):
    """``net`` itself when ``source`` is its own ``meta.inputSize``, else a copy whose
    ``meta.inputSize`` is ``hwc``, with a note saying where that came from."""
    if source == "net.meta.inputSize":
        return net
    out = net.copy()
    out.meta = {**(out.meta if isinstance(out.meta, dict) else {}), "inputSize": [float(d) for d in hwc]}
    out.notes = [*out.notes, f"input size {hwc[0]} x {hwc[1]} x {hwc[2]}: {source}"]
    return out


def _model_input_hwc(model) -> tuple[int, int, int] | None:
    inputs = getattr(model, "inputs", None) or [] if model is not None else []
    try:
        shape = tuple(inputs[0].shape[1:]) if inputs else ()
    except (AttributeError, IndexError, TypeError):
        return None
    if len(shape) != 3 or any(d is None for d in shape):
        return None
    return tuple(int(d) for d in shape)


def build_model(factory, option: str, spec: str):
    """Call the user's model factory: every failure, ``sys.exit()`` included, is one
    InputError naming the option; the result must be a keras.Model."""
    try:
        model = factory()
    except InputError:
        raise
    except SystemExit as err:
        raise InputError(f"{option} {spec!r}: building the model called sys.exit({err.code!r})") from None
    except Exception as err:
        raise InputError(
            f"{option} {spec!r}: building the model failed: {type(err).__name__}: {err}"
        ) from None
    import keras

    if not isinstance(model, keras.Model):
        raise InputError(f"{option} {spec!r}: expected a keras.Model, got {type(model).__name__}")
    return model


def input_size(net) -> tuple[int, int, int]:
    """``(H, W, C)`` from ``net.meta['inputSize']``, checked: one to four positive
    integers (a fourth, the batch size, is ignored); ``harness.mcn.geometry.input_hwc``
    checks them."""
    from harness.mcn import McnError
    from harness.mcn.geometry import input_hwc

    size = net.meta.get("inputSize") if isinstance(net.meta, dict) else None
    if size is None:
        raise McnError("Expected net.meta.inputSize ([H W C]) to build a probe batch; the net has none.")
    return input_hwc(size, "net.meta.inputSize")


def probe_batch(net, n: int, seed: int = 0):
    """``x`` (H x W x C x N, standard normal, from ``net.meta['inputSize']``) and labels
    (1 x N, 1-based, below the number of classes; None for a net without a loss layer),
    drawn from ``np.random.RandomState(seed)``: x first, then the labels."""
    import numpy as np

    from harness.mcn.options import check_budget

    h, w, c = input_size(net)
    if not isinstance(n, int | np.integer) or n < 1:
        raise InputError(f"Expected a positive number of images in the probe batch. Received {n!r}")
    # the batch itself, its float32/float64 copies on both sides and the first layers'
    # activations: refuse up front what cannot fit instead of exhausting the machine
    check_budget(8.0 * h * w * c * n * 4, f"a probe batch of {n} images of net.meta.inputSize [{h} {w} {c}]")
    rng = np.random.RandomState(seed)
    x = rng.randn(h, w, c, n)
    if not net.layers or net.layers[-1].type not in ("softmaxloss", "loss"):
        return x, None
    return x, rng.randint(1, num_classes(net, x[..., :1]) + 1, size=(1, n)).astype(np.float64)


def num_classes(net, x1=None) -> int:
    """Channels of the scores entering the loss: from the last conv/convt filters, else
    from a one-image forward pass of the reference (on ``x1``, or zeros of inputSize)."""
    import numpy as np

    if x1 is None:
        x1 = np.zeros((*input_size(net), 1))

    from harness.mcn import vl_simplenn
    from harness.mcn.options import as_4d

    for layer in reversed(net.layers[:-1]):
        if layer.type in ("conv", "convt") and layer.weights and np.size(layer.weights[0]):
            f = np.asarray(layer.weights[0])
            f = f.reshape(f.shape + (1,) * (4 - f.ndim))
            if layer.type == "conv":
                return int(f.shape[3])
            return int(f.shape[2] * int(np.asarray(getattr(layer, "num_groups", 1)).ravel()[0]))
    body = net.copy()
    body.layers = body.layers[:-1]
    return int(as_4d(vl_simplenn(body, x1, mode="test")[-1].x).shape[2])


def _seed_model(spec: str, option: str):
    path = _SEED_DIR / SEED_MODELS[spec]
    if not path.is_file():
        raise InputError(f"{option} {spec!r}: the bundled seed models are not installed ({path} missing)")
    name = f"mcn_harness_{path.stem}"
    module = sys.modules.get(name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
        sys.modules[name] = module
    return module.build_model
