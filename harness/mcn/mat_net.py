"""From a converted simplenn net struct to a ``Net``: what real MatConvNet files hold.

harness.mcn.matfile reads a file's variables by the conversion rules at its top (structs
as dicts, cells as lists ...) and hands the net struct to ``net_from_struct``, which adapts
what real files hold: a bare cell of layers saved as ``net`` is read as ``net.layers``;
integer and logical numbers in layer fields and meta become float64 (MATLAB saves
integer-valued doubles as uint8, which scipy returns, and uint8 arithmetic wraps;
``as_double``); weights are single or double arrays (integer ones float64, 1x1 ones
(1, 1)); pre-beta ``filters``/``biases`` become ``weights``; an old cnn_train's per-layer
``momentum`` is dropped; a layer field holding a MATLAB object (function handle, gpuArray
...) other than ``type`` and ``weights`` is dropped, each with a line in ``net.notes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.mcn.mat_values import MatlabObject, is_sparse, safe_label
from harness.mcn.net import Layer, Net, python_field
from harness.mcn.options import McnError

__all__ = ["as_double", "net_from_struct"]

# pre-beta layers: filters/biases and their per-parameter multipliers (cnn_train's
# defaults for a missing one were 1)
_OLD_MULTIPLIERS = {
    "learningRate": ("filtersLearningRate", "biasesLearningRate"),
    "weightDecay": ("filtersWeightDecay", "biasesWeightDecay"),
}


def net_from_struct(s: Any, source: str) -> Net:
    """A ``Net`` from a converted simplenn struct (or a bare cell of layer structs).

    What MATLAB files really hold is adapted, and ``net.notes`` says so where something
    is left out: integer and logical numbers (MATLAB stores integer-valued doubles as
    uint8, and scipy returns the stored type) become float64, a 1x1 weight a (1, 1)
    array, pre-beta ``filters``/``biases`` become ``weights`` (their multipliers
    ``learningRate``/``weightDecay`` pairs), an old cnn_train's per-layer ``momentum`` is
    dropped (solver state), and so is a field holding a MATLAB object (a function handle,
    a gpuArray ...) except ``type`` and ``weights``, which the caller refuses."""
    notes: list[str] = []
    if _is_layer_cell(s):
        notes.append("the net is a bare cell of layer structs (no 'layers' field): read as net.layers")
        s = {"layers": s}
    if not isinstance(s, dict) or "layers" not in s:
        raise McnError(f"Expected {source} to be a simplenn net struct with a 'layers' field.")
    layers_raw = s["layers"]
    if isinstance(layers_raw, dict):  # a single layer stored as a struct, not a cell
        layers_raw = [layers_raw]
    if not isinstance(layers_raw, list):
        raise McnError(f"Expected {source}.layers to be a cell array of layer structs.")
    momentum: list[str] = []
    layers = [_layer_from_struct(raw, i, source, notes, momentum) for i, raw in enumerate(layers_raw)]
    if momentum:
        notes.append(
            f"{', '.join(momentum)}: field 'momentum' (the solver state of an old cnn_train) ignored"
        )
    meta = s.get("meta", {})
    if not isinstance(meta, dict):
        meta = {}
    return Net(layers, as_double(meta), notes)


def _is_layer_cell(s: Any) -> bool:
    """A cell of layer structs (each then checked for its 'type')."""
    return isinstance(s, list) and all(isinstance(x, dict) for x in s) and any("type" in x for x in s)


def _layer_from_struct(raw: Any, i: int, source: str, notes: list[str], momentum: list[str]) -> Layer:
    if not isinstance(raw, dict) or "type" not in raw:
        raise McnError(f"{source}.layers{{{i + 1}}}: Expected a struct with a 'type' field.")
    raw = _old_style_weights(dict(raw))
    name = raw.get("name")
    where = f"layer {i + 1} '{safe_label(name) if isinstance(name, str) else f'layer{i + 1}'}'"
    fields = {}
    for key, value in raw.items():
        if key == "momentum":  # old cnn_train kept its momentum buffers in the layers
            momentum.append(where)
            continue
        if key == "weights":
            value = _as_weights(value)
        elif key != "type" and (obj := _find_object(value)) is not None:
            notes.append(
                f"{where}: field '{safe_label(key)}' holds a MATLAB {safe_label(obj)} object; ignored"
            )
            continue
        elif key == "precious":
            try:
                value = bool(np.asarray(value).any()) if np.size(value) else False
            except (ValueError, TypeError):
                raise McnError(
                    f"{source}.layers{{{i + 1}}}.precious: Expected a logical value. "
                    f"Received {type(value).__name__}"
                ) from None
        elif key == "opts":
            value = as_double(_as_list(value))
        elif key != "type":
            value = as_double(value)
        fields[python_field(key)] = value
    layer_type = fields.pop("type")
    name = fields.pop("name", None)
    weights = fields.pop("weights", None)
    return Layer(layer_type, name, weights, **fields)


def _old_style_weights(raw: dict[str, Any]) -> dict[str, Any]:
    """Pre-beta ``filters``/``biases`` as ``weights`` (as vl_simplenn_tidy does), and
    ``filtersLearningRate``/``biasesLearningRate`` (``...WeightDecay``) as the
    ``learningRate`` (``weightDecay``) pair [filters biases], a missing one being 1."""
    if "filters" in raw and _no_weights(raw.get("weights")):
        raw["weights"] = [raw.pop("filters"), raw.pop("biases", np.zeros((0, 0)))]
    for new, old in _OLD_MULTIPLIERS.items():
        if new in raw or not any(k in raw for k in old):
            continue
        pair = [_scalar(raw.get(k, 1.0)) for k in old]
        if None not in pair:
            for k in old:
                raw.pop(k, None)
            raw[new] = np.array([pair], dtype=np.float64)
    return raw


def _no_weights(w: Any) -> bool:
    return w is None or (isinstance(w, list) and not w) or (isinstance(w, np.ndarray) and w.size == 0)


def _scalar(v: Any) -> float | None:
    """A real number (Python, NumPy, or a one-element real array) as float; else None."""
    if isinstance(v, np.ndarray) and v.size == 1 and v.dtype.kind in "biuf":
        v = v.ravel()[0]
    if isinstance(v, bool | int | float | np.bool_ | np.integer | np.floating):
        return float(v)
    return None


def _find_object(v: Any) -> str | None:
    """The class of the first MATLAB object (function handle, MCOS ...) in ``v``, else None."""
    if isinstance(v, MatlabObject):
        return v.matlab_class
    items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
    for item in items:
        found = _find_object(item)
        if found is not None:
            return found
    return None


def as_double(v: Any, *, keep_logical: bool = False) -> Any:
    """Integer and logical numbers as float64 (arrays) and float (numbers), in cells and
    structs too: MATLAB holds these fields as double, scipy returns the stored integer
    type, and integer arithmetic would wrap around (uint8: 200 + 100 = 44). With
    ``keep_logical`` a logical number stays a bool (a DagNN block's logical property);
    logical arrays become float64 either way."""
    if isinstance(v, bool | np.bool_) and keep_logical:
        return bool(v)
    if isinstance(v, bool | int | np.bool_ | np.integer):
        return float(v)
    if isinstance(v, np.ndarray) and v.dtype.kind in "biu":
        return v.astype(np.float64)
    if isinstance(v, list):
        return [as_double(x, keep_logical=keep_logical) for x in v]
    if isinstance(v, dict):
        return {k: as_double(x, keep_logical=keep_logical) for k, x in v.items()}
    return v


def _as_weights(value: Any) -> list:
    """``weights`` as a list of arrays. MATLAB weights are single or double only: integer
    and logical arrays (integer-valued doubles stored compactly) become float64; a 1x1
    weight (a Python number) becomes a (1, 1) array in the class of the layer's other
    floating weights (single with single filters), float64 otherwise."""
    items = _as_list(value)
    like = next(
        (w.dtype for w in items if isinstance(w, np.ndarray) and w.dtype in (np.float32, np.float64)),
        np.dtype(np.float64),
    )
    return [_as_weight(w, like) for w in items]


def _as_weight(w: Any, like: np.dtype | None = None) -> Any:
    """A weight as an array; sparse matrices, MATLAB objects and anything NumPy cannot
    stack are kept as they are, for the caller to refuse with its own message."""
    if isinstance(w, MatlabObject) or is_sparse(w):
        return w
    if isinstance(w, np.ndarray):
        return w.astype(np.float64) if w.dtype.kind in "biu" else w
    if isinstance(w, bool | int | np.bool_ | np.integer):
        return np.full((1, 1), float(w), dtype=np.float64)
    if isinstance(w, float | np.floating):
        return np.full((1, 1), w, dtype=like or np.float64)
    try:
        return np.asarray(w)
    except (ValueError, TypeError):
        return w


def _as_list(v: Any) -> list:
    if isinstance(v, list):
        return v
    if isinstance(v, np.ndarray) and v.size == 0:
        return []
    return [v]
