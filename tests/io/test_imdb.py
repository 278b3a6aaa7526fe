"""harness.data: the bundled digits and imdb .mat files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from harness.io.imdb import digits_imdb, load_imdb
from harness.mcn import McnError


def test_digits_are_a_real_two_class_set():
    imdb = digits_imdb()
    h, w, c, n = imdb.images.shape
    assert (h, w, c) == (28, 28, 1) and n > 300 and imdb.images.dtype == np.float32
    assert set(np.unique(imdb.labels)) == {1.0, 2.0}
    assert abs(float(imdb.images.mean())) < 1e-5  # mean-subtracted
    assert 0.2 < np.mean(imdb.set == 2) < 0.3
    # the two classes differ on average: real images, not noise
    a = imdb.images[..., imdb.labels.ravel() == 1].mean(axis=3)
    b = imdb.images[..., imdb.labels.ravel() == 2].mean(axis=3)
    assert float(np.abs(a - b).max()) > 0.2
    np.testing.assert_array_equal(digits_imdb().images, imdb.images)  # deterministic


def test_imdb_round_trip(tmp_path):
    imdb = digits_imdb(digits=(0, 1))
    scipy.io.savemat(
        tmp_path / "imdb.mat",
        {
            "images": {"data": imdb.images, "labels": imdb.labels, "set": imdb.set},
            "meta": {"classes": np.array(["0", "1"], dtype=object)},
        },
    )
    back = load_imdb(tmp_path / "imdb.mat")
    np.testing.assert_array_equal(back.images, imdb.images)
    np.testing.assert_array_equal(back.labels, imdb.labels)
    assert back.classes == ("0", "1")
    assert back.subset(1)[0] >= 1  # 1-based indices


@pytest.mark.parametrize(
    "content, message",
    [
        ({"x": np.ones(3)}, "imdb"),
        ({"images": {"data": np.ones((4, 4, 1, 3)), "labels": np.ones((1, 2))}}, "3 entries"),
    ],
)
def test_bad_imdb(tmp_path, content, message):
    scipy.io.savemat(tmp_path / "bad.mat", content)
    with pytest.raises(McnError, match=message):
        load_imdb(tmp_path / "bad.mat")
    with pytest.raises(McnError, match="digits"):
        digits_imdb(digits=(3, 3))
