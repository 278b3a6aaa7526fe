"""load_net on what real MatConvNet files hold (v5 and v7.3): a bare layer cell saved as
``net``, cnn_train checkpoints of every era (per-layer momentum, ``info``, pre-beta
filters/biases), integer and logical fields, 1x1 biases, MATLAB objects in layer fields,
a checkpoint's stale loss labels. DagNN files: test_dagnn_files.py.

Every file is built here, small, with the trait it tests (scipy.io.savemat, the byte-level
v5 helpers of test_matfile_safety, or h5py for v7.3 struct arrays and objects).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io

from harness.mcn import McnError, Net, load_checkpoint, load_net, save_net, vl_simplenn, vl_simplenn_tidy
from harness.mcn.mat_hdf5 import write_hdf5
from harness.mcn.net import LAYER_TYPES, Layer

from .matfile_writers import cell, double, el, matrix, struct_, text, v5, v5_net

VERSIONS = ["7", "7.3"]
_rng = np.random.RandomState(7)
F1 = _rng.randn(3, 3, 2, 3).astype(np.float32)
B1 = _rng.randn(1, 3).astype(np.float32)
F2 = _rng.randn(1, 1, 3, 4).astype(np.float32)
B2 = _rng.randn(1, 4).astype(np.float32)
X = _rng.randn(6, 6, 2, 2).astype(np.float32)


# --------------------------------------------------------------------------- helpers


def raw_layers() -> list[dict[str, Any]]:
    """conv 3x3x2x3 pad 1 > relu > pool 2x2 s2 > conv 1x1x3x4 > softmaxloss, as MATLAB structs."""
    return [
        {"type": "conv", "name": "conv1", "weights": [F1, B1], "pad": 1.0, "stride": 1.0},
        {"type": "relu", "name": "relu1", "leak": 0.0},
        {"type": "pool", "name": "pool1", "method": "max", "pool": np.array([[2.0, 2.0]]), "stride": 2.0},
        {"type": "conv", "name": "conv2", "weights": [F2, B2], "pad": 0.0, "stride": 1.0},
        {"type": "softmaxloss", "name": "loss"},
    ]


def reference_net() -> Net:
    """The net of raw_layers, built in Python (what every variant must compute)."""
    return Net(
        [
            Layer("conv", "conv1", [F1, B1], pad=1.0, stride=1.0),
            Layer("relu", "relu1", leak=0.0),
            Layer("pool", "pool1", method="max", pool=np.array([[2.0, 2.0]]), stride=2.0),
            Layer("conv", "conv2", [F2, B2], pad=0.0, stride=1.0),
            Layer("softmaxloss", "loss"),
        ]
    )


def forward(net: Net, x: np.ndarray = X) -> np.ndarray:
    """tidy, then vl_simplenn in test mode up to the first layer the reference does not
    run or the first loss layer (those need labels)."""
    tidy = vl_simplenn_tidy(net)
    stop = next(
        (
            i
            for i, l in enumerate(tidy.layers)
            if l.type not in LAYER_TYPES or l.type in ("loss", "softmaxloss")
        ),
        len(tidy.layers),
    )
    return vl_simplenn(Net(tidy.layers[:stop], tidy.meta), x, mode="test")[-1].x


def to_scipy(v: Any) -> Any:
    """Python values as scipy.io.savemat writes MATLAB's: lists as 1 x N cells (0 x 0
    when empty), dicts as structs, inside one another too."""
    if isinstance(v, dict):
        return {k: to_scipy(x) for k, x in v.items()}
    if isinstance(v, list):
        out = np.empty((1, len(v)) if v else (0, 0), dtype=object)
        for i, x in enumerate(v):
            out[0, i] = to_scipy(x)
        return out
    return v


def save_raw(path: Path, variables: dict[str, Any], version: str) -> Path:
    """Variables of Python values (dicts: structs, lists: cells) as a v5 or v7.3 file."""
    if version == "7":
        scipy.io.savemat(path, to_scipy(variables), oned_as="row")
    else:
        write_hdf5(path, variables)
    return path


def h5_names(names: list[str]) -> np.ndarray:
    out = np.empty(len(names), dtype=object)
    for i, n in enumerate(names):
        out[i] = np.frombuffer(n.encode(), dtype="S1")
    return out


def h5_add_fields(group: h5py.Group, *names: str) -> None:
    old = [b"".join(n.tolist()).decode() for n in group.attrs.get("MATLAB_fields", [])]
    group.attrs.create("MATLAB_fields", h5_names(old + list(names)), dtype=h5py.vlen_dtype(np.dtype("S1")))


def h5_layer(f: h5py.File, k: int) -> h5py.Group:
    """The struct group of layer k (0-based) of the file's ``net``."""
    return f[f["net/layers"][k, 0]]


def h5_function_handle(group: h5py.Group, name: str) -> None:
    g = group.create_group(name)
    g.attrs["MATLAB_class"] = np.bytes_("function_handle")
    h5_add_fields(group, name)


def h5_mcos(group: h5py.Group, name: str, cls: str, field: bool = True) -> h5py.Dataset:
    """An MCOS object (``field``: as a new field of the struct ``group``)."""
    ds = group.create_dataset(name, data=np.array([[0xDD000000, 2, 1, 1, 1, 1]], np.uint32))
    ds.attrs["MATLAB_class"] = np.bytes_(cls)
    ds.attrs["MATLAB_object_decode"] = np.int32(3)
    if field:
        h5_add_fields(group, name)
    return ds


def v5_handle() -> bytes:
    inner = struct_(b"", {b"function_handle": struct_(b"", {b"function": text(b"", "f")})})
    return matrix(16, (1, 1), b"", inner)


def v5_mcos(cls: bytes, name: bytes = b"") -> bytes:
    ids = matrix(13, (1, 6), b"", el(6, np.array([0xDD000000, 2, 1, 1, 1, 1], "<u4").tobytes()))
    return el(14, el(6, struct.pack("<II", 17, 0)) + el(1, name) + el(1, b"MCOS") + el(1, cls) + ids)


# --------------------------------------------------------------------------- 1: where the net is


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("where", ["net-variable", "top-level"])
def test_net_variable_or_top_level_fields(tmp_path, version, where):
    net = {"layers": raw_layers(), "meta": {"inputSize": np.array([[6.0, 6.0, 2.0]])}}
    variables = {"net": net} if where == "net-variable" else net
    back = load_net(save_raw(tmp_path / "net.mat", variables, version))
    assert back == Net(reference_net().layers, net["meta"])
    assert back.notes == []
    np.testing.assert_allclose(forward(back), forward(reference_net()), rtol=1e-6)


# --------------------------------------------------------------------------- 2: bare layer cell


@pytest.mark.parametrize("version", VERSIONS)
def test_bare_layer_cell_saved_as_net(tmp_path, version):
    back = load_net(save_raw(tmp_path / "bare.mat", {"net": raw_layers()}, version))
    assert [l.name for l in back.layers] == ["conv1", "relu1", "pool1", "conv2", "loss"]
    assert back.meta == {}
    assert back == reference_net()
    assert len(back.notes) == 1 and "bare cell of layer structs" in back.notes[0]
    np.testing.assert_allclose(forward(back), forward(reference_net()), rtol=1e-6)


def test_an_odd_net_variable_is_still_refused(tmp_path):
    with pytest.raises(McnError, match="'layers' field"):
        load_net(save_raw(tmp_path / "odd.mat", {"net": [np.ones((2, 2)), "x"]}, "7"))
    # a bare cell whose second struct has no type: named as in a net.layers cell
    cells = {"net": [{"type": "relu", "name": "r"}, {"name": "typeless"}]}
    with pytest.raises(McnError, match=r"layers\{2\}: Expected a struct with a 'type' field"):
        load_net(save_raw(tmp_path / "typeless.mat", cells, "7"))


# --------------------------------------------------------------------------- 3: cnn_train eras


@pytest.mark.parametrize("version", VERSIONS)
def test_old_checkpoint_momentum_in_layers_and_info(tmp_path, version):
    layers = raw_layers()
    for layer in layers:
        if layer["type"] == "conv":
            layer["momentum"] = [np.full_like(w, 0.25) for w in layer["weights"]]
    info = {"train": {"objective": np.array([[0.5, 0.4]])}}
    path = save_raw(
        tmp_path / "net-epoch-2.mat", {"net": {"layers": layers, "meta": {}}, "info": info}, version
    )
    back = load_net(path)
    assert not any(l.has("momentum") for l in back.layers)
    assert back == reference_net()
    (note,) = back.notes
    assert "momentum" in note and "layer 1 'conv1'" in note and "layer 4 'conv2'" in note
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.stats["train"]["objective"], [[0.5, 0.4]])
    assert ckpt.net == reference_net()
    np.testing.assert_allclose(forward(back), forward(reference_net()), rtol=1e-6)


@pytest.mark.parametrize("version", VERSIONS)
def test_pre_beta_filters_biases_and_their_multipliers(tmp_path, version):
    layers = raw_layers()
    conv1, conv2 = layers[0], layers[3]
    conv1["filters"], conv1["biases"] = conv1.pop("weights")
    conv1.update(
        filtersLearningRate=1.0, biasesLearningRate=2.0, filtersWeightDecay=1.0, biasesWeightDecay=0.0
    )
    conv2["filters"], conv2["biases"] = conv2.pop("weights")
    conv2["biasesLearningRate"] = np.array([[2]], np.uint8)  # the filters' one missing: 1
    back = load_net(save_raw(tmp_path / "old.mat", {"net": {"layers": layers}}, version))
    c1, c2 = back.layers[0], back.layers[3]
    for layer, (f, b) in ((c1, (F1, B1)), (c2, (F2, B2))):
        assert not layer.has("filters") and not layer.has("biases")
        assert len(layer.weights) == 2
        np.testing.assert_array_equal(layer.weights[0], f)
        np.testing.assert_array_equal(layer.weights[1], b)
        assert not any(k.startswith(("filters_", "biases_")) for k, _ in layer.fields())
    np.testing.assert_array_equal(c1.learning_rate, [[1.0, 2.0]])
    np.testing.assert_array_equal(c1.weight_decay, [[1.0, 0.0]])
    assert c2.learning_rate.dtype == np.float64
    np.testing.assert_array_equal(c2.learning_rate, [[1.0, 2.0]])
    assert not c2.has("weight_decay")
    np.testing.assert_allclose(forward(back), forward(reference_net()), rtol=1e-6)


# --------------------------------------------------------------------------- 4: integer fields


@pytest.mark.parametrize("version", VERSIONS)
def test_integer_and_logical_fields_become_double(tmp_path, version):
    u8 = np.uint8
    layers = raw_layers()
    conv1, relu, pool, conv2 = layers[:4]
    conv1.update(
        pad=np.array([[1]], u8),  # 1x1: a Python int from the reader
        stride=np.array([[1, 1]], u8),
        dilate=np.array([[1, 1]], u8),
        learningRate=np.array([[1, 2]], u8),
        weightDecay=np.array([[1, 0]], u8),
        precious=np.array([[True]]),
    )
    relu.update(
        big=np.array([[200, 250]], u8), flags=np.array([[True, False]]), extra={"n": np.array([[7, 9]], u8)}
    )
    pool.update(pool=np.array([[2, 2]], u8), stride=np.array([[2]], u8), pad=np.array([[0, 0, 0, 0]], u8))
    f2 = np.round(F2 * 4).astype(np.int8)  # integer weights: float64 (MATLAB weights are single or double)
    conv2["weights"] = [f2, B2]
    meta = {"inputSize": np.array([[6, 6, 2]], u8)}
    back = load_net(save_raw(tmp_path / "ints.mat", {"net": {"layers": layers, "meta": meta}}, version))
    c1, r, p, c2 = back.layers[:4]
    assert c1.pad == 1.0 and type(c1.pad) is float
    for value in (
        c1.stride,
        c1.dilate,
        c1.learning_rate,
        c1.weight_decay,
        r.big,
        r.flags,
        r.extra["n"],
        p.pool,
    ):
        assert isinstance(value, np.ndarray) and value.dtype == np.float64
    assert c1.precious is True  # precious stays logical
    np.testing.assert_array_equal(r.big + 100, [[300.0, 350.0]])  # uint8 would wrap to [44 94]
    np.testing.assert_array_equal(r.flags, [[1.0, 0.0]])
    np.testing.assert_array_equal(c1.learning_rate, [[1.0, 2.0]])
    assert c2.weights[0].dtype == np.float64
    np.testing.assert_array_equal(c2.weights[0], f2.astype(np.float64))
    assert back.meta["inputSize"].dtype == np.float64
    no_ints = [
        (l.name, k)
        for l in back.layers
        for k, v in l.fields()
        if isinstance(v, np.ndarray) and v.dtype.kind in "biu"
    ]
    assert no_ints == []
    expected = reference_net()
    expected.layers[3].weights = [f2.astype(np.float64), B2]
    np.testing.assert_allclose(forward(back), forward(expected), rtol=1e-6)


# --------------------------------------------------------------------------- 5: 1x1 biases


@pytest.mark.parametrize("version", VERSIONS)
def test_scalar_biases_are_arrays(tmp_path, version):
    f1 = F1[:, :, :, :1].copy()  # one output channel: a 1x1 bias
    layers = [
        {"type": "conv", "name": "single", "weights": [f1, np.array([[0.5]], np.float32)], "pad": 1.0},
        {"type": "conv", "name": "double", "weights": [np.ones((1, 1, 1, 1)), np.array([[3]], np.uint8)]},
    ]
    back = load_net(save_raw(tmp_path / "scalar.mat", {"net": {"layers": layers}}, version))
    b1, b2 = back.layers[0].weights[1], back.layers[1].weights[1]
    assert isinstance(b1, np.ndarray) and b1.shape == (1, 1) and b1.dtype == np.float32 and b1[0, 0] == 0.5
    assert isinstance(b2, np.ndarray) and b2.shape == (1, 1) and b2.dtype == np.float64 and b2[0, 0] == 3.0
    expected = Net(
        [
            Layer("conv", "single", [f1, np.zeros((1, 1), np.float32)], pad=1.0),
            Layer("conv", "double", [np.ones((1, 1, 1, 1)), np.zeros((1, 1))]),
        ]
    )
    np.testing.assert_allclose(forward(back), forward(expected) + 0.5 + 3.0, rtol=1e-5)


# --------------------------------------------------------------------------- 6: MATLAB objects


def _objects_v5(path: Path) -> None:
    conv = struct_(
        b"",
        {
            b"type": text(b"", "conv"),
            b"name": text(b"", "conv1"),
            b"weights": cell(b"", double(b"", F1.astype(np.float64)), double(b"", B1.astype(np.float64))),
            b"pad": double(b"", np.ones((1, 1))),
            b"hook": v5_handle(),
            b"opts": cell(b"", v5_mcos(b"string")),
        },
    )
    relu = struct_(b"", {b"type": text(b"", "relu"), b"name": text(b"", "relu1")})
    custom = struct_(
        b"",
        {
            b"type": text(b"", "custom"),
            b"name": text(b"", "lossfn"),
            b"forward": v5_handle(),
            b"backward": v5_handle(),
        },
    )
    loss = struct_(
        b"", {b"type": text(b"", "loss"), b"name": text(b"", "loss"), b"class": v5_mcos(b"gpuArray")}
    )
    path.write_bytes(v5(v5_net([conv, relu, custom, loss], struct_(b"", {b"x": double(b"", np.ones(2))}))))


def _objects_v73(path: Path) -> None:
    layers = [
        {
            "type": "conv",
            "name": "conv1",
            "weights": [F1.astype(np.float64), B1.astype(np.float64)],
            "pad": 1.0,
        },
        {"type": "relu", "name": "relu1"},
        {"type": "custom", "name": "lossfn"},
        {"type": "loss", "name": "loss"},
    ]
    write_hdf5(path, {"net": {"layers": layers, "meta": {"x": np.ones((1, 2))}}})
    with h5py.File(path, "a") as f:
        h5_function_handle(h5_layer(f, 0), "hook")
        opts = h5_layer(f, 0).create_dataset("opts", shape=(1, 1), dtype=h5py.ref_dtype)  # {string object}
        opts.attrs["MATLAB_class"] = np.bytes_("cell")
        opts[0, 0] = h5_mcos(f["#refs#"], "opts_obj", "string", field=False).ref
        h5_add_fields(h5_layer(f, 0), "opts")
        h5_function_handle(h5_layer(f, 2), "forward")
        h5_function_handle(h5_layer(f, 2), "backward")
        h5_mcos(h5_layer(f, 3), "class", "gpuArray")


@pytest.mark.parametrize("version", VERSIONS)
def test_matlab_objects_in_layer_fields_are_dropped_with_a_note(tmp_path, version):
    path = tmp_path / "objects.mat"
    (_objects_v5 if version == "7" else _objects_v73)(path)
    net = load_net(path)
    conv, _, custom, loss = net.layers
    assert [l.type for l in net.layers] == ["conv", "relu", "custom", "loss"]
    assert not conv.has("hook") and not conv.has("opts")
    assert not custom.has("forward") and not custom.has("backward") and custom.name == "lossfn"
    assert not loss.has("class_")
    assert net.notes == [
        "layer 1 'conv1': field 'hook' holds a MATLAB function_handle object; ignored",
        "layer 1 'conv1': field 'opts' holds a MATLAB string object; ignored",
        "layer 3 'lossfn': field 'forward' holds a MATLAB function_handle object; ignored",
        "layer 3 'lossfn': field 'backward' holds a MATLAB function_handle object; ignored",
        "layer 4 'loss': field 'class' holds a MATLAB gpuArray object; ignored",
    ]
    tidy = vl_simplenn_tidy(net)
    assert tidy.layers[2].type == "custom"
    with pytest.raises(McnError, match="layer 3 'lossfn'"):  # the reference cannot run MATLAB code
        vl_simplenn(tidy, X[:, :, :, :1].astype(np.float64), mode="test")
    expected = Net(reference_net().layers[:2])
    expected.layers[0].weights = [F1.astype(np.float64), B1.astype(np.float64)]
    np.testing.assert_allclose(forward(net, X.astype(np.float64)), forward(expected, X.astype(np.float64)))


def test_notes_are_copied_but_neither_compared_nor_saved(tmp_path):
    net = reference_net()
    net.notes.append("layer 1 'conv1': something ignored")
    twin = net.copy()
    assert twin.notes == net.notes and twin.notes is not net.notes
    assert twin == reference_net()  # notes are not part of the network
    for version in VERSIONS:
        save_net(tmp_path / f"n{version}.mat", net, version=version)
        back = load_net(tmp_path / f"n{version}.mat")
        assert back.notes == [] and back == reference_net()


# --------------------------------------------------------------------------- 7: stale labels


@pytest.mark.parametrize("version", VERSIONS)
def test_stale_loss_labels_of_a_checkpoint_are_dropped(tmp_path, version):
    layers = raw_layers()
    layers[-1]["class"] = np.array([[1, 2, 1, 4, 3]], np.uint8)  # the last batch's labels
    stats = {"train": {"objective": 0.7}}
    path = save_raw(tmp_path / "net-epoch-9.mat", {"net": {"layers": layers}, "stats": stats}, version)
    for net in (load_net(path), load_checkpoint(path).net):
        assert not net.layers[-1].has("class_")
        assert net.notes == [
            "layer 5 'loss': stale field 'class' (labels of the last training batch) ignored"
        ]
        res = vl_simplenn(vl_simplenn_tidy(net), X, labels=np.array([[1.0, 3.0]]), mode="test")
        assert np.isfinite(res[-1].x).all() and np.size(res[-1].x) == 1
        with pytest.raises(McnError, match="missing field 'class'"):
            vl_simplenn(vl_simplenn_tidy(net), X, mode="test")
    # a net saved with its labels on purpose (not a checkpoint) keeps them, as doubles
    kept = load_net(save_raw(tmp_path / "labelled.mat", {"net": {"layers": layers}}, version))
    assert kept.notes == []
    assert kept.layers[-1].class_.dtype == np.float64
    np.testing.assert_array_equal(kept.layers[-1].class_, [[1.0, 2.0, 1.0, 4.0, 3.0]])
