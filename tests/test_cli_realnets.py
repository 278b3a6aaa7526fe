"""The command line on nets as people publish them: no inputSize, a custom loss layer,
v7.3 files, DagNN files; the user's own images; ``port`` then ``check``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from harness.mcn import Layer, Net, save_net
from tests.test_cli import run


def _denoiser_with_custom_loss() -> Net:
    """Fully convolutional (any size fits), no meta.inputSize, and a custom loss layer
    last, like practical-cnn-reg's text deblurring net."""
    rng = np.random.default_rng(0)
    return Net(
        [
            Layer("conv", "conv1", [rng.standard_normal((3, 3, 3, 4)), rng.standard_normal((1, 4))], pad=1),
            Layer("relu", "relu1"),
            Layer("conv", "prediction", [rng.standard_normal((3, 3, 4, 1)), np.array(0.5)], pad=1),
            Layer("custom", "loss", forward="l2 of the target"),
        ]
    )


@pytest.mark.parametrize("version", ["7", "7.3"])
def test_reference_infers_the_size_and_stops_before_a_custom_layer(tmp_path, version):
    path = tmp_path / "net.mat"
    save_net(path, _denoiser_with_custom_loss(), version=version)
    out = run("reference", "--mcn", str(path), "--batch", "2")
    assert out.returncode == 0, out.stderr
    assert "MatConvNet reference: 3 layers, batch 2" in out.stdout
    inferred = "input size 32 x 32 x 3: inferred from the net (depth 3 from the filters of layer 1 'conv1'"
    assert inferred in out.stdout
    assert "compared up to layer 3 'prediction': layer 4 'loss' is a custom layer" in out.stdout
    given = run("reference", "--mcn", str(path), "--input-size", "9", "7", "3", "--upto", "relu1")
    assert given.returncode == 0, given.stderr
    assert "input size 9 x 7 x 3: --input-size" in given.stdout and "2 layers" in given.stdout


def test_port_then_check_both_ways_and_the_generated_test(tmp_path):
    net_path = tmp_path / "net.mat"
    save_net(net_path, _denoiser_with_custom_loss())
    out = tmp_path / "port"
    made = run("port", "--mcn", str(net_path), "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert {p.name for p in out.iterdir()} >= {"model.keras", "model.py", "weights.npz", "test_port.py"}
    again = run("port", "--mcn", str(net_path), "--out", str(out))
    assert again.returncode == 2 and "overwrite" in again.stderr and len(again.stderr.splitlines()) == 1
    saved = run("check", "--mcn", str(net_path), "--keras", str(out / "model.keras"))
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert (
        "EQUIVALENT" in saved.stdout
        and "input size 32 x 32 x 3: the Keras model's input shape" in saved.stdout
    )
    source = run("check", "--mcn", str(net_path), "--keras", "model:build_model", cwd=out)
    assert source.returncode == 0, source.stdout + source.stderr


def test_check_with_the_users_imdb_and_upto(tmp_path):
    rng = np.random.RandomState(1)
    data = rng.rand(28, 28, 1, 5).astype(np.float32)
    data[3, 3, 0, 0] = np.nan  # a damaged image is skipped, not a crash
    imdb = tmp_path / "imdb.mat"
    scipy.io.savemat(imdb, {"images": {"data": data, "labels": [[1, 2, 1, 2, 2]], "set": [[3, 3, 1, 3, 1]]}})
    out = run("check", "--keras", "seed-fixed", "--images", str(imdb), "--batch", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "probe batch: 3 test/training images of imdb.mat" in out.stdout
    assert "1 images with NaN or Inf in imdb.mat skipped" in out.stdout
    upto = run("check", "--keras", "seed-fixed", "--upto", "pool2", "--batch", "2")
    assert upto.returncode == 0, upto.stdout + upto.stderr
    assert "compared up to layer 4 'pool2' (--upto)" in upto.stdout
    # the question's model diverges at ip1, after pool2: up to pool2 it is equivalent
    question = run("check", "--keras", "seed-question", "--upto", "pool2", "--batch", "2")
    assert question.returncode == 0, question.stdout + question.stderr


def _save_dagnn(path, *, loss: bool = False, second_input: bool = False) -> None:
    """tests/mcn/test_dagnn_files' DagNN file (conv1 > relu1: data -> prediction), with a
    softmaxlog Loss of (prediction, label) -> objective, or a second image input."""
    from tests.mcn.test_dagnn_files import dagnn_struct, struct_array_v5

    s = dagnn_struct()
    extra = []
    if loss:
        extra.append(("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], {"loss": "softmaxlog"}))
    if second_input:
        extra.append(("relu2", "dagnn.ReLU", ["data2"], ["y2"], {"leak": 0.0}))
    for name, kind, inputs, outputs, block in extra:
        s["vars"] += [{"name": v, "precious": False} for v in inputs[1:] + outputs]
        s["layers"].append(
            {"name": name, "type": kind, "inputs": inputs, "outputs": outputs, "params": [], "block": block}
        )
    scipy.io.savemat(path, {"net": {k: struct_array_v5(v) for k, v in s.items()}})


def test_a_dagnn_file_runs_in_reference_port_check_and_diagnose_and_train_parity_says_what_it_needs(tmp_path):
    path = tmp_path / "dag.mat"
    _save_dagnn(path)
    ref = run("reference", "--mcn", str(path), "--batch", "2", "--input-size", "6", "5", "1")
    assert ref.returncode == 0, ref.stderr
    assert "MatConvNet reference (DagNN): 2 layers, 3 vars, 2 params, batch 2" in ref.stdout
    assert "relu1            dagnn.ReLU         prediction     4 x 3 x 3" in ref.stdout
    # diagnose reads the DagNN layers against the Keras layers of their names
    other = run("diagnose", "--keras", "seed-fixed", "--mcn", str(path))
    assert other.returncode == 1, other.stdout + other.stderr
    assert "[filters] conv1 / conv1: MatConvNet 3; Keras 64" in other.stdout
    # train-parity needs a Loss layer: one line, exit 2
    out = run("train-parity", "--keras", "seed-fixed", "--mcn", str(path))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no dagnn.Loss layer" in out.stderr and "dag.mat" in out.stderr
    # port, then check its model.keras var by var, then run the generated test
    port = tmp_path / "port"
    made = run("port", "--mcn", str(path), "--out", str(port))
    assert made.returncode == 0, made.stderr
    assert "model.py (standalone source) is written for simplenn networks only" in made.stdout
    checked = run("check", "--mcn", str(path), "--keras", str(port / "model.keras"), "--batch", "2")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "EQUIVALENT" in checked.stdout and "prediction" in checked.stdout
    diagnosed = run("diagnose", "--mcn", str(path), "--keras", str(port / "model.keras"))
    assert diagnosed.returncode == 0, diagnosed.stdout + diagnosed.stderr
    assert diagnosed.stdout.strip() == "no static differences found"
    import subprocess
    import sys

    guard = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(port / "test_port.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert guard.returncode == 0, guard.stdout[-2000:]


def test_train_parity_on_a_dagnn_file(tmp_path):
    """The imdb into the net's image input, its labels into the Loss: cnn_train_dag's steps
    and the port's agree (exit 0); a net with two image inputs is one line (exit 2)."""
    path = tmp_path / "dag.mat"
    _save_dagnn(path, loss=True)
    port = tmp_path / "port"
    assert run("port", "--mcn", str(path), "--out", str(port)).returncode == 0
    rng = np.random.RandomState(3)
    imdb = tmp_path / "imdb.mat"
    labels = rng.randint(1, 4, size=(1, 10)).astype(float)
    scipy.io.savemat(
        imdb, {"images": {"data": rng.rand(6, 5, 1, 10), "labels": labels, "set": np.ones((1, 10))}}
    )
    model = str(port / "model.keras")
    common = ("--mcn", str(path), "--keras", model, "--data", str(imdb), "--epochs", "2", "--batch-size", "4")
    out = run("train-parity", *common, "--optimizer", "matconvnet", "--json", str(tmp_path / "tp.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [r[:2] for r in rows] == [["1", "1"], ["2", "1"], ["3", "1"], ["4", "2"], ["5", "2"], ["6", "2"]]
    assert all(r[5:7] == ["-", "-"] and float(r[7]) < 1e-5 for r in rows), out.stdout
    assert all(abs(float(r[3]) - float(r[4])) < 1e-5 for r in rows), out.stdout
    assert "cnn_train_dag replayed by harness.compare_training" in out.stdout
    assert "every param agrees after every step" in out.stdout
    import json

    settings = json.loads((tmp_path / "tp.json").read_text())["settings"]
    assert settings["reference"] == "cnn_train_dag" and settings["first_divergence"] is None
    uncompiled = run("train-parity", *common)
    assert uncompiled.returncode == 2 and "--optimizer matconvnet" in uncompiled.stderr
    two = tmp_path / "two.mat"
    _save_dagnn(two, loss=True, second_input=True)
    out = run("train-parity", "--mcn", str(two), "--keras", model, "--optimizer", "matconvnet")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "2 image inputs (data, data2)" in out.stderr


def test_reference_with_images_gives_the_top1_error_and_fills_a_dagnn_input(tmp_path):
    from tests.mcn.test_dagnn_files import dagnn_struct, struct_array_v5

    rng = np.random.RandomState(2)
    imdb = tmp_path / "imdb.mat"
    labels = np.array([[1, 2, 2, 1]], float)
    scipy.io.savemat(
        imdb, {"images": {"data": rng.rand(28, 28, 1, 4), "labels": labels, "set": [[3, 3, 3, 3]]}}
    )
    seed = run("reference", "--images", str(imdb))
    assert seed.returncode == 0, seed.stderr
    assert "probe batch: 4 test images of imdb.mat" in seed.stdout
    assert "top-1 error on the batch: " in seed.stdout and "of 4 labelled positions" in seed.stdout
    dag = tmp_path / "dag.mat"
    scipy.io.savemat(dag, {"net": {k: struct_array_v5(v) for k, v in dagnn_struct().items()}})
    small = tmp_path / "small.mat"
    scipy.io.savemat(
        small, {"images": {"data": rng.rand(6, 5, 1, 3), "labels": [[1, 1, 1]], "set": [[1, 3, 3]]}}
    )
    out = run("reference", "--mcn", str(dag), "--images", str(small), "--batch", "2")
    assert out.returncode == 0, out.stderr
    assert "inputs: data 6 x 5 x 1" in out.stdout and "prediction     4 x 3 x 3" in out.stdout


def test_an_imdb_whose_labels_do_not_match_its_images_names_the_images_option(tmp_path):
    """One more image than labels (the trait of a published MNIST imdb): refused in one
    line that names --images, for a simplenn and for a DagNN net."""
    from tests.mcn.test_dagnn_files import dagnn_struct, struct_array_v5

    rng = np.random.RandomState(3)
    imdb = tmp_path / "imdb.mat"
    scipy.io.savemat(
        imdb, {"images": {"data": rng.rand(28, 28, 1, 5), "labels": [[1, 2, 2, 1]], "set": [[3, 3, 3, 3, 3]]}}
    )
    dag = tmp_path / "dag.mat"
    scipy.io.savemat(dag, {"net": {k: struct_array_v5(v) for k, v in dagnn_struct().items()}})
    for mcn in ("seed", str(dag)):
        out = run("reference", "--mcn", mcn, "--images", str(imdb))
        assert out.returncode == 2
        assert out.stderr.startswith(f"mcn-harness: error: --images {str(imdb)!r}: "), out.stderr
        assert "labels" in out.stderr and len(out.stderr.strip().splitlines()) == 1
