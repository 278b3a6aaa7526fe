"""Training data for parity runs: a user's imdb-style .mat, or the bundled digits.

An imdb (MatConvNet's cnn_train convention) holds ``images.data`` (H x W x C x N),
``images.labels`` (1 x N, 1-based) and ``images.set`` (1 x N: 1 train, 2 val, 3 test).
The bundled default is a real two-class digit set: scikit-learn's 8x8 handwritten digits
(shipped inside the package, nothing is downloaded), two classes, resampled to 28x28 like
MNIST and mean-subtracted as cnn_mnist does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .mcn._util import McnError

__all__ = ["Imdb", "digits_imdb", "load_imdb"]


@dataclass
class Imdb:
    images: np.ndarray  # H x W x C x N
    labels: np.ndarray  # 1 x N, 1-based
    set: np.ndarray  # 1 x N: 1 train, 2 val, 3 test
    classes: tuple[str, ...] = ()

    def subset(self, which: int) -> np.ndarray:
        """1-based indices of the images in set ``which`` (as cnn_train's batches are)."""
        return np.flatnonzero(self.set.ravel() == which) + 1


def digits_imdb(
    digits: tuple[int, int] = (3, 8), size: int = 28, val_fraction: float = 0.25, seed: int = 0
) -> Imdb:
    """Two digit classes from scikit-learn's bundled 8x8 digits, resampled to
    ``size`` x ``size`` (bilinear), scaled to [0, 1] and mean-subtracted. Label 1 is
    ``digits[0]``, label 2 ``digits[1]``; a shuffled ``val_fraction`` goes to set 2."""
    if len(digits) != 2 or digits[0] == digits[1] or not all(0 <= d <= 9 for d in digits):
        raise McnError(f"Expected two different digits in 0..9. Received digits={digits!r}")
    if size < 8:
        raise McnError(f"Expected size >= 8. Received size={size}")
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, digits)
    small = d.images[keep] / 16.0
    labels = np.where(d.target[keep] == digits[0], 1.0, 2.0)
    big = np.stack([zoom(im, size / 8.0, order=1) for im in small]).astype(np.float32)
    big = np.clip(big, 0, 1)
    big -= big.mean(axis=0, keepdims=True)
    images = big.transpose(1, 2, 0)[:, :, None, :]  # H x W x 1 x N
    rng = np.random.RandomState(seed)
    n = labels.size
    sets = np.ones(n)
    sets[rng.permutation(n)[: int(round(val_fraction * n))]] = 2
    return Imdb(np.ascontiguousarray(images), labels[None, :], sets[None, :], tuple(str(x) for x in digits))


def load_imdb(path: str | os.PathLike) -> Imdb:
    """Read an imdb .mat (``images`` struct with ``data``, ``labels``, ``set``; or those
    fields at top level)."""
    from .mcn.matfile import _read_variables

    v = _read_variables(path)
    images = v.get("images", v)
    if not isinstance(images, dict) or "data" not in images or "labels" not in images:
        raise McnError(
            f"Expected {path} to hold an imdb: images.data (H x W x C x N) and images.labels (1 x N). "
            f"Received variables: {', '.join(sorted(v)) or 'none'}"
        )
    data = np.asarray(images["data"])
    if data.ndim not in (3, 4):
        raise McnError(f"Expected images.data to be H x W x C x N. Received shape {data.shape}")
    data = data.reshape(data.shape + (1,) * (4 - data.ndim)) if data.ndim == 3 else data
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float32)
    n = data.shape[3]
    labels = np.asarray(images["labels"], dtype=float).reshape(1, -1)
    if labels.size != n:
        raise McnError(f"Expected images.labels to have {n} entries (one per image). Received {labels.size}")
    sets = np.asarray(images.get("set", np.ones(n)), dtype=float).reshape(1, -1)
    if sets.size != n:
        raise McnError(f"Expected images.set to have {n} entries. Received {sets.size}")
    meta = v.get("meta", {}) if isinstance(v.get("meta"), dict) else {}
    classes = meta.get("classes", ())
    classes = tuple(str(c) for c in classes) if isinstance(classes, list) else ()
    return Imdb(data, labels, sets, classes)
