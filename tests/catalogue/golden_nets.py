"""A small, self-contained reader for the golden ``vl_simplenn`` cases (and single-layer cases).

Arrays keep MatConvNet's ``H x W x C x N`` order; ``nhwc`` converts to Keras' layout.  MATLAB
drops trailing singleton dimensions when saving, so every tensor is restored to the 4-D shape
recorded in the file's ``shapes`` struct.  Filters the file omits (``omitted_filters``) are
regenerated from ``weight_recipe_json`` exactly as fixtures/golden/README.md describes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io as sio

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "golden"

SEED_SMALL = "simplenn_seed_small_master"
SMALL_MIXED = "simplenn_small_mixed_master"
SEED_BNORM_TEST = "simplenn_seed_small_bnorm_test_master"


def _str(a: Any) -> str:
    """A MATLAB char array (1-element unicode array) as str; '' for empty."""
    a = np.asarray(a)
    return str(a.ravel()[0]) if a.size else ""


def _restore(a: np.ndarray, shape: Any) -> np.ndarray:
    """Reshape ``a`` to the 4-D MATLAB size stored in ``shapes`` (never reorders elements)."""
    shape = tuple(int(s) for s in np.asarray(shape, dtype=float).ravel())
    if int(np.prod(shape)) == 0:
        return np.zeros((0,), dtype=a.dtype)
    return np.reshape(a, shape)


def _pad4(v: Any) -> tuple[int, int, int, int]:
    """MatConvNet pad: scalar -> all sides, else [top bottom left right]."""
    v = [int(p) for p in np.asarray(v, dtype=float).ravel()]
    return (v[0],) * 4 if len(v) == 1 else tuple(v)  # type: ignore[return-value]


def _pair(v: Any) -> tuple[int, int]:
    """MatConvNet stride / pool size: scalar -> square, else [vertical horizontal]."""
    v = [int(p) for p in np.asarray(v, dtype=float).ravel()]
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


@dataclass(frozen=True)
class McnLayer:
    """One ``net.layers{i}`` entry after ``vl_simplenn_tidy``.

    ``weights`` for conv: ``(filters FHxFWxFCxK, bias (K,) or None)``; for bnorm:
    ``(gains (C,), biases (C,), moments (C, 2) = [mean, sigma])``.
    """

    index: int  # 1-based position in net.layers
    name: str
    type: str
    weights: tuple[Any, ...] = ()
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # top bottom left right
    stride: tuple[int, int] = (1, 1)
    pool: tuple[int, int] | None = None
    method: str | None = None
    param: tuple[float, ...] | None = None  # lrn [N kappa alpha beta]
    leak: float = 0.0
    rate: float | None = None
    epsilon: float | None = None
    dilate: tuple[int, int] = (1, 1)

    @property
    def filters(self) -> np.ndarray:
        return self.weights[0]

    @property
    def bias(self) -> np.ndarray | None:
        return self.weights[1] if len(self.weights) > 1 else None


@dataclass(frozen=True)
class GoldenNet:
    name: str
    precision: str  # 'single' or 'double'
    dialect: str
    mode: str
    layers: tuple[McnLayer, ...]
    x: np.ndarray  # H x W x C x N
    labels: np.ndarray  # 1-based, (N,)
    res_x: tuple[np.ndarray, ...]  # res(i).x, i = 1..L+1 (0-based here: res_x[0] is the input)
    loss: float
    recipe: tuple[dict, ...] = ()  # weight_recipe_json entries, network order
    omitted_filters: frozenset[str] = frozenset()
    _by_name: dict[str, McnLayer] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({layer.name: layer for layer in self.layers})

    # -- lookup ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> McnLayer:
        return self._by_name[name]

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.precision == "single" else np.float64)

    @property
    def pre_loss_layer(self) -> str:
        """Name of the last layer before the loss layer (the port's output)."""
        assert self.layers[-1].type in ("softmaxloss", "loss"), self.layers[-1].type
        return self.layers[-2].name

    def output(self, name: str) -> np.ndarray:
        """``res(i+1).x``: the stored output of layer ``name`` (H x W x C x N)."""
        return self.res_x[self[name].index]

    def recipe_entry(self, layer: str, tensor: str = "weights{1}") -> dict:
        (entry,) = [e for e in self.recipe if e["layer"] == layer and e["tensor"] == tensor]
        return entry

    def input_to(self, name: str) -> np.ndarray:
        return self.res_x[self[name].index - 1]

    def groups(self, name: str) -> int:
        layer = self[name]
        c_in = self.input_to(name).shape[2]
        return c_in // layer.filters.shape[2]

    # -- Keras layout ---------------------------------------------------------------------
    @property
    def x_nhwc(self) -> np.ndarray:
        return nhwc(self.x)

    def output_nhwc(self, name: str) -> np.ndarray:
        return nhwc(self.output(name))


def nhwc(a: np.ndarray) -> np.ndarray:
    """H x W x C x N  ->  N x H x W x C."""
    return np.ascontiguousarray(np.transpose(a, (3, 0, 1, 2)))


def softmax_channels(scores_hwcn: np.ndarray) -> np.ndarray:
    """Softmax over the channel axis of an H x W x C x N array, in float64."""
    s = scores_hwcn.astype(np.float64)
    s = s - s.max(axis=2, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=2, keepdims=True)


def recipe_tensor(entry: dict) -> np.ndarray:
    """Regenerate one tensor of ``weight_recipe_json`` (MATLAB shape, float32)."""
    rs = np.random.RandomState(int(entry["seed"]))
    return rs.randn(*entry["shape"]).astype(np.float32) * np.float32(entry["scale"])


def _loadmat(stem: str) -> dict:
    return sio.loadmat(str(GOLDEN_DIR / f"{stem}.mat"), squeeze_me=False)


@functools.cache
def load_net(stem: str) -> GoldenNet:
    """Read one ``vl_simplenn`` golden case."""
    m = _loadmat(stem)
    assert _str(m["op"]) == "vl_simplenn", stem
    shapes = m["shapes"][0, 0]
    w_shapes = shapes["net_weights"].ravel()
    omitted = {_str(n) for n in m["omitted_filters"].ravel()} if "omitted_filters" in m else set()
    recipe = json.loads(_str(m["weight_recipe_json"])) if "weight_recipe_json" in m else []

    layers = []
    for i, cell in enumerate(m["net"][0, 0]["layers"].ravel()):
        s = cell[0, 0]
        names = s.dtype.names
        name, typ = _str(s["name"]), _str(s["type"])
        raw = [np.asarray(w) for w in s["weights"].ravel()] if "weights" in names else []
        wsh = list(w_shapes[i].ravel()) if w_shapes[i].size else []
        ws: list[Any] = []
        for j, w in enumerate(raw):
            if typ == "conv" and j == 0 and name in omitted:
                (entry,) = [e for e in recipe if e["layer"] == name and e["tensor"] == "weights{1}"]
                ws.append(recipe_tensor(entry))
                continue
            w = _restore(w, wsh[j])
            if typ == "conv" and j == 1:
                w = w.reshape(-1) if w.size else None  # 1 x K -> (K,)
            elif typ == "bnorm" and j < 2:
                w = w.reshape(-1)
            elif typ == "bnorm" and j == 2:
                w = w.reshape(-1, 2)
            ws.append(w)
        if typ == "conv" and len(ws) == 1:
            ws.append(None)

        kw: dict[str, Any] = {}
        if "pad" in names:
            kw["pad"] = _pad4(s["pad"])
        if "stride" in names:
            kw["stride"] = _pair(s["stride"])
        if "dilate" in names:
            kw["dilate"] = _pair(s["dilate"])
        if "pool" in names:
            kw["pool"] = _pair(s["pool"])
        if "method" in names:
            kw["method"] = _str(s["method"])
        if "param" in names:
            kw["param"] = tuple(float(p) for p in s["param"].ravel())
        if "leak" in names and s["leak"].size:
            kw["leak"] = float(s["leak"].ravel()[0])
        if "rate" in names:
            kw["rate"] = float(s["rate"].ravel()[0])
        if "epsilon" in names:
            kw["epsilon"] = float(s["epsilon"].ravel()[0])
        layers.append(McnLayer(index=i + 1, name=name, type=typ, weights=tuple(ws), **kw))

    inputs = m["inputs"][0, 0]
    in_shapes = shapes["inputs"][0, 0]
    x = _restore(inputs["x"], in_shapes["x"])
    labels = np.asarray(inputs["labels"], dtype=np.float64).ravel()
    res_x = tuple(
        _restore(np.asarray(a), sh)
        for a, sh in zip(m["outputs"][0, 0]["x"].ravel(), shapes["outputs"][0, 0]["x"].ravel(), strict=True)
    )
    return GoldenNet(
        name=stem,
        precision=_str(m["precision"]),
        dialect=_str(m["dialect"]),
        mode=_str(m["opts"][0, 0]["mode"]),
        layers=tuple(layers),
        x=x,
        labels=labels,
        res_x=res_x,
        loss=float(np.asarray(m["loss"]).ravel()[0]),
        recipe=tuple(recipe),
        omitted_filters=frozenset(omitted),
    )


@functools.cache
def load_layer_case(stem: str) -> dict[str, Any]:
    """A single-layer case: {'inputs', 'outputs'} restored to 4-D, raw 'opts', 'precision', 'op'."""
    m = _loadmat(stem)
    shapes = m["shapes"][0, 0]
    out: dict[str, Any] = {"precision": _str(m["precision"]), "op": _str(m["op"])}
    for part in ("inputs", "outputs"):
        s, sh = m[part][0, 0], shapes[part][0, 0]
        out[part] = {n: _restore(np.asarray(s[n]), sh[n]) for n in s.dtype.names}
    opts = m["opts"]  # an empty struct ("no options") has no fields
    names = (opts.dtype.names or ()) if opts.size else ()
    out["opts"] = {n: np.asarray(opts[0, 0][n]).ravel() for n in names}
    return out
