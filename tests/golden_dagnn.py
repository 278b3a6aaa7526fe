"""Loading MatConvNet's DagNN golden vectors (fixtures/golden_dagnn) as the README there
describes: arrays given back their recorded 4-D shapes, each case's net as a DagNet."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from harness.mcn import Layer, Net
from harness.mcn.dagnn import DagNet
from harness.mcn.matfile import read_variables

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden_dagnn"


@cache
def manifest() -> list[dict]:
    return json.loads((GOLDEN / "MANIFEST.json").read_text())["cases"]


def restore(value: Any, shape: Any) -> Any:
    """Give ``value`` its recorded 4-D shape (MATLAB drops trailing singletons); cells recurse."""
    if isinstance(value, list) and isinstance(shape, list):
        return [restore(v, s) for v, s in zip(value, shape, strict=False)]
    if isinstance(value, dict) and isinstance(shape, dict):
        return {k: restore(v, shape.get(k)) for k, v in value.items()}
    if isinstance(shape, np.ndarray) and shape.size == 4 and np.size(value) == int(np.prod(shape)):
        return np.asarray(value).reshape(tuple(int(s) for s in shape.ravel()))
    return value


@cache
def case(name: str) -> dict[str, Any]:
    v = read_variables(GOLDEN / f"{name}.mat")
    shapes = v.get("shapes", {})
    for key in ("inputs", "outputs", "derOutputs", "opts"):
        if key in v:
            v[key] = restore(v[key], shapes.get(key))
    return v


def net(case: dict[str, Any]) -> DagNet:
    """The case's network: its saveobj struct, or its simplenn net through fromSimpleNN."""
    if "simplenn_net" in case:
        return DagNet.from_simplenn(simplenn(case))
    return DagNet.from_struct(case["net"], case["name"])


def simplenn(case: dict[str, Any]) -> Net:
    """The case's simplenn_net as a Net (every weight is stored in these cases)."""
    layers = []
    for raw in case["simplenn_net"]["layers"]:
        fields = {k: v for k, v in raw.items() if k not in ("type", "name", "weights")}
        weights = [np.asarray(w) for w in raw.get("weights", [])]
        layers.append(Layer(raw["type"], raw["name"], weights, **fields))
    return Net(layers, dict(case["simplenn_net"].get("meta", {})))
