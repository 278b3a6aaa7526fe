"""Loading MatConvNet's golden vectors (fixtures/golden) into 4-D numpy arrays.

Shapes are restored from each file's ``shapes`` struct (MATLAB drops trailing singleton
dimensions); network filters too large to store are regenerated from the file's
``weight_recipe_json`` exactly as the golden README says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from harness.mcn.mat_net import net_from_struct
from harness.mcn.matfile import _read_variables
from harness.mcn.net import Net

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden"


@cache
def manifest() -> list[dict]:
    return json.loads((GOLDEN / "MANIFEST.json").read_text())["cases"]


def case_names(family: str | None = None, op: str | None = None) -> list[str]:
    return [
        c["name"]
        for c in manifest()
        if (family is None or c["family"] == family) and (op is None or c["op"] == op)
    ]


@dataclass
class Case:
    name: str
    family: str
    op: str
    dialect: str
    precision: str
    inputs: dict[str, Any]
    opts: dict[str, Any]
    outputs: dict[str, Any]
    raw: dict[str, Any]

    @property
    def dtype(self) -> type:
        return np.float64 if self.precision == "double" else np.float32


def _restore(value: Any, shape: Any) -> Any:
    """Give ``value`` the 4-D shape recorded for it (recursing through cells)."""
    if isinstance(value, list) and isinstance(shape, list):
        return [_restore(v, s) for v, s in zip(value, shape, strict=False)]
    if isinstance(shape, np.ndarray) and shape.size == 4 and isinstance(value, np.ndarray):
        target = tuple(int(s) for s in shape.ravel())
        arr = np.asarray(value)
        if arr.size == int(np.prod(target)):
            return arr.reshape(target)
    return value


def _restore_struct(values: Any, shapes: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        return {}
    shapes = shapes if isinstance(shapes, dict) else {}
    return {k: _restore(v, shapes.get(k)) for k, v in values.items()}


@cache
def _load(name: str) -> Case:
    v = _read_variables(GOLDEN / f"{name}.mat")
    shapes = v.get("shapes", {})
    shapes = shapes if isinstance(shapes, dict) else {}
    return Case(
        name=name,
        family=v["family"],
        op=v["op"],
        dialect=v["dialect"],
        precision=v["precision"],
        inputs=_restore_struct(v.get("inputs"), shapes.get("inputs")),
        opts=_restore_struct(v.get("opts"), shapes.get("opts")),
        outputs=_restore_struct(v.get("outputs"), shapes.get("outputs")),
        raw=v,
    )


def load_case(name: str) -> Case:
    return _load(name)


def case_net(case: Case, key: str = "net") -> Net:
    """The case's network with omitted filters regenerated from ``weight_recipe_json``
    (float32 draws, cast to double in double-precision cases)."""
    net = net_from_struct(case.raw[key], f"{case.name}.{key}")
    shapes = case.raw.get("shapes", {}).get("net_weights")
    for layer, layer_shapes in zip(net.layers, shapes or [], strict=False):
        layer.weights = [
            _restore(w, s) for w, s in zip(layer.weights, layer_shapes or [], strict=False)
        ] + list(layer.weights[len(layer_shapes or []) :])
    recipe = case.raw.get("weight_recipe_json")
    omitted = case.raw.get("omitted_filters")
    if recipe:
        omitted_names = {omitted} if isinstance(omitted, str) else set(omitted or [])
        for item in json.loads(recipe):
            layer = net.layer(item["layer"])
            j = int(item["tensor"][len("weights{") : -1]) - 1
            if not (np.size(layer.weights[j]) == 0 and item["layer"] in omitted_names):
                continue
            w = np.random.RandomState(item["seed"]).randn(*item["shape"]).astype(np.float32)
            w = w * np.float32(item["scale"])
            layer.weights[j] = w.astype(case.dtype)
    return net
