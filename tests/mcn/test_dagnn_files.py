"""DagNN files: harness.mcn.matfile with harness.mcn.dagnn on files built here.

Files with the traits real DagNN files have (uint8 block values, 1x1 biases, cuDNN
options, shared params, custom layers, v5 and v7.3 struct arrays) load as a DagNet and
evaluate; save_net writes what dagnn.DagNN.loadobj reads (round trips in v5 and v7.3);
cnn_train_dag checkpoints load; require_simplenn refuses a DagNet with one clear line, and
a dagnn.DagNN saved as a MATLAB object is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io

from harness.mcn import McnError, load_checkpoint, load_net, save_net, seed_net
from harness.mcn.dagnn import DagNet
from harness.mcn.mat_hdf5 import write_hdf5
from harness.mcn.matfile import DagNNNotSupported, require_simplenn

from .matfile_writers import v5
from .test_dagnn import small_bnorm_simplenn
from .test_realworld_traits import B1, F1, VERSIONS, X, h5_add_fields, h5_mcos, to_scipy, v5_mcos


def struct_array_v5(items: list[dict[str, Any]]) -> np.ndarray:
    """A 1 x N MATLAB struct array of ``items`` (their keys in order) for scipy.io.savemat."""
    keys = list(items[0])
    out = np.empty((1, len(items)), dtype=[(k, object) for k in keys])
    for i, item in enumerate(items):
        for k in keys:
            out[0, i][k] = to_scipy(item[k])
    return out


# --------------------------------------------------------------------------- a real-like file


_r = np.random.RandomState(5)
F_IN = _r.randn(3, 3, 2, 4).astype(np.float32)
B_IN = _r.randn(4, 1).astype(np.float32)
F_SH = (0.3 * _r.randn(3, 3, 4, 4)).astype(np.float32)
F_OUT = _r.randn(3, 3, 4).astype(np.float32)  # 3x3x4x1: MATLAB drops the trailing singleton
B_OUT = np.float32(0.25)  # a 1x1 bias
X_IN = _r.randn(6, 6, 2, 2).astype(np.float32)
TARGET = _r.randn(6, 6, 1, 2).astype(np.float32)


def real_like_struct() -> dict[str, Any]:
    """conv_in > rec1 (shared) > relu > rec2 (shared) > out (scalar bias) > custom L1 loss,
    with what real files hold: uint8 block values, cuDNN opts, 1x1 biases."""
    u8 = np.uint8
    conv = lambda size, pad, opts: {  # noqa: E731
        "size": np.array([size], u8),
        "hasBias": u8(1),
        "opts": opts,
        "pad": np.array([[pad] * 4], u8),
        "stride": np.array([[1, 1]], u8),
        "dilate": np.array([[1, 1]], u8),
    }
    layers = [
        ("conv_in", "dagnn.Conv", ["input"], ["h0"], ["in_f", "in_b"], conv([3, 3, 2, 4], 1, ["cuDNN"])),
        (
            "rec1",
            "dagnn.Conv",
            ["h0"],
            ["h1"],
            ["sh_f", "sh_b"],
            conv([3, 3, 4, 4], 1, ["CudnnWorkspaceLimit", 2.0**31]),
        ),
        ("relu1", "dagnn.ReLU", ["h1"], ["h1r"], [], {"useShortCircuit": u8(1), "leak": 0.2, "opts": []}),
        ("rec2", "dagnn.Conv", ["h1r"], ["h2"], ["sh_f", "sh_b"], conv([3, 3, 4, 4], 1, ["NoCuDNN"])),
        ("out", "dagnn.Conv", ["h2"], ["prediction"], ["out_f", "out_b"], conv([3, 3, 4, 1], 1, [])),
        (
            "L1_loss",
            "dagnn.vllab_dag_loss",
            ["prediction", "target"],
            ["objective"],
            [],
            {"lambda": u8(1), "loss_type": "L1", "loss": "softmaxlog", "ignoreAverage": u8(0), "opts": []},
        ),
    ]
    names = ["input", "h0", "h1", "h1r", "h2", "prediction", "target", "objective"]
    return {
        "vars": [{"name": n, "precious": u8(0)} for n in names],
        "params": [
            {"name": "in_f", "value": F_IN, "learningRate": u8(1), "weightDecay": u8(1)},
            {"name": "in_b", "value": B_IN, "learningRate": 0.1, "weightDecay": u8(1)},
            {"name": "sh_f", "value": F_SH, "learningRate": u8(1), "weightDecay": u8(1)},
            {
                "name": "sh_b",
                "value": np.zeros((4, 1), np.float32),
                "learningRate": u8(1),
                "weightDecay": u8(0),
            },
            {"name": "out_f", "value": F_OUT, "learningRate": u8(1), "weightDecay": u8(1)},
            {"name": "out_b", "value": np.array([[B_OUT]]), "learningRate": u8(1), "weightDecay": u8(1)},
        ],
        "layers": [
            {"name": n, "type": t, "inputs": i, "outputs": o, "params": p, "block": b}
            for n, t, i, o, p, b in layers
        ],
        "meta": {"trained": u8(1)},
    }


def _write_v5(path: Path, where: str) -> None:
    s = real_like_struct()
    fields = {k: struct_array_v5(v) for k, v in s.items() if k != "meta"} | {"meta": s["meta"]}
    scipy.io.savemat(path, {"net": fields} if where == "net" else fields, oned_as="row")


@pytest.mark.parametrize("where", ["net", "top-level"])
def test_a_v5_dagnn_file_loads_with_real_file_traits(tmp_path, where):
    path = tmp_path / "dag.mat"
    _write_v5(path, where)
    raw = scipy.io.loadmat(path)
    layers = raw["net"]["layers"][0, 0] if where == "net" else raw["layers"]
    assert layers.dtype.names and layers.shape == (1, 6)  # really a struct array
    net = load_net(path)
    assert isinstance(net, DagNet)
    assert [l.name for l in net.layers] == ["conv_in", "rec1", "relu1", "rec2", "out", "L1_loss"]
    assert [p.name for p in net.params] == ["in_f", "in_b", "sh_f", "sh_b", "out_f", "out_b"]
    assert net.param("sh_f").fanout == 2
    conv = net.layer("rec1").block
    assert conv["has_bias"] is True and conv["pad"].dtype == np.float64
    np.testing.assert_array_equal(conv["size"], [3, 3, 4, 4])
    assert net.layer("relu1").block["leak"] == 0.2
    assert net.param("out_f").value.shape == (3, 3, 4, 1)  # restored from the block's size
    out_b = net.param("out_b").value
    assert out_b.shape == (1, 1) and out_b.dtype == np.float32 and out_b[0, 0] == B_OUT
    assert net.param("in_b").learning_rate == 0.1 and net.param("sh_b").weight_decay == 0.0
    assert net.meta == {"trained": 1.0}
    assert any("dagnn.vllab_dag_loss" in n and "L1_loss" in n for n in net.notes)
    assert net.layer("L1_loss").block["loss_type"] == "L1"
    # the custom layer: eval raises naming it once it runs (its target given) ...
    with pytest.raises(McnError, match=r"layer 6 'L1_loss' \(dagnn\.vllab_dag_loss\).*remove_layer"):
        net.eval({"input": X_IN, "target": TARGET})
    # ... a Loss-like layer without its second input is skipped, as in MatConvNet
    net.reset()
    net.eval({"input": X_IN})
    assert net.var("objective").value is None and net.var("prediction").value.shape == (6, 6, 1, 2)
    # cut it off: the target and objective vars go too
    net.remove_layer("L1_loss")
    assert net.get_outputs() == ["prediction"] and "target" not in [v.name for v in net.vars]
    seed = np.random.RandomState(1).randn(6, 6, 1, 2).astype(np.float32)
    net.eval({"input": X_IN}, {"prediction": seed})
    _check_shared_param_derivative(net, seed)


def _check_shared_param_derivative(net: DagNet, seed: np.ndarray) -> None:
    """The shared params' derivatives are the sums of rec1's and rec2's own ones."""
    from harness.mcn import vl_nnconv, vl_nnrelu

    f, b = net.param("sh_f").value, net.param("sh_b").value
    h0, h1r = net.var("h0").value, net.var("h1r").value
    _, df2, db2 = vl_nnconv(h1r, f, b, net.var("h2").der, pad=1)
    d1 = vl_nnrelu(net.var("h1").value, net.var("h1r").der, leak=0.2)
    _, df1, db1 = vl_nnconv(h0, f, b, d1, pad=1)
    np.testing.assert_allclose(net.param("sh_f").der, df1 + df2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.ravel(net.param("sh_b").der), np.ravel(db1 + db2), rtol=1e-6, atol=1e-6)
    assert net.var("prediction").der is seed


@pytest.mark.parametrize("where", ["net", None])
def test_save_net_round_trip_v5_and_v73(tmp_path, where):
    v5 = tmp_path / "dag.mat"
    _write_v5(v5, "net")
    net = load_net(v5)
    for version in ("7", "7.3"):
        path = tmp_path / f"out{version}.mat"
        save_net(net, path, version=version, variable=where)
        if version == "7.3":
            with h5py.File(path, "r") as f:  # struct arrays, as MATLAB writes them
                assert isinstance(f["net/layers" if where else "layers"], h5py.Group)
        back = load_net(path)
        assert [l.name for l in back.layers] == [l.name for l in net.layers]
        assert [v.name for v in back.vars] == [v.name for v in net.vars]
        for a, b in zip(net.params, back.params, strict=True):
            assert (a.name, a.learning_rate, a.weight_decay, a.train_method) == (
                b.name,
                b.learning_rate,
                b.weight_decay,
                b.train_method,
            )
            assert a.value.dtype == b.value.dtype and a.value.shape == b.value.shape
            np.testing.assert_array_equal(a.value, b.value)
        for a, b in zip(net.layers, back.layers, strict=True):
            assert a.type == b.type and a.block.keys() == b.block.keys()
        assert back.layer("L1_loss").block.keys() == net.layer("L1_loss").block.keys()
        assert back.meta == {"trained": 1.0}
        for n in (net, back):
            n.remove_layer("L1_loss") if "L1_loss" in [l.name for l in n.layers] else None
        net.reset()
        back.eval({"input": X_IN})
        net.eval({"input": X_IN})
        np.testing.assert_array_equal(back.var("prediction").value, net.var("prediction").value)
        net = load_net(v5)


def test_saved_struct_is_what_loadobj_reads(tmp_path):
    """saveobj's layout: 1xN struct arrays, block names in MATLAB's camelCase, cells."""
    net = DagNet.from_simplenn(small_bnorm_simplenn())
    path = tmp_path / "d.mat"
    save_net(path, net)
    s = scipy.io.loadmat(path)["net"][0, 0]
    assert set(s.dtype.names) == {"vars", "params", "layers", "meta"}
    layers = s["layers"]
    assert layers.shape == (1, 8) and set(layers.dtype.names) == {
        "name",
        "type",
        "inputs",
        "outputs",
        "params",
        "block",
    }
    conv = layers[0, 0]
    assert conv["type"][0] == "dagnn.Conv" and conv["inputs"].dtype == object
    assert {"size", "hasBias", "pad", "stride", "dilate", "opts"} <= set(conv["block"][0, 0].dtype.names)
    assert set(s["params"].dtype.names) == {"name", "value", "learningRate", "weightDecay"}


def test_load_checkpoint_of_cnn_train_dag(tmp_path):
    path = tmp_path / "net-epoch-1.mat"
    s = real_like_struct()
    net = {k: struct_array_v5(v) for k, v in s.items() if k != "meta"} | {"meta": {}}
    scipy.io.savemat(path, {"net": net, "state": {"solverState": np.zeros((1, 0))}, "stats": {"train": 1.0}})
    cp = load_checkpoint(path)
    assert isinstance(cp.net, DagNet) and cp.stats == {"train": 1.0}


def test_require_simplenn():
    dag = DagNet.from_simplenn(small_bnorm_simplenn())
    with pytest.raises(DagNNNotSupported, match="mcn-harness port does not support DagNN networks yet") as e:
        require_simplenn(dag, "mcn-harness port")
    assert "simplenn networks only" in str(e.value) and isinstance(e.value, McnError)
    net = seed_net()
    assert require_simplenn(net, "x") is net


# --------------------------------------------------------------------------- v5 and v7.3


def dagnn_struct() -> dict[str, list[dict[str, Any]]]:
    """A dagnn.DagNN saveobj struct: conv (data -> x1, params f1 b1) > relu (x1 -> prediction)."""
    return {
        "vars": [{"name": n, "precious": False} for n in ("data", "x1", "prediction")],
        "params": [
            {"name": "f1", "value": F1[:, :, :1, :], "learningRate": 1.0, "weightDecay": 1.0},
            {"name": "b1", "value": B1, "learningRate": 2.0, "weightDecay": 0.0},
        ],
        "layers": [
            {
                "name": "conv1",
                "type": "dagnn.Conv",
                "inputs": ["data"],
                "outputs": ["x1"],
                "params": ["f1", "b1"],
                "block": {
                    "size": np.array([[3, 3, 1, 3]], np.uint8),
                    "hasBias": True,
                    "pad": np.zeros((1, 4)),
                },
            },
            {
                "name": "relu1",
                "type": "dagnn.ReLU",
                "inputs": ["x1"],
                "outputs": ["prediction"],
                "params": [],
                "block": {"leak": 0.0},
            },
        ],
    }


def _struct_arrays_v73(path: Path, at: str) -> None:
    """Turn the cells of structs vars/params/layers under ``at`` into HDF5 struct arrays
    (a group whose fields are classless datasets of references), as MATLAB writes them."""
    with h5py.File(path, "a") as f:
        parent = f[at]
        for name in ("vars", "params", "layers"):
            structs = [f[r] for r in parent[name][()].ravel()]
            keys = [b"".join(n.tolist()).decode() for n in structs[0].attrs["MATLAB_fields"]]
            del parent[name]
            g = parent.create_group(name)
            g.attrs["MATLAB_class"] = np.bytes_("struct")
            h5_add_fields(g, *keys)
            for key in keys:
                g.create_dataset(key, data=np.array([[s[key].ref] for s in structs], dtype=h5py.ref_dtype))


DAGNN_MESSAGE = (
    "{path}: this file holds a MatConvNet DagNN network (dagnn.DagNN: vars, params, layers; "
    "{what}); mcn-harness reads simplenn networks only so far (DagNN support is planned)"
)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("where", ["net-variable", "top-level"])
def test_dagnn_file_loads_as_a_dagnet(tmp_path, version, where):
    dag = dagnn_struct()
    path = tmp_path / "dag.mat"
    if version == "7":
        fields = {k: struct_array_v5(v) for k, v in dag.items()} | {"meta": {"trained": 0.0}}
        scipy.io.savemat(path, {"net": fields} if where == "net-variable" else fields, oned_as="row")
    else:
        write_hdf5(path, {"net": dag | {"meta": {}}} if where == "net-variable" else dag | {"meta": {}})
        _struct_arrays_v73(path, "net" if where == "net-variable" else "/")
        with h5py.File(path, "r") as f:  # really struct arrays
            assert isinstance(f["net/layers" if where == "net-variable" else "layers"], h5py.Group)
    for net in (load_net(path), load_checkpoint(path).net):
        assert isinstance(net, DagNet)
        assert (len(net.vars), len(net.params), len(net.layers)) == (3, 2, 2)
        assert [l.type for l in net.layers] == ["dagnn.Conv", "dagnn.ReLU"]
        net.eval({"data": X[:, :, :1]})
        assert net.var("prediction").value.shape == (4, 4, 3, 2)
        with pytest.raises(DagNNNotSupported, match="does not support DagNN networks yet") as e:
            require_simplenn(net, "this command")
        assert isinstance(e.value, McnError) and "simplenn networks only" in str(e.value)


@pytest.mark.parametrize("version", VERSIONS)
def test_dagnn_object_saved_as_such_is_refused(tmp_path, version):
    path = tmp_path / "dagobj.mat"
    if version == "7":
        path.write_bytes(v5(v5_mcos(b"dagnn.DagNN", b"net")))
    else:
        write_hdf5(path, {"other": 1.0})
        with h5py.File(path, "a") as f:
            h5_mcos(f["/"], "net", "dagnn.DagNN", field=False)
    with pytest.raises(DagNNNotSupported) as e:
        load_net(path)
    assert str(e.value) == DAGNN_MESSAGE.format(path=path, what="saved as a MATLAB dagnn.DagNN object")
