"""Probe batches from the user's own data (``--images``), instead of random ones.

    --images imdb.mat       MatConvNet's imdb: images.data (H x W x C x N), images.labels,
                            images.set. Test images (set 3) first, then validation (2),
                            then training (1); the data is used as stored, since that is
                            what cnn_train's getBatch feeds the net.
    --images photo.png      one image file, or a directory of them (PNG/JPEG, read with
    --images photos/        Pillow, sorted by name). Each is prepared as MatConvNet's
                            deployment examples do: single precision in 0..255, resized to
                            net.meta.normalization.imageSize (else to the input size), and
                            net.meta.normalization.averageImage subtracted.

Images holding NaN or Inf are skipped with a note (the comparison refuses non-finite
input); labels come from the imdb, or are drawn at random (with a note) for image files.
Every failure is an ``InputError`` naming the option and the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.io.specs import InputError

__all__ = ["IMAGE_SUFFIXES", "ProbeImages", "load_probe_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ProbeImages:
    """``x`` (H x W x C x N, float64), ``labels`` (1 x N, 1-based; None when the net has no
    loss), and ``notes`` saying where they came from."""

    x: np.ndarray
    labels: np.ndarray | None
    notes: list[str] = field(default_factory=list)


def load_probe_images(
    spec: str | os.PathLike,
    hwc: tuple[int, int, int],
    n: int,
    *,
    normalization: dict | None = None,
    classes: int | None = None,
    seed: int = 0,
    option: str = "--images",
) -> ProbeImages:
    """At most ``n`` images of the net's input size ``hwc`` from ``spec`` (an imdb .mat,
    an image file or a directory of them). ``normalization`` is the net's
    ``meta.normalization`` (``imageSize``, ``averageImage``); ``classes`` the number of
    classes the net's loss takes (None: the net has no loss, no labels are returned)."""
    path = Path(spec)
    where = f"{option} {str(spec)!r}"
    if not path.exists():
        raise InputError(f"{where}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{where}: Expected PNG or JPEG files in the directory. Received none")
        return _from_files(files, where, hwc, n, normalization or {}, classes, seed)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _from_files([path], where, hwc, n, normalization or {}, classes, seed)
    if path.suffix.lower() == ".mat":
        return _from_imdb(path, where, hwc, n, classes)
    raise InputError(
        f"{where}: Expected an imdb .mat file, a PNG/JPEG image or a directory of them. "
        f"Received a file ending in {path.suffix or '(no suffix)'!r}"
    )


def _from_imdb(path: Path, where: str, hwc, n: int, classes: int | None) -> ProbeImages:
    from harness.io.imdb import load_imdb
    from harness.mcn.options import McnError

    try:
        imdb = load_imdb(path, finite=False)
    except McnError as err:
        raise InputError(f"{where}: {err}") from None
    data = imdb.images
    if tuple(data.shape[:3]) != tuple(hwc):
        raise InputError(
            f"{where}: Expected images of the net's input size {hwc[0]} x {hwc[1]} x {hwc[2]}. "
            f"Received images.data of {' x '.join(map(str, data.shape[:3]))}"
        )
    sets = imdb.set.ravel()
    order = np.concatenate([np.flatnonzero(sets == s) for s in (3, 2, 1)])
    finite = np.isfinite(data.reshape(-1, data.shape[3])).all(axis=0)
    notes = []
    if not finite.all():
        notes.append(f"{int((~finite).sum())} images with NaN or Inf in {path.name} skipped")
    order = [int(k) for k in order if finite[k]][:n]
    if not order:
        raise InputError(f"{where}: Expected finite images. Every image holds NaN or Inf")
    picked = {3: "test", 2: "validation", 1: "training"}
    kinds = sorted({picked[int(sets[k])] for k in order})
    notes.insert(
        0, f"probe batch: {len(order)} {'/'.join(kinds)} images of {path.name} (images.data as stored)"
    )
    x = np.asarray(data[..., order], dtype=np.float64)
    labels = None
    if classes is not None:
        labels = imdb.labels.ravel()[order].reshape(1, -1).astype(np.float64)
        over = labels > classes
        if over.any():
            k = order[int(np.argmax(over.ravel()))]
            raise InputError(
                f"{where}: Expected images.labels in 1..{classes} (the net predicts {classes} classes). "
                f"Received {float(imdb.labels.ravel()[k]):g} for image {k + 1}"
            )
    return ProbeImages(x, labels, notes)


def _from_files(
    files: list[Path], where: str, hwc, n: int, normalization: dict, classes: int | None, seed: int
) -> ProbeImages:
    from PIL import Image, UnidentifiedImageError

    h, w, c = hwc
    if c not in (1, 3):
        raise InputError(f"{where}: image files give 1 or 3 channels; the net takes {c}")
    size = _image_size(normalization, hwc, where)
    average = _average_image(normalization, (size[0], size[1], c), where)
    images, notes = [], []
    for f in files[:n]:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if c == 3 else "L")
                if (im.height, im.width) != size[:2]:
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.float32).astype(np.float64)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise InputError(f"{where}: cannot read {f.name}: {err}") from None
        a = a.reshape(size[0], size[1], c)
        if average is not None:
            a = a - average
        if size[:2] != (h, w):
            a = _center_crop(a, h, w, f.name, where)
        images.append(a)
    x = np.stack(images, axis=3)
    steps = [f"single precision 0..255, {size[0]} x {size[1]}"]
    if average is not None:
        steps.append("averageImage subtracted")
    if size[:2] != (h, w):
        steps.append(f"centre {h} x {w}")
    notes.append(f"probe batch: {x.shape[3]} image file(s) ({', '.join(steps)})")
    labels = None
    if classes is not None:
        labels = np.random.RandomState(seed).randint(1, classes + 1, size=(1, x.shape[3])).astype(np.float64)
        notes.append("labels of the image files are not known: drawn at random (they only weight the loss)")
    return ProbeImages(x, labels, notes)


def _image_size(normalization: dict, hwc, where: str) -> tuple[int, int]:
    size = normalization.get("imageSize") if isinstance(normalization, dict) else None
    if size is None:
        return hwc[0], hwc[1]
    v = np.asarray(size, dtype=float).ravel() if np.size(size) else np.zeros(0)
    if v.size < 2 or not np.all(np.isfinite(v[:2])) or np.any(v[:2] < 1):
        raise InputError(f"{where}: Expected net.meta.normalization.imageSize [H W ...]. Received {size!r}")
    return int(v[0]), int(v[1])


def _average_image(normalization: dict, hwc, where: str) -> np.ndarray | None:
    """``averageImage`` as an array that broadcasts over an ``H x W x C`` image: a full
    image (resized bilinearly when the sizes differ), ``1 x 1 x C``, or ``C`` values."""
    avg = normalization.get("averageImage") if isinstance(normalization, dict) else None
    if avg is None or np.size(avg) == 0:
        return None
    a = np.asarray(avg, dtype=np.float64)
    h, w, c = hwc
    if a.size == c:
        return a.reshape(1, 1, c)
    if a.ndim == 2 and c == 1:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] != c:
        raise InputError(
            f"{where}: Expected net.meta.normalization.averageImage of H x W x {c} or {c} values. "
            f"Received shape {a.shape}"
        )
    if a.shape[:2] != (h, w):
        from scipy.ndimage import zoom

        a = zoom(a, (h / a.shape[0], w / a.shape[1], 1), order=1)
    return a


def _center_crop(a: np.ndarray, h: int, w: int, name: str, where: str) -> np.ndarray:
    if a.shape[0] < h or a.shape[1] < w:
        raise InputError(
            f"{where}: {name} is {a.shape[0]} x {a.shape[1]} after resizing to imageSize, "
            f"smaller than the net's input {h} x {w}"
        )
    top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    return a[top : top + h, left : left + w]
