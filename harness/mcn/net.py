"""The simplenn network structure: ``Net`` and ``Layer``, mirroring MatConvNet's struct.

``net.layers`` is a list of ``Layer``; a layer carries MatConvNet's fields as attributes in
snake_case (``learningRate`` becomes ``learning_rate``, ``numGroups`` ``num_groups``; the
label field ``class`` becomes ``class_`` because ``class`` is a Python keyword).
``net.meta`` is a plain dict with MatConvNet's own (camelCase) keys: ``inputSize``,
``trainOpts``, ``classes`` ...
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from harness.mcn.options import McnError, is_empty

__all__ = [
    "LAYER_TYPES",
    "Layer",
    "Net",
    "layer_errors",
    "layer_field",
    "layer_weight",
    "matlab_field",
    "python_field",
    "unknown_type",
]

# Layer types the reference runs (vl_simplenn's switch); 'lrn' is an alias of 'normalize'.
LAYER_TYPES = (
    "conv",
    "convt",
    "pool",
    "normalize",
    "lrn",
    "softmax",
    "loss",
    "softmaxloss",
    "relu",
    "sigmoid",
    "dropout",
    "bnorm",
)


def python_field(name: str) -> str:
    """MatConvNet field name -> attribute name (``learningRate`` -> ``learning_rate``)."""
    if name == "class":
        return "class_"
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def matlab_field(name: str) -> str:
    """Attribute name -> MatConvNet field name (``learning_rate`` -> ``learningRate``)."""
    if name == "class_":
        return "class"
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


class Layer:
    """One simplenn layer. ``type``, ``name`` and ``weights`` always exist; other
    MatConvNet fields (``pad``, ``stride``, ``pool``, ``method``, ``leak``, ...) are
    attributes when present. ``fields()`` lists them in order.

    Fields live in their own mapping, apart from the methods: a layer read from a .mat
    file may carry any legal MATLAB field name, including ``get``, ``copy``, ``has`` or
    ``fields``. Such a field never replaces the method; read it with ``layer.get(name)``.
    """

    __slots__ = ("_fields",)

    def __init__(self, /, type: str, name: str | None = None, weights: list | None = None, **fields: Any):
        object.__setattr__(self, "_fields", {})
        self.type = type
        self.name = name
        self.weights = (
            list(weights) if isinstance(weights, list | tuple) else ([] if weights is None else weights)
        )
        for key, value in fields.items():
            setattr(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        self._fields[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self._fields[key]
        except KeyError:
            raise AttributeError(key) from None

    def __getattr__(self, key: str) -> Any:
        # Only called when normal lookup fails (methods win): the layer's own fields.
        if key.startswith("__") or key == "_fields":
            raise AttributeError(key)
        fields = object.__getattribute__(self, "_fields")
        if key in fields:
            return fields[key]
        raise AttributeError(f"layer '{fields.get('name')}' ({fields.get('type')}) has no field '{key}'")

    def has(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Set field ``key`` (any name, including those of this class's methods)."""
        self._fields[key] = value

    def fields(self) -> Iterator[tuple[str, Any]]:
        yield from list(self._fields.items())

    def copy(self) -> Layer:
        return copy.deepcopy(self)

    def __deepcopy__(self, memo: dict) -> Layer:
        new = Layer.__new__(Layer)
        object.__setattr__(new, "_fields", {})
        for key, value in self.fields():
            new._fields[key] = copy.deepcopy(value, memo)
        return new

    def __getstate__(self) -> dict:
        return dict(self._fields)

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "_fields", dict(state))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layer) or list(self._fields) != list(other._fields):
            return False
        return all(_equal(a, b) for (_, a), (_, b) in zip(self.fields(), other.fields(), strict=True))

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        parts = []
        for key, value in self.fields():
            if key == "weights" and isinstance(value, list):
                value = [np.shape(w) for w in value]
            parts.append(f"{key}={value!r}")
        return f"Layer({', '.join(parts)})"


class Net:
    """A simplenn network: ``layers`` (list of Layer) and ``meta`` (dict, MatConvNet keys).

    ``notes`` (list of str) says what the loader adapted or left out of the file it read
    (a function handle, a stale label field, ...): one line each, naming the layer and
    the field. They are copied by ``copy()`` but are not part of the network: ``==``
    ignores them and ``save_net`` does not write them.
    """

    def __init__(
        self, layers: list[Layer] | None = None, meta: dict | None = None, notes: list[str] | None = None
    ):
        self.layers = list(layers) if layers is not None else []
        self.meta = dict(meta) if meta is not None else {}
        self.notes: list[str] = list(notes) if notes is not None else []

    def copy(self) -> Net:
        return copy.deepcopy(self)

    def __setstate__(self, state: dict) -> None:  # a Net pickled before ``notes`` existed
        self.__dict__.update(state)
        self.__dict__.setdefault("notes", [])

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise McnError(f"Expected a layer named {name!r}. Received names={[l.name for l in self.layers]}")

    def index(self, name: str) -> int:
        return self.layers.index(self.layer(name))

    def __eq__(self, other: object) -> bool:  # the network only: ``notes`` are not compared
        return (
            isinstance(other, Net)
            and len(self.layers) == len(other.layers)
            and all(a == b for a, b in zip(self.layers, other.layers, strict=True))
            and _equal(self.meta, other.meta)
        )

    def __repr__(self) -> str:
        body = "\n".join(f"  {i + 1:2d} {l.type:<12} {l.name}" for i, l in enumerate(self.layers))
        return f"Net({len(self.layers)} layers)\n{body}"


# ------------------------------------------------------------------ a layer's fields, checked


def layer_field(layer: Layer, i: int, key: str) -> Any:
    """Field ``key`` of layer ``i`` (0-based), which vl_simplenn needs: McnError naming the
    layer and the MatConvNet field when it is missing."""
    if not layer.has(key):
        hint = " (the labels: pass labels= to vl_simplenn)" if key == "class_" else ""
        raise McnError(
            f"layer {i + 1} '{layer.name}' ({layer.type}): missing field '{matlab_field(key)}'{hint}"
        )
    return layer.get(key)


def layer_weight(layer: Layer, i: int, j: int) -> np.ndarray | None:
    """``weights{j+1}`` of layer ``i`` as an array, None when empty (MATLAB's ``[]``)."""
    if len(layer.weights) <= j:
        raise McnError(
            f"layer {i + 1} '{layer.name}' ({layer.type}): Expected field 'weights' to have at least {j + 1} "
            f"entries. Received {len(layer.weights)}"
        )
    w = layer.weights[j]
    return None if is_empty(w) else np.asarray(w)


def unknown_type(layer: Layer, i: int) -> McnError:
    """The error for a layer whose type vl_simplenn does not run."""
    return McnError(
        f"layer {i + 1} '{layer.name}': Expected field 'type' to be one of {', '.join(LAYER_TYPES)}. "
        f"Received type={layer.type!r}"
    )


@contextmanager
def layer_errors(layer: Layer, i: int) -> Iterator[None]:
    """Make the errors raised inside name layer ``i``: an McnError gets the prefix
    ``layer 3 'conv2' (conv): `` (unless it names a layer already), and a malformed field
    value (TypeError, ValueError, OverflowError, IndexError from NumPy) becomes one."""
    try:
        yield
    except McnError as err:
        raise _located(err, layer, i) from None
    except (TypeError, ValueError, OverflowError, IndexError) as err:  # a malformed field
        raise _located(McnError(f"invalid field value ({type(err).__name__}: {err})"), layer, i) from None


def _located(err: McnError, layer: Layer, i: int) -> McnError:
    msg = str(err)
    if msg.startswith("layer "):
        return err
    return McnError(f"layer {i + 1} '{layer.name}' ({layer.type}): {msg}")


def _equal(a: Any, b: Any) -> bool:
    """Structural equality with arrays compared by dtype, shape and value."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype == object or b.dtype == object:
            return a.shape == b.shape and all(_equal(x, y) for x, y in zip(a.ravel(), b.ravel(), strict=True))
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b
