"""harness.mcn.matfile: .mat v5/v7 and v7.3 nets, checkpoints, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from harness.mcn import McnError, load_checkpoint, load_net, save_net, seed_net, vl_simplenn_tidy
from harness.mcn.net import Layer, Net

from ..golden import GOLDEN


@pytest.fixture(scope="module")
def nets() -> dict[str, Net]:
    return {"seed": seed_net(seed=3), "seed_bnorm": seed_net(seed=4, batch_normalization=True)}


@pytest.mark.parametrize("version", ["7", "7.3"])
@pytest.mark.parametrize("which", ["seed", "seed_bnorm"])
def test_round_trip_is_identity(tmp_path, nets, version, which):
    net = nets[which]
    path = tmp_path / f"net-{version}.mat"
    save_net(path, net, version=version)
    back = load_net(path)
    assert back == net
    # and it is still a valid simplenn struct: tidy changes nothing
    assert vl_simplenn_tidy(back) == net


def test_v7_file_is_a_matlab_struct(tmp_path, nets):
    path = tmp_path / "net.mat"
    save_net(path, nets["seed"])
    raw = scipy.io.loadmat(path)
    layers = raw["net"][0, 0]["layers"]
    assert layers.shape == (1, len(nets["seed"].layers))
    first = layers[0, 0][0, 0]
    assert str(first["type"][0]) == "conv"
    assert "learningRate" in first.dtype.names  # MatConvNet's field names come back


def test_v73_has_matlab_header(tmp_path, nets):
    path = tmp_path / "net.mat"
    save_net(path, nets["seed"], version="7.3")
    head = path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file")
    assert head[126:128] == b"IM"


def test_fields_at_top_level(tmp_path, nets):
    path = tmp_path / "top.mat"
    save_net(path, nets["seed"], variable=None)
    assert set(scipy.io.whosmat(path)[i][0] for i in range(2)) == {"layers", "meta"}
    assert load_net(path) == nets["seed"]


def test_golden_net_loads():
    net = load_net(GOLDEN / "simplenn_small_mixed_master.mat")
    assert [l.type for l in net.layers] == [
        "conv", "relu", "lrn", "pool", "conv", "relu", "pool", "dropout", "conv", "loss",
    ]  # fmt: skip
    assert net.layers[1].leak == pytest.approx(0.1)
    assert net.layers[0].weights[0].shape == (3, 3, 3, 8)
    assert net.layers[-1].class_.shape == (1, 3)


def test_checkpoint_exposes_solver_state(tmp_path, nets):
    net = nets["seed"]
    momentum = [np.full((1, 1, 256, 2), 0.5), np.zeros((1, 2))]
    solver_state = np.empty((1, len(net.layers)), dtype=object)
    for i, layer in enumerate(net.layers):
        cell = np.empty((1, len(layer.weights)) if layer.weights else (0, 0), dtype=object)
        for j in range(len(layer.weights)):
            cell[0, j] = momentum[j] if layer.name == "classifier" else 0.0
        solver_state[0, i] = cell
    path = tmp_path / "net-epoch-3.mat"
    save_net(path, net)
    scipy.io.savemat(
        path,
        {
            "net": scipy.io.loadmat(path)["net"],
            "state": {"solverState": solver_state},
            "stats": {"train": {"objective": 0.5}},
        },
    )
    ckpt = load_checkpoint(path)
    assert ckpt.net == net
    k = net.index("classifier")
    np.testing.assert_array_equal(ckpt.solver_state[k][0], momentum[0])
    assert ckpt.stats["train"]["objective"] == 0.5


def test_old_filters_biases_net(tmp_path):
    f = np.ones((3, 3, 1, 2), np.float32)
    raw = {
        "layers": np.array(
            [[{"type": "conv", "filters": f, "biases": np.zeros((1, 2), np.float32)}]], dtype=object
        )
    }
    path = tmp_path / "old.mat"
    scipy.io.savemat(path, raw)
    net = vl_simplenn_tidy(load_net(path))
    assert net.layers[0].weights[0].shape == (3, 3, 1, 2)
    assert not net.layers[0].has("filters")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.parent / "missing.mat", "no such file"),
        (lambda p: p.parent, "a directory"),
        (lambda p: p.write_bytes(b"MATLAB 5.0 MAT-file") and p, "truncated"),
        (lambda p: p.write_bytes((GOLDEN / "conv_basic.mat").read_bytes()[:300]) and p, "readable"),
        (lambda p: p.write_bytes(np.random.RandomState(0).bytes(4096)) and p, "readable"),
        (lambda p: scipy.io.savemat(p, {"weights": np.ones(3)}) or p, "Received variables: weights"),
        (lambda p: scipy.io.savemat(p, {"net": {"meta": 1.0}}) or p, "'layers' field"),
        (
            lambda p: (
                scipy.io.savemat(p, {"net": {"layers": np.array([[{"name": "x"}]], dtype=object)}}) or p
            ),
            "'type'",
        ),
    ],
    ids=["missing", "directory", "truncated", "cut-short", "garbage", "no-net", "no-layers", "no-type"],
)
def test_bad_files_raise_clear_errors(tmp_path, make, message):
    path = make(tmp_path / "bad.mat")
    with pytest.raises(McnError, match=message):
        load_net(path)


def test_save_rejects_non_net(tmp_path):
    with pytest.raises(McnError, match="net"):
        save_net(tmp_path / "x.mat", {"layers": []})  # type: ignore[arg-type]
    with pytest.raises(McnError, match="version"):
        save_net(tmp_path / "x.mat", Net([Layer("relu", "r")]), version="6")
