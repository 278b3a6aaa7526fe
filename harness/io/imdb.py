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

from harness.mcn.options import McnError

__all__ = ["Imdb", "check_imdb_labels", "digits_imdb", "load_imdb"]


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


def _numeric_array(value, what: str, path) -> np.ndarray:
    from harness.mcn.simplenn import describe

    if not isinstance(value, np.ndarray | int | float | np.number) or isinstance(value, bool):
        raise McnError(f"{path}: Expected {what} to be a numeric array. Received {describe(value)}")
    a = np.asarray(value)
    if a.dtype.kind not in "biuf":
        raise McnError(f"{path}: Expected {what} to be a real numeric array. Received {describe(value)}")
    return a


def load_imdb(path: str | os.PathLike, *, finite: bool = True) -> Imdb:
    """Read an imdb .mat (``images`` struct with ``data``, ``labels``, ``set``; or those
    fields at top level), checked: images.data real and finite (``finite=False``: NaN and
    Inf are kept, for the caller to skip), images.labels positive integers (1-based class
    indices), images.set in 1..3; one label and set per image."""
    from harness.mcn.matfile import read_variables

    v = read_variables(path, wanted=("images", "meta", "data", "labels", "set"))
    images = v.get("images", v)
    if not isinstance(images, dict) or "data" not in images or "labels" not in images:
        raise McnError(
            f"Expected {path} to hold an imdb: images.data (H x W x C x N) and images.labels (1 x N). "
            f"Received variables: {', '.join(sorted(map(str, v))) or 'none'}"
        )
    data = _numeric_array(images["data"], "images.data", path)
    if data.ndim not in (3, 4):
        raise McnError(f"{path}: Expected images.data to be H x W x C x N. Received shape {data.shape}")
    data = data.reshape(data.shape + (1,) * (4 - data.ndim)) if data.ndim == 3 else data
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float32)
    bad = ~np.isfinite(data)
    if finite and bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), data.shape))
        raise McnError(
            f"{path}: Expected images.data to be finite. Received {int(bad.sum())} NaN/Inf values "
            f"(first at index {first}, 0-based H, W, C, N)"
        )
    n = data.shape[3]
    labels = _numeric_array(images["labels"], "images.labels", path).astype(float).reshape(1, -1)
    if labels.size != n:
        raise McnError(
            f"{path}: Expected images.labels to have {n} entries (one per image). Received {labels.size}"
        )
    wrong = ~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 1)
    if wrong.any():
        k = int(np.argmax(wrong.ravel()))
        raise McnError(
            f"{path}: Expected images.labels to be class indices 1, 2, ... Received "
            f"{labels.ravel()[k]!r} for image {k + 1} ({int(wrong.sum())} such labels)"
        )
    sets = _numeric_array(images.get("set", np.ones(n)), "images.set", path).astype(float).reshape(1, -1)
    if sets.size != n:
        raise McnError(f"{path}: Expected images.set to have {n} entries. Received {sets.size}")
    if not np.isin(sets, (1, 2, 3)).all():
        k = int(np.argmax(~np.isin(sets, (1, 2, 3)).ravel()))
        raise McnError(
            f"{path}: Expected images.set to be 1 (train), 2 (val) or 3 (test). "
            f"Received {sets.ravel()[k]!r} for image {k + 1}"
        )
    meta = v.get("meta", {}) if isinstance(v.get("meta"), dict) else {}
    classes = meta.get("classes", ())
    classes = tuple(str(c) for c in classes) if isinstance(classes, list) else ()
    return Imdb(data, labels, sets, classes)


def check_imdb_labels(imdb: Imdb, num_classes: int, source: str) -> None:
    """Refuse labels above the number of classes the net predicts (McnError naming
    images.labels): a label there would be trained on as a class that does not exist."""
    labels = np.asarray(imdb.labels, dtype=float).ravel()
    over = labels > num_classes
    if over.any():
        k = int(np.argmax(over))
        raise McnError(
            f"{source}: Expected images.labels in 1..{num_classes} (the net predicts {num_classes} "
            f"classes). Received {labels[k]!r} for image {k + 1} ({int(over.sum())} such labels)"
        )
