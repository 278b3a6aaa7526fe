"""Loss layers: ``vl_nnsoftmaxloss`` and ``vl_nnloss`` (all ten loss types), forward and backward.

Both functions come in two dialects, selected by ``dialect``:

* ``"beta25"`` (v1.0-beta25): the loss is the SUM over the batch, derivatives likewise.
* ``"master"`` (commit 1e5ae7b7): loss and derivative are divided by the number of images N.
  ``vl_nnsoftmaxloss`` always divides; ``vl_nnloss`` divides only with ``normalise`` (its
  default) and a 4-D x, i.e. N > 1 (dividing by N = 1 would change nothing anyway). An image
  whose labels are all 0 is ignored but still counts in N.

Losses are summed over spatial positions (and, for the binary losses, over channels).
Labels are MATLAB's: 1-based classes, 0 meaning "ignore this location".

The forward result is a ``1 x 1 x 1 x 1`` array (MATLAB's 1 x 1 scalar, as 4-D).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.mcn.options import McnError, as_4d, float_dtype, is_empty

__all__ = ["vl_nnloss", "vl_nnsoftmaxloss"]

DIALECTS = ("master", "beta25")
CATEGORICAL_LOSSES = ("classerror", "topkerror", "log", "softmaxlog", "mhinge", "mshinge")
BINARY_LOSSES = ("binaryerror", "binarylog", "logistic", "hinge")
LOSSES = CATEGORICAL_LOSSES + BINARY_LOSSES
# Error counts: MatConvNet's derivative of these is an array of zeros.
ERROR_LOSSES = ("classerror", "topkerror", "binaryerror")


# ----------------------------------------------------------------------------- helpers


def _check_dialect(dialect: str) -> str:
    if dialect not in DIALECTS:
        raise McnError(f"Expected dialect to be one of {list(DIALECTS)}. Received dialect={dialect!r}")
    return dialect


def _label_array(c: Any) -> np.ndarray:
    """Labels as float64 (MATLAB stores them as double); they must be finite numbers."""
    try:
        a = np.asarray(c, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise McnError(f"Expected c to be a numeric array of labels. Received c={c!r}") from err
    if a.size and not np.all(np.isfinite(a)):
        raise McnError(f"Expected c to hold finite labels. Received c={c!r}")
    return a


def _per_image(c: np.ndarray, n: int) -> np.ndarray:
    """MATLAB's ``if numel(c) == N, c = reshape(c, [1 1 1 N])``: one label per image."""
    if c.size == n:
        return c.ravel(order="F").reshape(1, 1, 1, n)
    return as_4d(c, "c")


def _categorical_index(labels: np.ndarray, depth: int, minimum: int | None) -> np.ndarray:
    """Zero-based channel index of each label; label <= 0 reads channel 0 (it is weighted out).

    MatConvNet clamps the index with ``max(c - 1, 0)`` (beta25, vl_nnsoftmaxloss) or the
    saturating ``uint64(c - 1)`` (master vl_nnloss); both read class 1 for label 0.
    ``minimum=None``: no lower bound (vl_nnsoftmaxloss ignores every label <= 0).
    """
    low = -np.inf if minimum is None else minimum
    if np.any(labels != np.round(labels)) or np.any(labels > depth) or np.any(labels < low):
        span = f"[{minimum}, {depth}]" if minimum is not None else f"<= {depth}"
        raise McnError(
            f"Expected c to hold integer labels {span} (0 = ignore; x has {depth} channels). "
            f"Received c with values {np.unique(labels)[:10].tolist()}"
        )
    return np.maximum(labels - 1, 0).astype(np.intp)


def _scalar_dzdy(dzdy: Any, dt: np.dtype) -> np.ndarray:
    d = np.asarray(dzdy)
    if d.size != 1 or not np.issubdtype(d.dtype, np.number):
        raise McnError(f"Expected dzdy to be a scalar (the loss is a scalar). Received dzdy.shape={d.shape}")
    return d.reshape(()).astype(dt)


def _exp(a: np.ndarray) -> np.ndarray:
    """``exp`` rounded as MATLAB's (glibc's correctly rounded ``expf``), not NumPy's float32 SIMD one."""
    return np.exp(a.astype(np.float64)).astype(np.float32) if a.dtype == np.float32 else np.exp(a)


def _log(a: np.ndarray) -> np.ndarray:
    """``log`` rounded as MATLAB's (glibc's correctly rounded ``logf``)."""
    return np.log(a.astype(np.float64)).astype(np.float32) if a.dtype == np.float32 else np.log(a)


def _cumulative_sum(a: np.ndarray, axis: int) -> np.ndarray:
    """MATLAB's ``sum(a, axis)`` (keeping the axis), accumulated one element at a time in a's dtype."""
    return np.take(np.add.accumulate(a, axis=axis, dtype=a.dtype), [-1], axis=axis)


def _total(t: np.ndarray, weights: np.ndarray | None, dt: np.dtype) -> np.ndarray:
    """``sum(t(:))`` or the BLAS product ``weights(:)' * t(:)``, column-major as MATLAB, in class dt."""
    t = t.ravel(order="F").astype(dt, copy=False)
    if weights is None:
        return _cumulative_sum(t, 0)
    return np.asarray(np.dot(weights.ravel(order="F").astype(dt, copy=False), t))


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``x(ci)``: the score of each location's label, shape H x W x 1 x N."""
    return np.take_along_axis(x, idx, axis=2)


# ----------------------------------------------------------------------- vl_nnsoftmaxloss


def vl_nnsoftmaxloss(x: np.ndarray, c: Any, dzdy: Any = None, *, dialect: str = "master") -> np.ndarray:
    """Softmax followed by the log loss, summed over locations; mirrors matlab/vl_nnsoftmaxloss.m.

    ``t = xmax + log(sum_k exp(x_k - xmax)) - x_c`` at every location, weighted by
    ``mass = (c > 0) [* c(:,:,2,:)]`` and summed over H, W and N; the derivative is
    ``(softmax(x) - onehot(c)) * mass * dzdy``. ``dialect="master"`` divides both by N.

    Labels ``c``: N values (one per image, applied at every location), H x W x 1 x N, or
    H x W x 2 x N whose second channel holds per-location instance weights; a 1 x 1 x D x N
    array is replicated over H x W. Labels <= 0 are ignored (MatConvNet tests ``c > 0``);
    labels above the number of channels or non-integer labels raise McnError.
    """
    dt = float_dtype(x)
    x = as_4d(x)
    _check_dialect(dialect)
    h, w, depth, n = x.shape
    c = _per_image(_label_array(c), n)
    if c.shape[:2] == (1, 1):
        c = np.tile(c, (h, w, 1, 1))
    if c.shape[:2] != (h, w) or c.shape[3] != n or c.shape[2] not in (1, 2):
        raise McnError(
            f"Expected c to have N={n} elements or shape {(h, w, 1, n)} or {(h, w, 2, n)}. "
            f"Received c.shape={c.shape}"
        )
    labels = c[:, :, :1, :]
    idx = _categorical_index(labels, depth, minimum=None)
    mass = (labels > 0).astype(dt)
    if c.shape[2] == 2:
        mass = mass * c[:, :, 1:2, :].astype(dt)

    xmax = x.max(axis=2, keepdims=True)
    ex = _exp(x - xmax)
    sum_ex = _cumulative_sum(ex, 2)
    if is_empty(dzdy):
        t = xmax + _log(sum_ex) - _take(x, idx)
        # sum(sum(sum(mass .* t, 1), 2), 4)
        y = _cumulative_sum(_cumulative_sum(_cumulative_sum(mass * t, 0), 1), 3)
    else:
        y = ex / sum_ex
        np.put_along_axis(y, idx, _take(y, idx) - 1, axis=2)
        y = y * (mass * _scalar_dzdy(dzdy, dt))
    if dialect == "master":
        y = y / dt.type(n)
    return y


# ------------------------------------------------------------------------------ vl_nnloss


def _real_scalar(value: Any) -> float | None:
    """A finite real scalar (Python number or size-1 array), or None."""
    if isinstance(value, str | bytes) or np.size(value) != 1:
        return None
    try:
        v = float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _loss_options(
    loss: Any, normalise: Any, dialect: str, top_k: Any, threshold: Any
) -> tuple[str, bool, int, float]:
    """Validate vl_nnloss' options; MATLAB-style values (``true``, ``1``, ``2.0``) are accepted."""
    _check_dialect(dialect)
    if not isinstance(loss, str) or loss.lower() not in LOSSES:
        raise McnError(f"Expected loss to be one of {list(LOSSES)}. Received loss={loss!r}")
    flag = _real_scalar(normalise)
    if flag not in (0.0, 1.0):
        raise McnError(f"Expected normalise to be a boolean. Received normalise={normalise!r}")
    if dialect == "beta25" and not flag:
        raise McnError(
            "Expected normalise=True with dialect='beta25' (v1.0-beta25's vl_nnloss has no "
            f"'normalise' option and always sums over the batch). Received normalise={normalise!r}"
        )
    thr = _real_scalar(threshold)
    if thr is None:
        raise McnError(f"Expected threshold to be a finite scalar. Received threshold={threshold!r}")
    k = _real_scalar(top_k)
    if k is None or isinstance(top_k, bool) or k != round(k) or k < 1:
        raise McnError(f"Expected top_k to be an integer >= 1. Received top_k={top_k!r}")
    return loss.lower(), bool(flag), int(k), thr


def _loss_labels(c: Any, shape: tuple[int, ...], loss: str) -> np.ndarray:
    """Labels in form 2 (H x W x 1 x N) or 3 (H x W x C x N, binary losses), as vl_nnloss.m."""
    h, w, depth, n = shape
    c = _label_array(c)
    if c.size == n:
        c = np.tile(c.ravel(order="F").reshape(1, 1, 1, n), (h, w, 1, 1))
    else:
        c = as_4d(c, "c")
    want = 1 if loss in CATEGORICAL_LOSSES else depth
    if c.shape != (h, w, want, n):
        kind = "one label per location" if want == 1 else "one -1/+1 label per element of x"
        raise McnError(
            f"Expected c to have N={n} elements or shape {(h, w, want, n)} ({kind}). "
            f"Received c.shape={c.shape}"
        )
    if loss in BINARY_LOSSES and not np.all(np.isin(c, (-1.0, 0.0, 1.0))):
        raise McnError(
            f"Expected c to hold -1/+1 labels (0 = ignore) for loss={loss!r}. "
            f"Received c with values {np.unique(c)[:10].tolist()}"
        )
    return c


def _instance_weights(
    c: np.ndarray, instance_weights: Any, dt: np.dtype, dialect: str
) -> tuple[np.ndarray | None, np.dtype | None]:
    """The instance weights vl_nnloss applies, and their MATLAB class (None: no weighting).

    Label 0 gives weight 0 (``cast(c ~= 0)``, only if some label is 0); the option is then
    broadcast against the labels (``bsxfun``). The class matters only for topkerror, whose
    unweighted loss is double: a single weight makes it single.
    """
    iw, cls = None, None
    if np.any(c == 0):
        iw, cls = (c != 0).astype(dt), dt
    if not is_empty(instance_weights):
        a = np.asarray(instance_weights)
        if not np.issubdtype(a.dtype, np.number):
            raise McnError(
                f"Expected instance_weights to be numeric. Received instance_weights={instance_weights!r}"
            )
        a4 = as_4d(a, "instance_weights")
        if any(s not in (1, t) for s, t in zip(a4.shape, c.shape, strict=True)):
            raise McnError(
                f"Expected instance_weights to broadcast to the labels' shape {c.shape} "
                f"(e.g. H x W x 1 or H x W x 1 x N). Received instance_weights.shape={a.shape}"
            )
        a_cls = np.dtype(np.float32) if a.dtype == np.float32 else np.dtype(np.float64)
        # master multiplies ones like x (class of x), beta25 ones like c (double).
        base = cls if cls is not None else (dt if dialect == "master" else np.dtype(np.float64))
        cls = np.dtype(np.float32) if np.float32 in (base, a_cls) else np.dtype(np.float64)
        ones = iw if iw is not None else np.ones(c.shape, dtype=np.float64)
        iw = (ones * a4.astype(np.float64)).astype(cls)
    return iw, cls


def vl_nnloss(
    x: np.ndarray,
    c: Any,
    dzdy: Any = None,
    *,
    loss: str = "softmaxlog",
    instance_weights: Any = None,
    class_weights: Any = None,
    threshold: float = 0,
    top_k: int = 5,
    normalise: bool = True,
    dialect: str = "master",
) -> np.ndarray:
    """Categorical and attribute losses; mirrors matlab/vl_nnloss.m (master and v1.0-beta25).

    Per location (categorical losses, label c, scores x) or per element (binary losses, c = +-1):

    * softmaxlog ``xmax + log sum exp(x - xmax) - x_c``; log ``-log x_c``;
      mhinge ``max(0, 1 - x_c)``; mshinge ``max(0, 1 - x_c + max_{q != c} x_q)``;
      classerror ``argmax x != c``; topkerror ``c not among the top_k scores``;
    * binarylog ``-log(c (x - 0.5) + 0.5)``; logistic ``log(1 + exp(-c x))``;
      hinge ``max(0, 1 - c x)``; binaryerror ``sign(x - threshold) != c``.

    The loss is ``sum(weights * t)`` over all locations (and channels for binary losses),
    divided by N in dialect master when ``normalise`` and N > 1. Weights: 0 at label 0, times
    ``instance_weights`` (broadcast to the labels' shape) if given.

    Backward returns ``dzdx`` (x's shape). The error losses (classerror, topkerror,
    binaryerror) have a zero derivative, as in MatConvNet. Quirks mirrored: the ``log``
    derivative divides by ``max(x_c, 1e-8)``; with one class, ``mshinge`` gives a zero loss but
    a derivative of ``+dzdy`` (its runner-up index falls back onto the label's own class).

    ``class_weights`` is accepted and ignored: vl_nnloss declares ``classWeights`` but never
    reads it (in both dialects). ``normalise=False`` with dialect beta25 raises McnError (that
    release has no such option). The result has x's dtype, except topkerror's loss, which is
    float64 as in MatConvNet unless a float32 weighting takes part (then float32).
    """
    del class_weights  # declared by vl_nnloss.m, never used
    dt = float_dtype(x)
    x = as_4d(x)
    loss, normalise, top_k, threshold = _loss_options(loss, normalise, dialect, top_k, threshold)
    h, w, depth, n = x.shape
    c = _loss_labels(c, x.shape, loss)
    idx = None
    if loss in CATEGORICAL_LOSSES:
        idx = _categorical_index(c, depth, minimum=0)
    if loss == "topkerror" and top_k > depth:
        raise McnError(f"Expected top_k <= the number of classes ({depth}). Received top_k={top_k}")
    iw, iw_cls = _instance_weights(c, instance_weights, dt, dialect)
    scale = n if (dialect == "master" and normalise and n > 1) else 1
    cx = c.astype(dt)

    if is_empty(dzdy):
        out_dt = dt
        if loss == "classerror":
            t = (c != x.argmax(axis=2)[:, :, None, :] + 1).astype(dt)
        elif loss == "topkerror":
            # MATLAB's sort(...,'descend') is stable: ties keep channel order.
            top = np.argsort(-x, axis=2, kind="stable")[:, :, :top_k, :] + 1
            t = 1.0 - np.sum(top == c, axis=2, keepdims=True)
            out_dt = iw_cls if iw_cls is not None else np.dtype(np.float64)
        elif loss == "log":
            t = -_log(_take(x, idx))
        elif loss == "softmaxlog":
            xmax = x.max(axis=2, keepdims=True)
            t = xmax + _log(_cumulative_sum(_exp(x - xmax), 2)) - _take(x, idx)
        elif loss == "mhinge":
            t = np.maximum(0, 1 - _take(x, idx))
        elif loss == "mshinge":
            q = x.copy()
            np.put_along_axis(q, idx, -np.inf, axis=2)
            t = np.maximum(0, 1 - _take(x, idx) + q.max(axis=2, keepdims=True))
        elif loss == "binaryerror":
            t = (np.sign(x - dt.type(threshold)) != c).astype(dt)
        elif loss == "binarylog":
            t = -_log(cx * (x - dt.type(0.5)) + dt.type(0.5))
        elif loss == "logistic":
            a = -cx * x
            b = np.maximum(0, a)
            t = b + _log(_exp(-b) + _exp(a - b))
        else:  # hinge
            t = np.maximum(0, 1 - cx * x)
        y = _total(t, iw, out_dt).reshape(1, 1, 1, 1)
        return y / out_dt.type(scale) if scale != 1 else y

    dz = _scalar_dzdy(dzdy, dt)
    if iw is not None:
        dz = dz * iw.astype(dt)
    if loss in ERROR_LOSSES:
        y = np.zeros_like(x)
    elif loss == "log":
        y = np.zeros_like(x)
        np.put_along_axis(
            y, idx, np.broadcast_to(-dz / np.maximum(_take(x, idx), dt.type(1e-8)), idx.shape), axis=2
        )
    elif loss == "softmaxlog":
        ex = _exp(x - x.max(axis=2, keepdims=True))
        y = ex / _cumulative_sum(ex, 2)
        np.put_along_axis(y, idx, _take(y, idx) - 1, axis=2)
        y = dz * y
    elif loss == "mhinge":
        y = np.zeros_like(x)
        np.put_along_axis(y, idx, np.broadcast_to(-dz * (_take(x, idx) < 1), idx.shape), axis=2)
    elif loss == "mshinge":
        q = x.copy()
        np.put_along_axis(q, idx, -np.inf, axis=2)
        qi = q.argmax(axis=2)[:, :, None, :]
        wgt = np.broadcast_to(dz * ((_take(x, idx) - _take(x, qi)) < 1), idx.shape)
        y = np.zeros_like(x)
        # Same order as MATLAB's y(ci) = -W; y(qi) = +W: with one class qi == ci and +W wins.
        np.put_along_axis(y, idx, -wgt, axis=2)
        np.put_along_axis(y, qi, wgt, axis=2)
    elif loss == "binarylog":
        y = -dz / (x + (cx - 1) * dt.type(0.5))
    elif loss == "logistic":
        y = -dz * cx / (1 + _exp(cx * x))
    else:  # hinge
        y = -dz * cx * (cx * x < 1)
    y = y.astype(dt, copy=False)
    return y / dt.type(scale) if scale != 1 else y
