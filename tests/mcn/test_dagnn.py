"""harness.mcn.dagnn: MatConvNet's DagNN wrapper, checked against MatConvNet's own evals.

Family ``dagnn`` of fixtures/golden_dagnn (one ``net.eval`` each, made by MatConvNet
1e5ae7b7's dagnn package on the CPU): every var value and derivative, every param
derivative, the execution order, the Loss layers' running averages, and the cases whose
backward pass fails in MatConvNet (BatchNorm in mode test) as a forward-only eval plus an
McnError. Then ``DagNet.from_simplenn`` against ``vl_simplenn``, and loading files built
here with the traits real DagNN files have (uint8 block values, 1x1 biases, cuDNN options,
shared params, custom layers, v5 and v7.3 struct arrays).

Tolerances (normwise: ``max|got - want| / scale``, scale = ``max|want|``):

- single: 2e-5. The cases are float32 and carry MatConvNet's float32 rounding in its own
  summation order (BLAS conv products, MATLAB sums), which the reference does not
  reproduce; measured worst 3.3e-6 (a forward value after 14 layers with three BatchNorms,
  dag_fromsimplenn_bnorm_normal), 1.7e-6 for a var derivative, 1.5e-6 for a filter
  derivative; 2e-5 is the figure of the simplenn whole-network family (tests/mcn/
  test_golden.py) and well inside the README's ~1e-4.
- a bias derivative (Conv/ConvTranspose/BatchNorm/Scale bias) is a sum of the layer's
  output derivative over H, W and N. Where the network makes it cancel to ~0 in exact
  arithmetic (a bias followed, through max pooling and a bias-free conv, by a BatchNorm,
  which removes any per-channel shift: bn_conv1b, conv3b ... of
  dag_fromsimplenn_bnorm_normal, 1e-9 against terms of 1e-1) both sides hold rounding
  noise of that sum; its scale is then the largest per-channel sum of |dzdy| (the size of
  the terms), not its own size. Measured worst against that scale: 1.4e-6.
- double: 1e-10 (float64 rounding only; no public double case of this family).
- execution order, names, train methods: exact. ``from_simplenn`` against ``vl_simplenn``:
  exact (0) for every value and derivative: both run the same kernels in the same order
  on the same arrays. The one exception is the loss value itself, vl_nnsoftmaxloss in one
  and vl_nnloss('softmaxlog') in the other, which add the H*W*N per-location losses in
  different orders: 1e-6 (float32 rounding of that sum; measured 1 ulp on a 2x2x3 map,
  bit-identical on 1x1 maps). Its derivative is bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io

from harness.mcn import (
    McnError,
    Net,
    load_checkpoint,
    load_net,
    save_net,
    seed_net,
    vl_simplenn,
    vl_simplenn_tidy,
)
from harness.mcn.dagnn import DagLayer, DagNet, Param, Var
from harness.mcn.matfile import DagNNNotSupported, require_simplenn
from harness.mcn.net import Layer, python_field

from ..golden_dagnn import case as _case
from ..golden_dagnn import manifest as _manifest
from ..golden_dagnn import net as _net
from ..gradcheck import numeric_grad

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden_dagnn"
TOL = {"single": 2e-5, "double": 1e-10}


# --------------------------------------------------------------------------- golden cases


def _eval_args(case: dict[str, Any]) -> tuple[dict, dict]:
    inputs = {k: case["inputs"][k] for k in case["input_names"]}
    ders = {k: case["derOutputs"][k] for k in case["derOutput_names"]}
    return inputs, ders


def _err(got: Any, want: Any, scale: float = 0.0) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.size == want.size, f"{got.shape} vs golden {want.shape}"
    if want.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(want))), scale, 1e-30)
    return float(np.max(np.abs(got.reshape(want.shape) - want))) / scale


def _empty(a: Any) -> bool:
    return a is None or np.size(a) == 0


def _bias_scale(net: DagNet, param: str, outputs: dict[str, Any]) -> float:
    """For a bias param (Conv/ConvTranspose/BatchNorm ``params[1]``, a Scale's last param
    with has_bias): the largest per-channel sum of |dzdy| over the layers using it."""
    scale = 0.0
    for layer in net.layers:
        if layer.type in ("dagnn.Conv", "dagnn.ConvTranspose", "dagnn.BatchNorm"):
            is_bias = len(layer.params) > 1 and layer.params[1] == param
        elif layer.type == "dagnn.Scale":
            is_bias = bool(layer.block.get("has_bias")) and layer.params[-1:] == [param]
        else:
            is_bias = False
        if not is_bias:
            continue
        d = np.abs(
            np.asarray(outputs["var_der"][outputs["var_names"].index(layer.outputs[0])], dtype=np.float64)
        )
        d = d.reshape(d.shape + (1,) * (4 - d.ndim))
        scale = max(scale, float(d.sum(axis=(0, 1, 3)).max()))
    return scale


DAG_CASES = [c["name"] for c in _manifest() if c["family"] == "dagnn"]


def test_the_manifest_lists_the_cases():
    assert len(DAG_CASES) == 14
    assert {c["family"] for c in _manifest()} == {"dagnn", "dagnn_train"}
    for name in DAG_CASES:
        assert (GOLDEN / f"{name}.mat").is_file()


@pytest.mark.parametrize("name", DAG_CASES)
def test_golden_structure(name):
    """Vars, params and layers in MatConvNet's order, train methods (BatchNorm's moments:
    average), learning rates and weight decays, execution order."""
    case = _case(name)
    net = _net(case)
    out = case["outputs"]
    assert [v.name for v in net.vars] == out["var_names"]
    assert [p.name for p in net.params] == out["param_names"]
    assert [l.name for l in net.layers] == out["layer_names"]
    assert [p.train_method for p in net.params] == case["param_trainMethod"]
    assert [i + 1 for i in net.execution_order()] == np.ravel(out["execution_order"]).astype(int).tolist()
    for p, saved in zip(net.params, case["net"]["params"], strict=True):
        assert p.name == saved["name"]
        assert (p.learning_rate, p.weight_decay) == (saved["learningRate"], saved["weightDecay"])
        np.testing.assert_array_equal(np.ravel(p.value), np.ravel(saved["value"]))
    for layer, saved in zip(net.layers, case["net"]["layers"], strict=True):
        assert layer.type == saved["type"]
        assert (layer.inputs, layer.outputs, layer.params) == (
            saved["inputs"],
            saved["outputs"],
            saved["params"],
        )


@pytest.mark.parametrize("name", DAG_CASES)
def test_golden_eval(name):
    case = _case(name)
    tol = TOL[case["precision"]]
    out = case["outputs"]
    net = _net(case)
    inputs, ders = _eval_args(case)
    mode = case["opts"]["mode"]
    if case["backward_error"]:
        # MatConvNet's backward pass failed; the golden holds a forward-only eval
        assert "MOMENTS" in case["backward_error"]
        with pytest.raises(McnError, match=r"\(dagnn\.BatchNorm\).*mode 'test'") as e:
            net.eval(inputs, ders, mode=mode)
        bn = [l.name for l in net.layers if l.type == "dagnn.BatchNorm"]
        assert any(f"'{b}' (dagnn.BatchNorm)" in str(e.value) for b in bn)
        assert all(_empty(d) for d in out["var_der"])
        net = _net(case)
        net.eval(inputs, mode=mode)
    else:
        net.eval(inputs, ders, mode=mode)
    for var, want, want_der in zip(net.vars, out["var_value"], out["var_der"], strict=True):
        assert _err(var.value, want) <= tol, f"{var.name}: value error {_err(var.value, want):.3g}"
        if _empty(want_der):
            assert _empty(var.der), f"{var.name}: MatConvNet computed no derivative"
        else:
            err = _err(var.der, want_der)
            assert err <= tol, f"{var.name}: derivative error {err:.3g}"
    for p, want in zip(net.params, out["param_der"], strict=True):
        if _empty(want):
            assert _empty(p.der), p.name
            continue
        err = _err(p.der, want, _bias_scale(net, p.name, out))
        assert err <= tol, f"param {p.name}: derivative error {err:.3g}"
    averages = net.loss_averages()
    assert set(averages) == set(out["loss_average"])
    for key, want in out["loss_average"].items():
        assert _err(averages[key], want) <= tol, key


def test_from_simplenn_matches_the_golden_conversion():
    """fromSimpleNN's blocks, param values and multipliers, as MatConvNet saved them."""
    for name in [n for n in DAG_CASES if n.startswith("dag_fromsimplenn")]:
        case = _case(name)
        net = _net(case)
        for layer, saved in zip(net.layers, case["net"]["layers"], strict=True):
            for key, value in saved["block"].items():
                mine = layer.block[python_field(key)]
                if isinstance(value, list | str):
                    assert mine == value, (layer.name, key)
                elif _empty(value):
                    assert _empty(mine), (layer.name, key)
                else:
                    np.testing.assert_array_equal(np.ravel(mine).astype(float), np.ravel(value).astype(float))
        assert {l.block["epsilon"] for l in net.layers if l.type == "dagnn.BatchNorm"} <= {1e-5}
        for p in net.params:
            if p.train_method == "average":
                assert p.name.endswith("x") and p.learning_rate == 0.1


# --------------------------------------------------------------------------- from_simplenn


def _small_bnorm_simplenn() -> Net:
    r = np.random.RandomState(3)
    f32 = np.float32
    return Net(
        [
            Layer("conv", "c1", [(0.3 * r.randn(3, 3, 2, 4)).astype(f32), np.zeros((0, 0), f32)], pad=1.0),
            Layer(
                "bnorm",
                "bn1",
                [
                    (1 + 0.1 * r.randn(4, 1)).astype(f32),
                    (0.1 * r.randn(4, 1)).astype(f32),
                    np.stack([r.randn(4), 1 + r.rand(4)], axis=1).astype(f32),
                ],
            ),
            Layer("relu", "r1", leak=0.1),
            Layer("normalize", "lrn1", param=np.array([3.0, 1.0, 0.01, 0.75])),
            Layer("dropout", "d1", rate=0.3),
            Layer("pool", "p1", method="avg", pool=np.array([2.0, 2.0]), stride=2.0),
            Layer("conv", "c2", [(0.3 * r.randn(3, 3, 4, 3)).astype(f32), (0.1 * r.randn(1, 3)).astype(f32)]),
            Layer("softmaxloss", "loss"),
        ]
    )


@pytest.mark.parametrize("which", ["seed", "bnorm"])
def test_from_simplenn_equals_vl_simplenn(which):
    net = seed_net(seed=0) if which == "seed" else _small_bnorm_simplenn()
    dag = DagNet.from_simplenn(net)
    r = np.random.RandomState(11)
    x = (
        r.randn(28, 28, 1, 3).astype(np.float32)
        if which == "seed"
        else r.randn(8, 8, 2, 3).astype(np.float32)
    )
    labels = np.array([[1.0, 2.0, 1.0]]) if which == "seed" else np.array([[1.0, 3.0, 2.0]])
    n = len(net.layers)
    masks = {}
    if which == "bnorm":
        mask = (r.rand(8, 8, 4, 3) >= 0.3).astype(np.float32) * np.float32(1 / 0.7)
        masks = {"d1": mask}
    net = vl_simplenn_tidy(net)
    res = vl_simplenn(net, x, 1.0, labels, masks={4: masks["d1"]} if masks else None)
    dag.eval({"x0": x, "label": labels}, {f"x{n}": 1.0}, masks=masks)
    assert [v.name for v in dag.vars] == [f"x{i}" for i in range(n)] + ["label", f"x{n}"]
    for i in range(n + 1):
        var = dag.var(f"x{i}")
        if i < n:
            np.testing.assert_array_equal(np.asarray(var.value).reshape(np.shape(res[i].x)), res[i].x)
        else:  # the loss: one sum of H*W*N terms, added in another order (see the docstring)
            np.testing.assert_allclose(np.ravel(var.value), np.ravel(res[i].x), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(var.der).reshape(np.shape(res[i].dzdx)), res[i].dzdx)
    for i, layer in enumerate(net.layers):
        names = dag.layer(layer.name).params
        assert len(names) == len([w for w in res[i].dzdw if not _empty(w)])
        for pname, want in zip(names, res[i].dzdw, strict=False):
            np.testing.assert_array_equal(np.ravel(dag.param(pname).der), np.ravel(want))
    # test mode: forward only (DagNN's BatchNorm backward fails there)
    res_t = vl_simplenn(net, x, None, labels, mode="test")
    dag.reset()
    dag.eval({"x0": x, "label": labels}, mode="test")
    for i in range(n + 1):
        np.testing.assert_array_equal(
            np.asarray(dag.var(f"x{i}").value).reshape(np.shape(res_t[i].x)), res_t[i].x
        )


def test_from_simplenn_names_params_and_multipliers():
    dag = DagNet.from_simplenn(_small_bnorm_simplenn())
    assert [p.name for p in dag.params] == ["c1f", "bn1m", "bn1b", "bn1x", "c2f", "c2b"]
    c1 = dag.layer("c1")
    assert c1.params == ["c1f"] and c1.block["has_bias"] is False
    assert dag.param("bn1x").train_method == "average" and dag.param("bn1x").learning_rate == 0.1
    assert dag.layer("bn1").block["epsilon"] == 1e-5
    assert dag.layer("loss").inputs == ["x7", "label"] and dag.layer("loss").block["loss"] == "softmaxlog"
    np.testing.assert_array_equal(dag.layer("p1").block["pool_size"], [2.0, 2.0])
    np.testing.assert_array_equal(dag.layer("c1").block["pad"], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(McnError, match="loss is unsupported"):
        DagNet.from_simplenn(Net([Layer("loss", "l")]))


# --------------------------------------------------------------------------- files


def _struct_array(items: list[dict[str, Any]]) -> np.ndarray:
    keys = list(items[0])
    out = np.empty((1, len(items)), dtype=[(k, object) for k in keys])
    for i, item in enumerate(items):
        for k in keys:
            out[0, i][k] = _cellify(item[k])
    return out


def _cellify(v: Any) -> Any:
    if isinstance(v, list):
        cell = np.empty((1, len(v)) if v else (0, 0), dtype=object)
        for i, x in enumerate(v):
            cell[0, i] = _cellify(x)
        return cell
    if isinstance(v, dict):
        return {k: _cellify(x) for k, x in v.items()}
    return v


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
    fields = {k: _struct_array(v) for k, v in s.items() if k != "meta"} | {"meta": s["meta"]}
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
    net = DagNet.from_simplenn(_small_bnorm_simplenn())
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
    net = {k: _struct_array(v) for k, v in s.items() if k != "meta"} | {"meta": {}}
    scipy.io.savemat(path, {"net": net, "state": {"solverState": np.zeros((1, 0))}, "stats": {"train": 1.0}})
    cp = load_checkpoint(path)
    assert isinstance(cp.net, DagNet) and cp.stats == {"train": 1.0}


def test_require_simplenn():
    dag = DagNet.from_simplenn(_small_bnorm_simplenn())
    with pytest.raises(DagNNNotSupported, match="mcn-harness port does not support DagNN networks yet") as e:
        require_simplenn(dag, "mcn-harness port")
    assert "simplenn networks only" in str(e.value) and isinstance(e.value, McnError)
    net = seed_net()
    assert require_simplenn(net, "x") is net


# --------------------------------------------------------------------------- eval semantics


def _net_fanout() -> DagNet:
    """x is read twice by one Sum and once by a Concat; a Crop's size input."""
    layers = [
        DagLayer("sum", "dagnn.Sum", ["x", "x"], ["s"], []),
        DagLayer("cat", "dagnn.Concat", ["s", "x"], ["c"], [], {"dim": 3}),
        DagLayer("crop", "dagnn.Crop", ["c", "small"], ["y"], [], {"crop": [1, 0]}),
    ]
    return DagNet(layers)


def test_fanout_crop_and_concat():
    net = _net_fanout()
    x = np.arange(2 * 5 * 4 * 1, dtype=np.float64).reshape(5, 4, 2, 1)
    small = np.zeros((3, 3))
    d = np.random.RandomState(0).randn(3, 3, 4, 1)
    net.eval({"x": x, "small": small}, {"y": d})
    # crop [1 0]: top = min(1, 5 - 3) = 1, bottom 1; left = min(0, 1) = 0, right 1
    np.testing.assert_array_equal(net.var("y").value, np.concatenate([2 * x, x], axis=2)[1:4, 0:3])
    dc = np.zeros((5, 4, 4, 1))
    dc[1:4, 0:3] = d
    # backward in reverse order: the Concat's part first, then the Sum's two
    np.testing.assert_array_equal(net.var("x").der, (dc[:, :, 2:] + dc[:, :, :2]) + dc[:, :, :2])
    assert net.var("small").der is None
    with pytest.raises(McnError, match=r"layer 3 'crop' \(dagnn\.Crop\).*at least as large"):
        net.eval({"small": np.zeros((7, 3))})


def test_batchnorm_test_mode_and_dropout():
    r = np.random.RandomState(2)
    g, b = np.ones((3, 1)), np.zeros((3, 1))
    m = np.stack([r.randn(3), 1 + r.rand(3)], axis=1)
    layers = [
        DagLayer("bn", "dagnn.BatchNorm", ["x"], ["b"], ["g", "bb", "m"]),
        DagLayer("drop", "dagnn.DropOut", ["b"], ["y"], [], {"rate": 0.5}),
    ]
    net = DagNet(layers, params=[Param("g", g), Param("bb", b), Param("m", m, learning_rate=0.1)])
    assert net.param("m").train_method == "average"
    x = r.randn(4, 4, 3, 2)
    net.eval({"x": x}, mode="test")
    want = (x - m[:, 0].reshape(1, 1, 3, 1)) / m[:, 1].reshape(1, 1, 3, 1)
    np.testing.assert_allclose(net.var("y").value, want, rtol=1e-12)
    with pytest.raises(McnError, match=r"layer 1 'bn' \(dagnn\.BatchNorm\).*mode 'test'"):
        net.eval({"x": x}, {"y": np.ones_like(x)}, mode="test")
    assert net.var("b").der is not None  # DropOut in test mode passed the derivative through
    np.testing.assert_array_equal(net.var("b").der, np.ones_like(x))
    # mode normal: the mask comes from rng (reproducible) or masks[name]
    outs = []
    for _ in range(2):
        net.reset()
        net.eval({"x": x}, {"y": np.ones_like(x)}, rng=np.random.default_rng(4))
        outs.append(net.var("y").value)
        mask = net.layer("drop").state["mask"]
        assert set(np.unique(mask)) <= {0.0, 2.0}
        np.testing.assert_array_equal(net.var("b").der, mask)
        assert net.param("m").der.shape == (3, 2)  # the batch moments
    np.testing.assert_array_equal(outs[0], outs[1])
    given = np.full(x.shape, 2.0)
    net.eval({"x": x}, masks={"drop": given})
    np.testing.assert_array_equal(net.var("y").value, 2.0 * net.var("b").value)


def test_eval_errors_and_order():
    net = _net_fanout()
    with pytest.raises(McnError, match="No variable of name 'nope'"):
        net.eval({"nope": 1.0})
    with pytest.raises(McnError, match="Expected mode"):
        net.eval({"x": np.zeros((2, 2))}, mode="train-ish")
    with pytest.raises(McnError, match="already a layer"):
        net.add_layer("sum", "dagnn.Sum", ["a"], ["b"])
    # a deep chain: no recursion limit in the execution order
    deep = DagNet([DagLayer(f"r{i}", "dagnn.ReLU", [f"v{i}"], [f"v{i + 1}"], []) for i in range(3000)][::-1])
    assert deep.execution_order() == list(range(2999, -1, -1))
    deep.eval({"v0": np.array([[-1.0, 2.0]])}, {"v3000": np.array([[1.0, 1.0]])})
    np.testing.assert_array_equal(deep.var("v0").der.reshape(1, 2), [[0.0, 1.0]])


def test_loss_layers_skip_and_accumulate():
    r = np.random.RandomState(8)
    layers = [
        DagLayer("loss", "dagnn.Loss", ["pred", "label"], ["objective"], [], {"loss": "softmaxlog"}),
        DagLayer("err", "dagnn.Loss", ["pred", "label"], ["top1err"], [], {"loss": "classerror"}),
        DagLayer("l2", "dagnn.Loss", ["pred", "label"], ["o2"], [], {"loss": "L2"}),
    ]
    net = DagNet(layers)
    assert any("'L2'" in n for n in net.notes)
    net.remove_layer("l2")
    pred = r.randn(2, 3, 4, 5).astype(np.float32)
    label = r.randint(1, 5, size=(2, 3, 1, 5)).astype(np.float64)
    net.eval({"pred": pred, "label": label}, {"objective": 1.0})
    assert net.var("label").der is None and net.var("top1err").der is None
    avg = net.loss_averages()
    np.testing.assert_allclose(avg["objective"], float(net.var("objective").value.ravel()[0]) / 6, rtol=1e-6)
    net.eval({"pred": pred, "label": label}, {"objective": 1.0})  # a running mean: unchanged
    np.testing.assert_allclose(net.loss_averages()["objective"], avg["objective"], rtol=1e-6)
    net.reset()
    assert net.loss_averages() == {"objective": 0.0, "top1err": 0.0}
    with pytest.raises(McnError, match=r"'l2' \(dagnn\.Loss\).*'L2'"):
        DagNet(layers).eval({"pred": pred, "label": label})


def test_accumulate_param_ders():
    net = DagNet(
        [DagLayer("s", "dagnn.Scale", ["x"], ["y"], ["w", "b"], {"size": [1, 1, 2]})],
        params=[Param("w", np.array([[[2.0, 3.0]]])), Param("b", np.array([[[0.5, -1.0]]]))],
    )
    x = np.ones((2, 2, 2, 1))
    net.eval({"x": x}, {"y": np.ones_like(x)})
    np.testing.assert_array_equal(net.param("w").der, [[[4.0, 4.0]]])
    net.accumulate_param_ders = True
    net.eval({"x": x}, {"y": np.ones_like(x)})
    np.testing.assert_array_equal(net.param("w").der, [[[8.0, 8.0]]])
    w4, b4 = np.reshape([2.0, 3.0], (1, 1, 2, 1)), np.reshape([0.5, -1.0], (1, 1, 2, 1))
    np.testing.assert_array_equal(net.var("y").value, x * w4 + b4)


@pytest.mark.parametrize(
    "block_type, block, extra",
    [
        ("dagnn.NormOffset", {"param": [0.7, 0.6]}, 0),
        ("dagnn.SpatialNorm", {"param": [3, 2, 0.5, 0.75]}, 0),
        ("dagnn.PDist", {"p": 2, "aggregate": True}, 1),
        ("dagnn.PDist", {"p": 1.5, "no_root": True, "aggregate": True}, 1),
        ("dagnn.Scale", {"has_bias": False}, 1),
        (
            "dagnn.ConvTranspose",
            {"upsample": 2, "crop": [1, 0, 0, 1], "num_groups": 2, "size": [3, 3, 2, 4]},
            0,
        ),
    ],
)
def test_other_blocks_gradcheck(block_type, block, extra):
    """The blocks no golden case covers, against central differences (float64)."""
    r = np.random.RandomState(9)
    x = r.randn(4, 5, 4, 2)
    inputs = ["x"] + (["x0"] if extra else [])
    params = []
    values = {"x": x}
    if extra:
        values["x0"] = r.randn(4, 5, 4, 2) if block_type != "dagnn.Scale" else r.randn(1, 1, 4, 1)
    plist = []
    if block_type == "dagnn.ConvTranspose":
        params = ["f", "b"]
        plist = [Param("f", r.randn(3, 3, 2, 4)), Param("b", r.randn(4, 1))]
    net = DagNet([DagLayer("l", block_type, inputs, ["y"], params, block)], params=plist)
    net.eval(values)
    proj = r.randn(*np.shape(net.var("y").value))
    net.eval(values, {"y": proj})

    def objective(_):
        net2 = DagNet([DagLayer("l", block_type, inputs, ["y"], params, block)], params=plist)
        net2.eval(values)
        return float(np.sum(net2.var("y").value * proj))

    for name in inputs:
        want = numeric_grad(objective, values[name])
        np.testing.assert_allclose(np.reshape(net.var(name).der, want.shape), want, rtol=1e-5, atol=1e-6)
    for p in plist:
        want = numeric_grad(objective, p.value)
        np.testing.assert_allclose(np.reshape(net.param(p.name).der, want.shape), want, rtol=1e-5, atol=1e-6)


def test_copy_and_remove_layer():
    dag = DagNet.from_simplenn(_small_bnorm_simplenn())
    dag.eval({"x0": np.ones((8, 8, 2, 1), np.float32)})
    twin = dag.copy()
    assert all(v.value is None for v in twin.vars) and twin.param("c1f").value is not dag.param("c1f").value
    np.testing.assert_array_equal(twin.param("c1f").value, dag.param("c1f").value)
    twin.remove_layer(["loss", "c2"])
    assert [p.name for p in twin.params] == ["c1f", "bn1m", "bn1b", "bn1x"]
    assert twin.get_outputs() == ["x6"] and len(dag.layers) == 8
    assert isinstance(twin.var("x0"), Var)
    with pytest.raises(McnError, match="No layer of name 'c2'"):
        twin.layer("c2")
