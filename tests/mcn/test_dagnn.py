"""harness.mcn.dagnn: MatConvNet's DagNN wrapper, checked against MatConvNet's own evals.

Family ``dagnn`` of fixtures/golden_dagnn (one ``net.eval`` each, made by MatConvNet
1e5ae7b7's dagnn package on the CPU): every var value and derivative, every param
derivative, the execution order, the Loss layers' running averages, and the cases whose
backward pass fails in MatConvNet (BatchNorm in mode test) as a forward-only eval plus an
McnError. Then ``DagNet.from_simplenn`` against ``vl_simplenn``, and the eval semantics
(fan-out, Crop/Concat, BatchNorm and DropOut modes, Loss layers, shared params, gradient
checks of the other blocks). DagNN files: test_dagnn_files.py.

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

import numpy as np
import pytest

from harness.mcn import (
    McnError,
    Net,
    seed_net,
    vl_simplenn,
    vl_simplenn_tidy,
)
from harness.mcn.dagnn import DagLayer, DagNet, Param, Var
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


def small_bnorm_simplenn() -> Net:
    """conv (no bias) > bnorm > relu > lrn > dropout > avg pool > conv > softmaxloss, single."""
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
    net = seed_net(seed=0) if which == "seed" else small_bnorm_simplenn()
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
    dag = DagNet.from_simplenn(small_bnorm_simplenn())
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
    dag = DagNet.from_simplenn(small_bnorm_simplenn())
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
