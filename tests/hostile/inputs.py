"""Builders for the hostile-input tests (tests/hostile): small nets, crafted .mat files, imdbs, the
working-directory shadow files, and the Hypothesis strategies of the net-struct fuzzer.

Only public building blocks of the harness are used (``harness.mcn.Net``/``Layer``,
``save_net``, ``to_keras``); crafted files are written with scipy.io.savemat directly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.mcn import Layer, Net

# Layer names chosen so that no field name ("weights", "pad", "pool", "leak", "name",
# "epsilon", ...) is a substring of any of them: a message naming the field must name it.
CONV_A, ACT_A, CONV_B, LOSS = "conv_a", "act_a", "conv_b", "loss_z"
DOWN = "down_a"  # the pool layer of pool_net
BN = "bn_a"  # the bnorm layer of dead_channel_bnorm_net


# --------------------------------------------------------------------------- small nets


def small_net(seed: int = 0) -> Net:
    """8x8x1 -> conv 3x3x1x4 -> relu -> conv 6x6x4x2 -> softmaxloss (2 classes)."""
    r = np.random.RandomState(seed)
    layers = [
        Layer("conv", CONV_A, [r.randn(3, 3, 1, 4) * 0.3, r.randn(1, 4) * 0.1], stride=1.0, pad=0.0),
        Layer("relu", ACT_A, [], leak=0.0),
        Layer("conv", CONV_B, [r.randn(6, 6, 4, 2) * 0.3, r.randn(1, 2) * 0.1], stride=1.0, pad=0.0),
        Layer("softmaxloss", LOSS, []),
    ]
    return Net(layers, {"inputSize": np.array([[8.0, 8.0, 1.0]])})


def pool_net(seed: int = 0) -> Net:
    """8x8x1 -> conv 3x3x1x4 -> max pool 2x2 stride 2 -> relu -> conv 3x3x4x2 -> softmaxloss."""
    r = np.random.RandomState(seed)
    layers = [
        Layer("conv", CONV_A, [r.randn(3, 3, 1, 4) * 0.3, r.randn(1, 4) * 0.1], stride=1.0, pad=0.0),
        Layer("pool", DOWN, [], method="max", pool=np.array([[2.0, 2.0]]), stride=2.0, pad=0.0),
        Layer("relu", ACT_A, [], leak=0.0),
        Layer("conv", CONV_B, [r.randn(3, 3, 4, 2) * 0.3, r.randn(1, 2) * 0.1], stride=1.0, pad=0.0),
        Layer("softmaxloss", LOSS, []),
    ]
    return Net(layers, {"inputSize": np.array([[8.0, 8.0, 1.0]])})


def dead_channel_bnorm_net(epsilon: float = 0.0, seed: int = 0) -> Net:
    """small_net with a bnorm after conv_a; channel 2 of conv_a is dead (all-zero filter
    and bias), so its batch variance is exactly 0: with epsilon 0 that is 0/0."""
    net = small_net(seed)
    f, b = net.layers[0].weights
    f[:, :, :, 1] = 0.0
    b[0, 1] = 0.0
    bn = Layer(
        "bnorm",
        BN,
        [np.ones((4, 1)), np.zeros((4, 1)), np.hstack([np.zeros((4, 1)), np.ones((4, 1))])],
        epsilon=float(epsilon),
    )
    net.layers.insert(1, bn)
    return net


def with_last_bias(net: Net, values: list[float]) -> Net:
    """A copy of ``net`` whose last conv's first biases are ``values``."""
    net = net.copy()
    conv = [layer for layer in net.layers if layer.type == "conv"][-1]
    b = np.array(conv.weights[1], dtype=float)
    b.ravel()[: len(values)] = values
    conv.weights[1] = b
    return net


# --------------------------------------------------------------------------- raw .mat files


class Cell:
    """A MATLAB cell array (1 x n) for save_raw; plain lists would become numeric arrays."""

    def __init__(self, items):
        self.items = list(items)

    def __repr__(self) -> str:
        return f"Cell({self.items!r})"


def net_to_raw(net: Net) -> dict:
    """{'layers': Cell([...]), 'meta': {...}} with MATLAB field names (the small nets only
    use one-word fields, so no camelCase conversion is needed)."""
    layers = []
    for layer in net.layers:
        d: dict[str, Any] = {}
        for key, value in layer.fields():
            d[key] = Cell(value) if key == "weights" else value
        layers.append(d)
    return {"layers": Cell(layers), "meta": dict(net.meta)}


def _to_mat(v: Any) -> Any:
    if isinstance(v, Cell):
        if not v.items:
            return np.empty((0, 0), dtype=object)
        out = np.empty((1, len(v.items)), dtype=object)
        for i, item in enumerate(v.items):
            out[0, i] = _to_mat(item)
        return out
    if isinstance(v, dict):
        return {k: _to_mat(x) for k, x in v.items()}
    return v


def save_raw(path: str | Path, raw: dict, variable: str | None = "net") -> Path:
    """Write a raw net struct with scipy.io.savemat (MATLAB v5)."""
    struct = _to_mat(raw)
    scipy.io.savemat(str(path), {variable: struct} if variable else struct, oned_as="row")
    return Path(path)


def _snake(name: str) -> str:
    if name == "class":
        return "class_"
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _to_py(v: Any) -> Any:
    if isinstance(v, Cell):
        return [_to_py(x) for x in v.items]
    if isinstance(v, dict):
        return {k: _to_py(x) for k, x in v.items()}
    return v


def raw_to_net(raw: dict) -> Net:
    """A harness.mcn.Net carrying the raw struct's fields (for save_net(version='7.3'))."""
    layers_raw = raw["layers"].items if isinstance(raw["layers"], Cell) else [raw["layers"]]
    layers = []
    for d in layers_raw:
        d = dict(d)
        layer = Layer(_to_py(d.pop("type")), None, [])
        del layer.name, layer.weights
        for key in ("name", "weights"):
            if key in d:
                setattr(layer, key, _to_py(d.pop(key)))
        for key, value in d.items():
            setattr(layer, _snake(key), _to_py(value))
        layers.append(layer)
    meta = _to_py(raw.get("meta", {}))
    return Net(layers, meta if isinstance(meta, dict) else {})


def save_imdb(path: str | Path, data: Any, labels: Any, sets: Any = None) -> Path:
    images = {"data": data, "labels": labels}
    if sets is not None:
        images["set"] = sets
    scipy.io.savemat(str(path), {"images": images}, oned_as="row")
    return Path(path)


def clean_imdb_arrays(h: int, w: int, c: int, n: int = 8, seed: int = 0):
    r = np.random.RandomState(seed)
    data = r.randn(h, w, c, n).astype(np.float32)
    labels = np.array([[1.0 + (i % 2) for i in range(n)]])
    return data, labels, np.ones((1, n))


# --------------------------------------------------------------------------- working directory

SHADOWED = ("keras", "tensorflow", "sklearn", "numpy", "scipy", "h5py")

_SHADOW_SOURCE = """\
import pathlib
pathlib.Path(__file__).resolve().with_name("SHADOW_IMPORTED_" + __name__).write_text("imported")
"""

_USER_MODEL_SOURCE = """\
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
(HERE / "USER_MODULE_IMPORTED").write_text("imported")


def build():
    (HERE / "USER_MODULE_BUILT").write_text("built")
    import harness
    from harness.mcn import load_net

    return harness.to_keras(load_net(HERE / "net.mat"))
"""


def write_shadow_modules(directory: Path) -> None:
    for name in SHADOWED:
        (directory / f"{name}.py").write_text(_SHADOW_SOURCE)


def shadow_markers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("SHADOW_IMPORTED_*"))


def write_user_model(directory: Path, module: str) -> None:
    (directory / f"{module}.py").write_text(_USER_MODEL_SOURCE)


# --------------------------------------------------------------------------- fuzzer strategies

LAYER_TYPES = (
    "conv",
    "convt",
    "pool",
    "relu",
    "lrn",
    "normalize",
    "softmax",
    "softmaxloss",
    "loss",
    "sigmoid",
    "dropout",
    "bnorm",
)
REAL_FIELDS = (
    "weights",
    "pad",
    "stride",
    "pool",
    "method",
    "leak",
    "rate",
    "param",
    "epsilon",
    "numGroups",
    "upsample",
    "crop",
    "dilate",
    "name",
    "type",
    "precious",
)

# Values whose use as a size either is harmless or fails at once (beyond any memory):
# the fuzzer avoids the 1e3..1e5 band that would allocate gigabytes slowly.
SPECIAL_FLOATS = (
    math.nan,
    math.inf,
    -math.inf,
    1e300,
    -1e300,
    1e9,
    -1e9,
    1e6,
    0.0,
    -0.0,
    1e-300,
    0.5,
    1.5,
    -1.0,
    1.0,
    2.0,
    3.0,
)
_floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(-10, 10, allow_nan=False))
_floats32 = st.one_of(
    st.sampled_from([v for v in SPECIAL_FLOATS if not math.isfinite(v) or v == 0 or 1e-30 < abs(v) < 1e30]),
    st.floats(-10, 10, allow_nan=False, width=32),
)
_ints = st.one_of(st.integers(-3, 10), st.sampled_from([2**31 - 1, -(2**31), 10**9]))
_complex = st.builds(complex, _floats, _floats)
_identifiers = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_]{0,9}\Z")
_field_names = st.one_of(st.sampled_from(REAL_FIELDS), _identifiers)
_text = st.text(
    alphabet=st.one_of(st.characters(min_codepoint=32, max_codepoint=126), st.sampled_from("\n\x1b\té")),
    max_size=8,
)
_shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=3)


def _array(dtype) -> st.SearchStrategy:
    dt = np.dtype(dtype)
    if dt == np.float32:
        elements = _floats32
    elif dt.kind == "f":
        elements = _floats
    elif dt.kind == "c":
        elements = _complex
    elif dt.kind == "b":
        elements = st.booleans()
    elif dt.kind == "u":
        elements = st.integers(0, 10)
    else:
        elements = st.integers(-3, 10)
    return hnp.arrays(dt, _shapes, elements=elements)


_arrays = st.one_of(
    _array(np.float64),
    _array(np.float32),
    _array(np.int8),
    _array(np.uint8),
    _array(np.int32),
    _array(np.bool_),
    _array(np.complex128),
)
_empties = st.sampled_from([(0, 0), (1, 0), (0, 1), (0, 3)]).map(np.zeros)

leaf_values = st.one_of(
    _floats,
    _ints,
    st.booleans(),
    _text,
    _empties,
    _arrays,
    _complex,
)

junk_values = st.recursive(
    leaf_values,
    lambda children: st.one_of(
        st.lists(children, max_size=2).map(Cell),
        st.dictionaries(_identifiers, children, max_size=2),
    ),
    max_leaves=4,
)

_valid_input_sizes = st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 3)).map(
    lambda t: np.array([[float(t[0]), float(t[1]), float(t[2])]])
)
input_sizes = st.one_of(
    st.just(np.array([[8.0, 8.0, 1.0]])), _valid_input_sizes, _valid_input_sizes, junk_values
)


# the types coherent_raw_net builds: no losses, softmax last (the order of LAYER_TYPES otherwise)
COHERENT_LAYER_TYPES = (*(t for t in LAYER_TYPES if t not in ("softmax", "softmaxloss", "loss")), "softmax")


def _plain(*shape: int) -> np.ndarray:
    return np.random.RandomState(sum(shape)).randn(*shape) * 0.3


@st.composite
def coherent_raw_net(draw) -> dict:
    """A small net whose shapes fit together (so that mutations reach deep code)."""
    h, w, c = draw(st.integers(2, 8)), draw(st.integers(2, 8)), draw(st.integers(1, 3))
    meta = {"inputSize": np.array([[float(h), float(w), float(c)]])}
    layers: list[dict] = []
    for i in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(COHERENT_LAYER_TYPES))
        name = f"L{i}{kind}"
        if kind == "conv":
            k = draw(st.integers(1, max(1, min(3, h, w))))
            groups = draw(st.sampled_from([1, 1, 1, c])) if c > 1 else 1
            f = groups * draw(st.integers(1, 2))
            pad, stride = draw(st.integers(0, 1)), draw(st.integers(1, 2))
            d = {"type": "conv", "name": name, "weights": Cell([_plain(k, k, c // groups, f), _plain(1, f)])}
            d.update(pad=float(pad), stride=float(stride))
            if draw(st.booleans()):
                d["dilate"] = 1.0
            h, w, c = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, f
        elif kind == "convt":
            k, up, f = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
            d = {"type": "convt", "name": name, "weights": Cell([_plain(k, k, f, c), _plain(1, f)])}
            d.update(upsample=float(up), crop=np.zeros((1, 4)))
            h, w, c = (h - 1) * up + k, (w - 1) * up + k, f
        elif kind == "pool":
            k = draw(st.integers(1, max(1, min(2, h, w))))
            stride = draw(st.integers(1, 2))
            d = {"type": "pool", "name": name, "method": draw(st.sampled_from(["max", "avg"]))}
            d.update(pool=np.array([[float(k), float(k)]]), stride=float(stride), pad=0.0)
            h, w = (h - k) // stride + 1, (w - k) // stride + 1
        elif kind == "bnorm":
            d = {
                "type": "bnorm",
                "name": name,
                "weights": Cell(
                    [np.ones((c, 1)), np.zeros((c, 1)), np.hstack([np.zeros((c, 1)), np.ones((c, 1))])]
                ),
                "epsilon": 1e-4,
            }
        elif kind in ("lrn", "normalize"):
            d = {"type": kind, "name": name, "param": np.array([[5.0, 1.0, 1e-4 / 5, 0.75]])}
        elif kind == "dropout":
            d = {"type": "dropout", "name": name, "rate": 0.5}
        elif kind == "relu":
            d = {"type": "relu", "name": name, "leak": draw(st.sampled_from([0.0, 0.1]))}
        else:
            d = {"type": kind, "name": name}
        d["precious"] = False
        layers.append(d)
        if h < 1 or w < 1:
            break
    if draw(st.booleans()) and h >= 1 and w >= 1:
        classes = draw(st.integers(2, 3))
        layers.append(
            {
                "type": "conv",
                "name": "scores",
                "weights": Cell([_plain(h, w, c, classes), _plain(1, classes)]),
            }
        )
        layers.append({"type": draw(st.sampled_from(["softmaxloss", "loss"])), "name": "objective"})
    return {"layers": Cell(layers), "meta": meta}


@st.composite
def random_layer(draw) -> dict:
    d: dict[str, Any] = {}
    if draw(st.integers(0, 9)):  # now and then no type at all
        d["type"] = draw(
            st.one_of(st.sampled_from(LAYER_TYPES), st.sampled_from(LAYER_TYPES), _text, junk_values)
        )
    if draw(st.booleans()):
        d["name"] = draw(st.one_of(_text, junk_values))
    if draw(st.booleans()):
        d["weights"] = draw(
            st.one_of(st.lists(st.one_of(_arrays, junk_values), max_size=3).map(Cell), junk_values)
        )
    for key, value in draw(st.dictionaries(_field_names, junk_values, max_size=3)).items():
        d[key] = value
    return d


@st.composite
def random_raw_net(draw) -> dict:
    layers = draw(st.lists(random_layer(), max_size=4))
    raw: dict[str, Any] = {"layers": Cell(layers)}
    if draw(st.integers(0, 5)):
        raw["meta"] = {"inputSize": draw(input_sizes)}
    return raw


@st.composite
def mutated_raw_net(draw) -> dict:
    raw = draw(coherent_raw_net())
    layers = raw["layers"].items
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(("set", "set", "set", "delete", "type", "meta")))
        if action == "meta" or not layers:
            if draw(st.booleans()):
                raw["meta"] = {"inputSize": draw(input_sizes)}
            else:
                raw["meta"] = draw(st.one_of(junk_values, st.just({})))
            continue
        d = layers[draw(st.integers(0, len(layers) - 1))]
        if action == "set":
            d[draw(_field_names)] = draw(junk_values)
        elif action == "delete" and d:
            del d[draw(st.sampled_from(sorted(d)))]
        elif action == "type":
            d["type"] = draw(st.one_of(st.sampled_from(LAYER_TYPES), _text, junk_values))
    return raw


raw_nets = st.one_of(mutated_raw_net(), mutated_raw_net(), mutated_raw_net(), random_raw_net())
