"""What the harness probes a net with: its input size (declared, the model's, given,
inferred), the layers the reference can run (custom layers, --upto), and the user's
own images (imdb .mat, PNG/JPEG files)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.io
from PIL import Image

import harness
from harness.io.images import load_probe_images
from harness.io.specs import InputError, resolve_input_size, runnable_net, with_input_size
from harness.mcn import Layer, McnError, Net, seed_net
from harness.mcn.geometry import DEFAULT_SPATIAL, infer_input_size, layer_output_shapes
from harness.translate import to_keras

RNG = np.random.default_rng(0)


def _conv(name, h, w, c, k, **kw):
    return Layer("conv", name, [RNG.standard_normal((h, w, c, k)), np.zeros((1, k))], **kw)


def _lenet(meta=None) -> Net:
    return Net(
        [
            _conv("conv1", 5, 5, 1, 4),
            Layer("pool", "pool1", method="max", pool=2, stride=2),
            _conv("conv2", 5, 5, 4, 6),
            Layer("pool", "pool2", method="max", pool=2, stride=2),
            _conv("conv3", 4, 4, 6, 3),
            Layer("softmaxloss", "loss"),
        ],
        meta or {},
    )


def _denoiser(meta=None) -> Net:
    return Net(
        [_conv("conv1", 3, 3, 3, 4, pad=1), Layer("relu", "relu1"), _conv("conv2", 3, 3, 4, 3, pad=1)],
        meta or {},
    )


# ------------------------------------------------------------------------------ input size


def test_inferred_size_is_the_smallest_every_window_fits():
    net = harness.mcn.vl_simplenn_tidy(_lenet())
    (h, w, c), how = infer_input_size(net)
    assert (h, w, c) == (28, 28, 1) and "smallest" in how and "depth 1" in how
    assert layer_output_shapes(net, [28, 28, 1])[-2] == (1, 1, 3)
    with pytest.raises(McnError):
        layer_output_shapes(net, [27, 27, 1])


def test_a_fully_convolutional_net_gets_the_default_size_and_its_filters_depth():
    (h, w, c), how = infer_input_size(harness.mcn.vl_simplenn_tidy(_denoiser()))
    assert (h, w, c) == (DEFAULT_SPATIAL, DEFAULT_SPATIAL, 3) and "any size fits" in how


def test_input_size_order_declared_model_given_inferred():
    declared = _lenet({"inputSize": [32, 32, 1]})
    assert resolve_input_size(declared, None, [40, 40, 1]) == ((32, 32, 1), "net.meta.inputSize")
    net = _lenet()
    model = keras.Sequential([keras.Input((36, 36, 1)), keras.layers.Identity()])
    assert resolve_input_size(net, model)[0] == (36, 36, 1)
    with pytest.raises(InputError, match="--input-size 40 40 1: the Keras model takes"):
        resolve_input_size(net, model, [40, 40, 1])
    assert resolve_input_size(net, None, [40, 40, 1]) == ((40, 40, 1), "--input-size")
    size, how = resolve_input_size(harness.mcn.vl_simplenn_tidy(net))
    assert size == (28, 28, 1) and how.startswith("inferred") and "--input-size" in how


def test_a_scalar_input_size_is_a_square_with_the_filters_depth():
    net = _denoiser({"inputSize": 125.0})  # a tracker's target size (DCFNet keeps one there)
    size, how = resolve_input_size(net)
    assert size == (125, 125, 3) and "[125]" in how
    sized = with_input_size(net, size, how)
    assert sized.meta["inputSize"] == [125.0, 125.0, 3.0] and net.meta["inputSize"] == 125.0
    assert any("125 x 125 x 3" in n for n in sized.notes)


# ------------------------------------------------------------------------------ runnable layers


def test_a_custom_last_layer_ends_the_comparison_with_a_note():
    net = _denoiser()
    net.layers.append(Layer("custom", "loss"))
    cut, notes = runnable_net(net)
    assert [l.name for l in cut.layers] == ["conv1", "relu1", "conv2"] and len(net.layers) == 4
    assert notes == [
        "compared up to layer 3 'conv2': layer 4 'loss' is a custom layer (MATLAB code), "
        "which the reference cannot run"
    ]


def test_upto_by_name_or_index_and_bad_values():
    net = _lenet()
    assert [l.name for l in runnable_net(net, "pool1")[0].layers] == ["conv1", "pool1"]
    cut, notes = runnable_net(net, "3")
    assert cut.layers[-1].name == "conv2" and "(--upto)" in notes[0]
    with pytest.raises(InputError, match=r"--upto 'fc9'.*conv1, pool1"):
        runnable_net(net, "fc9")
    first = Net([Layer("custom", "mine"), *net.layers])
    with pytest.raises(InputError, match="layer 1 'mine'.*nothing left to compare"):
        runnable_net(first)


def test_check_upto_cuts_a_functional_model_at_the_paired_layer():
    net = seed_net(seed=0)
    result = harness.check(net, to_keras(net), batch=2, upto="pool2", findings=False)
    assert result.ok, str(result)
    assert result.report.rows[-1].layer == "pool2"
    assert any("(--upto)" in n for n in result.report.notes)


def test_check_upto_refuses_a_subclassed_model():
    net = seed_net(seed=0)
    inner = to_keras(net)

    class Wrapped(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def call(self, x):
            return self.inner(x)

    model = Wrapped()
    model(np.zeros((1, 28, 28, 1)))
    with pytest.raises(InputError, match="not a Sequential or functional model"):
        harness.check(net, model, batch=2, upto="pool2", findings=False)


# ------------------------------------------------------------------------------ images


def test_imdb_images_test_set_first_nan_images_skipped(tmp_path):
    data = RNG.standard_normal((8, 8, 1, 6)).astype(np.float32)
    data[0, 0, 0, 4] = np.nan
    labels = np.array([[1, 2, 1, 2, 1, 2]], float)
    sets = np.array([[1, 1, 3, 2, 3, 3]], float)
    path = tmp_path / "imdb.mat"
    scipy.io.savemat(path, {"images": {"data": data, "labels": labels, "set": sets}})
    got = load_probe_images(path, (8, 8, 1), 4, classes=2)
    order = [2, 5, 3, 0]  # test (image 5 has a NaN), then validation, then training
    np.testing.assert_array_equal(got.x, data[..., order].astype(np.float64))
    np.testing.assert_array_equal(got.labels, labels[:, order])
    assert "1 images with NaN or Inf in imdb.mat skipped" in got.notes
    assert got.notes[0].startswith("probe batch: 4 test/training/validation images of imdb.mat")
    with pytest.raises(InputError, match=r"Expected images of the net's input size 9 x 8 x 1"):
        load_probe_images(path, (9, 8, 1), 4, classes=2)
    with pytest.raises(InputError, match=r"images.labels in 1..1 .*Received 2 for image 6"):
        load_probe_images(path, (8, 8, 1), 4, classes=1)


def test_image_files_resized_and_mean_subtracted_as_matconvnet_deploys(tmp_path):
    pixels = [RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8) for _ in range(3)]
    for k, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"im{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    average = np.array([[[120.0, 110.0, 100.0]]])
    norm = {"imageSize": np.array([[8.0, 8.0, 3.0]]), "averageImage": average}
    got = load_probe_images(tmp_path, (8, 8, 3), 2, normalization=norm, classes=5, seed=3)
    assert got.x.shape == (8, 8, 3, 2)
    for k in range(2):
        want = np.asarray(Image.fromarray(pixels[k]).resize((8, 8), Image.Resampling.BILINEAR), np.float64)
        np.testing.assert_allclose(got.x[..., k], want - average)
    assert got.labels.shape == (1, 2) and np.all((got.labels >= 1) & (got.labels <= 5))
    assert any("averageImage subtracted" in n for n in got.notes)
    assert any("drawn at random" in n for n in got.notes)
    # no loss: no labels; grey nets read the image as luminance
    grey = load_probe_images(tmp_path / "im0.png", (10, 12, 1), 4)
    assert grey.x.shape == (10, 12, 1, 1) and grey.labels is None


def test_bad_image_inputs_are_one_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"--images .*cannot read broken.png"):
        load_probe_images(tmp_path / "broken.png", (8, 8, 3), 1)
    with pytest.raises(InputError, match="Expected an imdb .mat file, a PNG/JPEG image"):
        load_probe_images(_touch(tmp_path / "data.csv"), (8, 8, 3), 1)
    with pytest.raises(InputError, match="no such file"):
        load_probe_images(tmp_path / "missing", (8, 8, 3), 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="Expected PNG or JPEG files"):
        load_probe_images(empty, (8, 8, 3), 1)
    with pytest.raises(InputError, match="image files give 1 or 3 channels; the net takes 2"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "g.png")
        load_probe_images(tmp_path / "g.png", (4, 4, 2), 1)


def _touch(path):
    path.write_text("x")
    return path
