"""Cause probes: the culprit layer of a divergent comparison re-run with the usual porting
mistakes (``probe_causes``); each alternative that reproduces the Keras side is a
``Cause``.

Layer alternatives (run through the reference, compared with the Keras layers' output
on the same input): padding sides swapped, kernel flipped or transposed, a Dense kernel
in MATLAB's column-major order, transposed input images, zero-padded pooling, the other
pooling method, Keras' bnorm epsilon, a missing or leaky ReLU. Loss alternatives
(compared with the Keras loss value): softmax twice, 0-based labels, the batch sum, the
batch mean, the mean over pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from harness.mcn.net import Layer, Net
from harness.mcn.options import is_empty, pad4
from harness.mcn.simplenn import vl_simplenn_tidy

if TYPE_CHECKING:
    import keras

    from harness.equivalence.report import Report

__all__ = ["Cause", "probe_causes"]


@dataclass(frozen=True)
class Cause:
    """A porting mistake that reproduces the Keras side at ``layer`` (the culprit
    MatConvNet layer). ``alternative``: its short key (e.g. "flipped_kernel", named as in
    ``harness.testing.bugs`` where the catalogue has it); ``text``: "matches if ..."."""

    layer: str
    alternative: str
    text: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.text


class _Alternative(NamedTuple):
    key: str
    description: str
    layer: Any  # the changed MatConvNet layer
    transform: Any  # None, "transpose", "identity" or ("zeropad", (t, b, l, r)): of the input


def _alternatives(layer: Layer, index: int, keras_main) -> list[_Alternative]:
    """The common porting mistakes to re-run a divergent layer with."""
    alts: list[_Alternative] = []

    def changed(**fields):
        new = layer.copy()
        for k, v in fields.items():
            if k == "weights0":
                new.weights = [v, *new.weights[1:]]
            else:
                setattr(new, k, v)
        return new

    t = layer.type
    if t in ("conv", "pool"):
        pads = pad4(layer.pad)
        if any(pads):
            swapped = [pads[1], pads[0], pads[3], pads[2]]
            if swapped != list(pads):
                alts.append(
                    _Alternative(
                        "wrong_padding_side",
                        "the padding sides are swapped ([B T R L] for [T B L R])",
                        changed(pad=swapped),
                        None,
                    )
                )
    if t == "conv" and not is_empty(layer.weights[0]):
        f = np.asarray(layer.weights[0])
        f = f.reshape(f.shape + (1,) * (4 - f.ndim))
        alts.append(
            _Alternative(
                "flipped_kernel",
                "the kernel is flipped spatially (convolution instead of correlation)",
                changed(weights0=f[::-1, ::-1].copy()),
                None,
            )
        )
        if f.shape[0] == f.shape[1]:
            alts.append(
                _Alternative(
                    "transposed_kernel",
                    "the kernel is transposed (FH <-> FW)",
                    changed(weights0=f.transpose(1, 0, 2, 3).copy()),
                    None,
                )
            )
        if f.shape[0] * f.shape[1] > 1:
            colmajor = f.reshape(-1, f.shape[3], order="F").reshape(f.shape)
            alts.append(
                _Alternative(
                    "flatten_order",
                    "the Dense kernel holds MATLAB's column-major F(:) (flatten order)",
                    changed(weights0=colmajor),
                    None,
                )
            )
        if index == 0:
            alts.append(
                _Alternative(
                    "transposed_input",
                    "the input images are transposed (H <-> W, MATLAB column-major images)",
                    layer,
                    "transpose",
                )
            )
    if t == "pool":
        pads = pad4(layer.pad)
        if any(pads):
            alts.append(
                _Alternative(
                    "zero_padded_pooling",
                    "the pooling is zero-padded (ZeroPadding2D + stock pooling) instead of clipped windows",
                    changed(pad=0),
                    ("zeropad", tuple(pads)),
                )
            )
        other = "avg" if layer.get("method", "max") == "max" else "max"
        alts.append(
            _Alternative("pooling_method", f"the pooling method is {other}", changed(method=other), None)
        )
    if t == "bnorm":
        for eps in (1e-3, 1e-4):
            alts.append(
                _Alternative(
                    "bnorm_epsilon",
                    f"bnorm epsilon is {eps:g} (Keras' default is 1e-3)",
                    changed(epsilon=eps),
                    None,
                )
            )
    if t == "relu":
        alts.append(
            _Alternative(
                "missing_relu",
                "the ReLU is missing in Keras",
                Layer("dropout", layer.name, rate=0.0),
                "identity",
            )
        )
        for leak in (0.01, 0.2, 0.3):
            alts.append(
                _Alternative("leaky_relu", f"the ReLU leaks with slope {leak:g}", changed(leak=leak), None)
            )
    return alts


def probe_causes(
    net: Net,
    model: keras.Model,
    report: Report,
    x: Any,
    labels: Any,
    *,
    mode: str = "normal",
    dialect: str = "master",
    weights: str = "net",
) -> list[Cause]:
    """Re-run the report's culprit layer with the usual porting mistakes and return a
    ``Cause`` ("matches if ...") for each alternative that changes the reference's result
    AND reproduces the Keras tensor the comparison observed there, which the reference
    does not: an alternative that changes nothing (flipping a 1x1 kernel) or that the
    Keras side already matched is never reported. ``model`` and ``weights`` are kept for
    callers; the Keras side is the one ``report`` observed."""
    from harness.equivalence.reference_pass import cast_net
    from harness.equivalence.tolerance import tolerance_for
    from harness.mcn.simplenn import vl_simplenn

    fd = report.first_divergence
    if fd is None:
        return []
    culprit = fd.culprit
    net = cast_net(vl_simplenn_tidy(net), np.float64)
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape + (1,) * (4 - x.ndim))
    order = [l.name for l in net.layers]
    if culprit not in order:
        return []
    i = order.index(culprit)
    layer = net.layers[i]
    run_mode = "test" if mode == "test" else "normal"
    res = vl_simplenn(
        net, x, None, labels, mode=run_mode, dialect=dialect, lrn_exact=True, rng=np.random.default_rng(0)
    )
    if layer.type in ("softmaxloss", "loss"):
        tol = tolerance_for("float64").forward
        return [
            Cause(culprit, key, f"matches if {text}")
            for key, text in _loss_causes(report, res[i].x, labels, tol)
        ]
    keras_out = report.observed.get(culprit)
    if keras_out is None:
        return []
    # float32 comparisons: the Keras tensor holds float32 rounding of a dozen layers
    tol = 1e-8 if report.dtype == "float64" else 1e-4
    ref_out = np.asarray(res[i + 1].x, dtype=np.float64)
    if _close(ref_out, keras_out, tol):
        return []  # the Keras tensor matches here: nothing for an alternative to explain
    out: list[Cause] = []
    for alt in _alternatives(layer, i, None):
        got = _run_alternative(alt, res[i].x, run_mode, dialect)
        if got is None or _close(got, ref_out, tol):
            continue  # does not run, or changes nothing on this batch: not a cause
        if _close(got, keras_out, tol):
            out.append(Cause(culprit, alt.key, f"matches if {alt.description}"))
    return out


def _close(a, b, tol: float) -> bool:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size != b.size:
        return False
    b = b.reshape(a.shape)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    if not np.all(np.isfinite(diff)):
        return False
    scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-300)
    return float(diff.max(initial=0.0)) <= tol * scale


def _run_alternative(alt: _Alternative, xin: np.ndarray, mode: str, dialect: str) -> np.ndarray | None:
    """The culprit layer's output under one alternative (None: it does not run)."""
    from harness.mcn.simplenn import vl_simplenn

    if alt.transform == "transpose":
        if xin.shape[0] != xin.shape[1]:
            return None
        xin = xin.transpose(1, 0, 2, 3)
    elif isinstance(alt.transform, tuple) and alt.transform[0] == "zeropad":
        pt, pb, pl, pr = alt.transform[1]
        xin = np.pad(xin, ((pt, pb), (pl, pr), (0, 0), (0, 0)))
    if alt.transform == "identity":
        return xin
    try:
        return vl_simplenn(Net([alt.layer]), xin, mode=mode, dialect=dialect, lrn_exact=True)[-1].x
    except Exception:  # an alternative that does not even run is not the cause
        return None


def _loss_causes(report: Report, scores: np.ndarray, labels: Any, tol: float) -> list[tuple[str, str]]:
    """(key, description) of each loss alternative that gives the Keras loss value but
    not the reference's."""
    keras_loss = next((r.keras_value for r in report.rows if r.tensor == "loss"), None)
    ref_loss = next((r.ref_value for r in report.rows if r.tensor == "loss"), None)
    if keras_loss is None or ref_loss is None:
        return []
    lab = np.asarray(labels, dtype=float)
    n = scores.shape[3]
    candidates = [
        (
            "softmax_twice",
            "the scores go through softmax twice (a softmax layer before a softmax loss)",
            _ce(_softmax(scores), lab),
        ),
        (
            "off_by_one_labels",
            "the labels are read 0-based (shifted by one class)",
            _ce(scores, lab, shift=True),
        ),
        ("loss_batch_sum", "the loss is the batch sum (MatConvNet beta25)", _ce(scores, lab) * n),
        ("loss_batch_mean", "the loss is the batch mean (MatConvNet master)", _ce(scores, lab)),
        (
            "loss_pixel_mean",
            "the loss is averaged over pixels too (Keras' cross-entropy)",
            _ce(scores, lab) / (scores.shape[0] * scores.shape[1]),
        ),
    ]
    return [
        (key, text)
        for key, text, value in candidates
        if abs(value - ref_loss) > tol * max(abs(ref_loss), 1e-300)
        and abs(value - keras_loss) <= 1e-9 * max(abs(keras_loss), 1e-300)
    ]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def _ce(scores: np.ndarray, labels: np.ndarray, shift: bool = False) -> float:
    """MatConvNet master softmaxloss of 1 x N labels (label 0 ignored); ``shift`` reads
    the labels as 0-based class indices."""
    n = scores.shape[3]
    lab = np.asarray(labels, dtype=float).reshape(-1)[:n].astype(int)
    p = _softmax(scores)
    total = 0.0
    for j in range(n):
        c = lab[j] + 1 if shift else lab[j]
        if c <= 0 or c > scores.shape[2]:
            continue
        total -= float(np.log(p[:, :, c - 1, j]).sum())
    return total / n
