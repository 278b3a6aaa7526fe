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


def test_a_dagnn_file_runs_in_reference_port_and_check_and_is_one_line_elsewhere(tmp_path):
    from tests.mcn.test_dagnn_files import dagnn_struct, struct_array_v5

    path = tmp_path / "dag.mat"
    scipy.io.savemat(path, {"net": {k: struct_array_v5(v) for k, v in dagnn_struct().items()}})
    ref = run("reference", "--mcn", str(path), "--batch", "2", "--input-size", "6", "5", "1")
    assert ref.returncode == 0, ref.stderr
    assert "MatConvNet reference (DagNN): 2 layers, 3 vars, 2 params, batch 2" in ref.stdout
    assert "relu1            dagnn.ReLU         prediction     4 x 3 x 3" in ref.stdout
    for command in (["diagnose", "--keras", "seed-fixed"], ["train-parity", "--keras", "seed-fixed"]):
        out = run(*command, "--mcn", str(path))
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "does not support DagNN networks yet" in out.stderr and "simplenn networks only" in out.stderr
    # port, then check its model.keras var by var, then run the generated test
    port = tmp_path / "port"
    made = run("port", "--mcn", str(path), "--out", str(port))
    assert made.returncode == 0, made.stderr
    assert "model.py (standalone source) is written for simplenn networks only" in made.stdout
    checked = run("check", "--mcn", str(path), "--keras", str(port / "model.keras"), "--batch", "2")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "EQUIVALENT" in checked.stdout and "prediction" in checked.stdout
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
