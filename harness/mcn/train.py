"""cnn_train: MatConvNet's SGD loop, replayed step by step (examples/cnn_train.m).

Owns the sub-batch split and gradient accumulation of ``processEpoch``, the training
statistics (objective, ``error_multiclass``) and the state that carries from step to step;
the parameter update (``accumulateGradients`` and the ``examples/+solver`` functions) is
harness.mcn.solvers, the options (``TrainOpts``) harness.mcn.train_options. Both
dialects: ``"master"`` (commit 1e5ae7b7) divides gradients by the number of workers
(= ``numSubBatches`` on one CPU), ``"beta25"`` (tag v1.0-beta25) by the batch size.

The shuffling of cnn_train (``randperm`` after ``rng(epoch + randomSeed)``) is not
reproduced: ``cnn_train`` here replays a given batch order, e.g. the one a MatConvNet run
logged. ``state`` is a dict ``{"solverState": [[...] per parameter] per layer}`` exactly
like cnn_train's ``state`` (and ``load_checkpoint(...).state``): each entry is ``0`` before
the first update, the momentum array for SGD, the ``g_sqr`` array for rmsprop/adagrad, or a
dict mirroring the MATLAB struct (adam: ``m``, ``v``, ``t``; adadelta: ``g_sqr``,
``delta_sqr``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d, float_dtype, is_empty
from harness.mcn.simplenn import vl_simplenn, vl_simplenn_tidy
from harness.mcn.solvers import SOLVER_DEFAULTS, SOLVERS, accumulate_gradients, check_multipliers
from harness.mcn.train_inputs import batch_indices, resumed_state
from harness.mcn.train_options import (
    ERROR_FUNCTIONS,
    ERROR_LABELS,
    TrainOpts,
    learning_rate_schedule,
    real_part,
)

__all__ = [
    "ERROR_FUNCTIONS",
    "SOLVERS",
    "SOLVER_DEFAULTS",
    "TrainOpts",
    "check_multipliers",
    "cnn_train",
    "cnn_train_step",
    "error_multiclass",
    "fresh_state",
    "learning_rate_schedule",
    "prepare_net",
    "real_part",
    "train_batch",
]

# ------------------------------------------------------------------------- preparation


def prepare_net(net: Net, dtype: Any = None) -> Net:
    """cnn_train's initialisation (returns a new Net): ``vl_simplenn_tidy``, then every
    layer without ``learningRate``/``weightDecay`` gets ``ones(1, numel(weights))`` (biases
    and bnorm moments included), and ``net.layers{end-1}.precious = 1``. With ``dtype``
    the weights are cast to it (MatConvNet needs data and weights of one class)."""
    net = vl_simplenn_tidy(net)
    if len(net.layers) < 2:
        raise McnError(
            "Expected net to have at least 2 layers (predictions, then a loss). "
            f"Received {len(net.layers)} layer(s)"
        )
    for layer in net.layers:
        ones = np.ones((1, len(layer.weights)))
        if not layer.has("learning_rate"):
            layer.learning_rate = ones.copy()
        if not layer.has("weight_decay"):
            layer.weight_decay = ones.copy()
        if dtype is not None:
            layer.weights = [np.asarray(w).astype(dtype, copy=False) for w in layer.weights]
    net.layers[-2].precious = True
    return net


def fresh_state(net: Net) -> dict[str, Any]:
    # processEpoch: state.solverState{i} = cell(1, numel(weights)) filled with 0.
    return {"solverState": [[0] * len(layer.weights) for layer in net.layers]}


def _copy_entries(net: Net, solver_state: list) -> list:
    """Each layer's solver state entries, one per weight, in their weights' shapes."""
    copied = []
    for i, (entry, layer) in enumerate(zip(solver_state, net.layers, strict=True)):
        entry = entry if isinstance(entry, list) else ([] if is_empty(entry) else [entry])
        if len(entry) != len(layer.weights):
            raise McnError(
                f"Expected state['solverState'][{i}] to have one entry per weight of layer '{layer.name}' "
                f"({len(layer.weights)}). Received {len(entry)}"
            )
        where = f"state['solverState'][{i}]"
        copied.append(
            [
                {k: _shaped(v, w, f"{where}[{j}][{k!r}]") for k, v in s.items()}
                if isinstance(s, dict)
                else _shaped(s, w, f"{where}[{j}]")
                for j, (s, w) in enumerate(zip(entry, layer.weights, strict=True))
            ]
        )
    return copied


def _shaped(s: Any, w: Any, name: str) -> Any:
    """A state array in its weight's shape. A checkpoint stores MATLAB's shapes (a 1 x K
    bias, a C x 2 moments array); the weights may carry the 4-D form of the same elements,
    and NumPy would broadcast the two into a wrong shape."""
    if np.ndim(s) == 0:
        return s
    a = np.asarray(s)
    if a.size != np.size(w):
        raise McnError(
            f"Expected {name} to have {np.size(w)} elements (its weight's). Received shape={a.shape}"
        )
    return a.reshape(np.shape(w))


# -------------------------------------------------------------------------- statistics


def error_multiclass(predictions: np.ndarray, labels: Any) -> np.ndarray:
    """cnn_train's ``error_multiclass``: ``[top-1 errors; top-5 errors]`` of a batch as a
    float32 2-vector (MatConvNet computes ``mass = single(labels > 0)``, so the sums are
    single). Classes are ranked by ``sort(predictions, 3, 'descend')`` (stable: ties keep
    channel order; NaN first); labels are one per image or ``H x W x 1 x N``, with an optional
    second channel of instance weights; label 0 counts nothing."""
    p = as_4d(predictions, "predictions")
    n = p.shape[3]
    lab = np.asarray(labels, dtype=np.float64)
    lab = lab.ravel(order="F").reshape(1, 1, 1, n) if lab.size == n else as_4d(lab, "labels")
    mass = (lab[:, :, :1, :] > 0).astype(np.float32)
    if lab.shape[2] == 2:
        mass = mass * lab[:, :, 1:2, :].astype(np.float32)
        lab = lab[:, :, :1, :]
    try:
        np.broadcast_shapes(p.shape, lab.shape)
    except ValueError:
        raise McnError(
            f"Expected labels broadcastable against predictions {p.shape}. Received labels.shape={lab.shape}"
        ) from None
    key = np.where(np.isnan(p), -np.inf, -p.astype(np.float64))
    ranked = np.argsort(key, axis=2, kind="stable") + 1.0
    m = min(5, p.shape[2])
    wrong = ranked[:, :, :m, :] != lab
    top1 = np.sum(mass * wrong[:, :, :1, :], dtype=np.float32)
    top5 = np.sum(mass * wrong.min(axis=2, keepdims=True), dtype=np.float32)
    return np.array([top1, top5], dtype=np.float32)


def _error_binary(predictions: np.ndarray, labels: Any) -> np.ndarray:
    # sum of a logical array: a double in MATLAB.
    return np.array([np.sum(np.asarray(predictions) * np.asarray(labels) < 0)], dtype=np.float64)


def _batch_errors(opts: TrainOpts, res: list, labels: Any, n: int) -> np.ndarray:
    """One sub-batch's column ``[objective; errors]`` as processEpoch builds it. The
    concatenation ``[double; single]`` is single, so with error_multiclass the objective
    is rounded to float32 here and all statistics accumulate in single."""
    loss = np.asarray(res[-1].x, dtype=np.float64)
    objective = np.sum(n * loss) if opts.dialect == "master" else np.sum(loss)
    if opts.error_function == "multiclass":
        return np.concatenate([[np.float32(objective)], error_multiclass(res[-2].x, labels)])
    if opts.error_function == "binary":
        return np.concatenate([[objective], _error_binary(res[-2].x, labels)])
    return np.array([objective])


# -------------------------------------------------------------------------------- step


def _labels_of(labels: Any, n: int) -> tuple[np.ndarray, bool]:
    """Labels as given to the loss layer; True when they are one per image (a row)."""
    try:
        lab = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError):
        raise McnError(f"Expected labels to be a numeric array. Received labels={labels!r}") from None
    if lab.ndim <= 2 and lab.size == n:
        return lab.reshape(1, n), True
    lab = as_4d(lab, "labels")
    if lab.shape[3] != n:
        raise McnError(
            f"Expected labels with one entry per image (N={n}) or shape H x W x K x N. "
            f"Received labels.shape={np.shape(labels)}"
        )
    return lab, False


def train_batch(
    net: Net,
    state: dict,
    x: np.ndarray,
    labels: Any,
    lr: float,
    opts: TrainOpts,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray | None, int, float]:
    """One iteration of processEpoch's batch loop in 'train' mode, in place on a prepared
    net and state. Returns the summed statistics column (None for no images), the number
    of images and the objective of the batch (float64, without the float32 rounding)."""
    dt = float_dtype(x, "x")
    x = as_4d(x, "x")
    n = x.shape[3]
    if n == 0:
        raise McnError(f"Expected x to hold at least one image. Received x.shape={x.shape}")
    if opts.batch_size is not None and n > opts.batch_size:
        raise McnError(
            f"Expected at most batch_size={opts.batch_size} images per step. Received x with N={n} images"
        )
    lab, per_image = _labels_of(labels, n)
    S = opts.num_sub_batches
    errors = None
    dzdw: list[list[Any]] | None = None
    total = 0.0
    num = 0
    for s in range(S):
        # batch = subset(batchStart : numSubBatches : batchEnd), batchStart = t + (s-1)
        idx = np.arange(s, n, S)
        num += idx.size
        if idx.size == 0:
            continue
        lab_s = lab[:, idx] if per_image else lab[..., idx]
        res = vl_simplenn(net, x[..., idx], 1.0, lab_s, mode="normal", dialect=opts.dialect, rng=rng)
        if dzdw is None:
            dzdw = [list(r.dzdw) for r in res[:-1]]
        else:
            # vl_simplenn 'accumulate': res(i).dzdw{j} = res(i).dzdw{j} + dzdw{j}
            dzdw = [
                [a + b for a, b in zip(acc, r.dzdw, strict=True)] for acc, r in zip(dzdw, res, strict=False)
            ]
        column = _batch_errors(opts, res, lab_s, idx.size)
        errors = column if errors is None else errors + column
        loss = np.asarray(res[-1].x, dtype=np.float64)
        total += float(np.sum(idx.size * loss) if opts.dialect == "master" else np.sum(loss))
    check_multipliers(net, [len(d) for d in dzdw])
    accumulate_gradients(net, dzdw, state, opts, lr, n, dt)
    return errors, num, total / num


def cnn_train_step(
    net: Net,
    state: dict | None,
    x: np.ndarray,
    labels: Any,
    *,
    learning_rate: float | None = None,
    opts: TrainOpts | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Net, dict, float]:
    """One SGD step of cnn_train on the batch ``x`` (``H x W x C x N``) with ``labels``.

    Mirrors examples/cnn_train.m (processEpoch's batch loop in 'train' mode, then
    accumulateGradients). The net is prepared as cnn_train does (``prepare_net``: tidy,
    missing learningRate/weightDecay multipliers filled with ones, weights cast to x's
    dtype); ``state`` None starts every solver state at 0. With ``num_sub_batches`` S,
    sub-batch s (1-based) takes images s, s+S, s+2S, ...; each runs vl_simplenn forward and
    backward (``dzdy = 1``, 'normal' mode) and the parameter derivatives are summed. The
    update is ``accumulateGradients`` (``harness.mcn.solvers.accumulate_gradients``). ``learning_rate``
    defaults to the first entry of ``opts.learning_rate``. Dropout masks come from ``rng``.

    Returns ``(net, state, objective)``, new objects (the inputs are not modified);
    ``objective`` is the batch's loss per image as cnn_train reports it (master: sum over
    sub-batches of N_s * loss_s, divided by N; beta25: the summed losses divided by N),
    in float64 (cnn_train's own statistics round it to float32, see ``cnn_train``).
    """
    opts = TrainOpts() if opts is None else opts
    if not isinstance(opts, TrainOpts):
        raise McnError(f"Expected opts to be a TrainOpts. Received opts={type(opts).__name__}")
    lr = float(opts.learning_rate[0]) if learning_rate is None else real_part(learning_rate, "learning_rate")
    dt = float_dtype(x, "x")
    net = prepare_net(net, dt)
    state = resumed_state(state, fresh_state(net)["solverState"], partial(_copy_entries, net), per="layer")
    _, _, objective = train_batch(net, state, x, labels, lr, opts, rng)
    return net, state, objective


# ------------------------------------------------------------------------------- loop


def cnn_train(
    net: Net,
    images: np.ndarray,
    labels: Any,
    opts: TrainOpts | None,
    schedule: Any,
    batches: list,
    *,
    state: dict | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Net, dict, dict[str, np.ndarray]]:
    """Replay a cnn_train run (examples/cnn_train.m, training set only).

    ``images`` is ``H x W x C x Nall``, ``labels`` ``1 x Nall`` (or ``H x W x K x Nall``);
    ``batches[e]`` lists the batches of epoch e+1, each an array of 1-based image indices
    (the order cnn_train's shuffling produced, e.g. a golden file's ``outputs.batches``),
    or is itself one index array. Epoch e uses ``schedule[min(e, end)]`` as learning rate
    (``schedule`` None: ``opts.learning_rate``). ``state`` resumes from a previous run or a
    checkpoint (``load_checkpoint(...).state``).

    Returns ``(net, state, stats)``; ``stats`` mirrors ``[stats.train.<field>]``:
    ``objective`` and, with error_function 'multiclass', ``top1err`` and ``top5err`` per
    epoch as float32 arrays, since cnn_train accumulates them in single precision (the
    objective of each sub-batch is rounded to float32 and the running sums are float32);
    'binary' gives ``binerr`` and, like 'none', float64 statistics; ``num`` the images
    per epoch.
    """
    opts = TrainOpts() if opts is None else opts
    if not isinstance(opts, TrainOpts):
        raise McnError(f"Expected opts to be a TrainOpts. Received opts={type(opts).__name__}")
    lrs = opts.learning_rate if schedule is None else learning_rate_schedule(schedule, "schedule")
    dt = float_dtype(images, "images")
    images = as_4d(images, "images")
    n_all = images.shape[3]
    lab_all, per_image = _labels_of(labels, n_all)
    if not isinstance(batches, list | tuple):
        raise McnError(f"Expected batches to be a list (one entry per epoch). Received batches={batches!r}")
    net = prepare_net(net, dt)
    state = resumed_state(state, fresh_state(net)["solverState"], partial(_copy_entries, net), per="layer")
    labels_names = ERROR_LABELS[opts.error_function]
    history: dict[str, list] = {"objective": [], **{k: [] for k in labels_names}, "num": []}
    for e, entry in enumerate(batches):
        lr = float(lrs[min(e, lrs.size - 1)])
        errors = None
        num = 0
        for batch in batch_indices(entry, f"batches[{e}]", n_all=n_all):
            idx = batch - 1
            lab = lab_all[:, idx] if per_image else lab_all[..., idx]
            col, n, _ = train_batch(net, state, images[..., idx], lab, lr, opts, rng)
            errors = col if errors is None else errors + col
            num += n
        if errors is None:
            raise McnError(f"Expected batches[{e}] to hold at least one batch. Received {entry!r}")
        averaged = errors / errors.dtype.type(num)
        for k, name in enumerate(["objective", *labels_names]):
            history[name].append(averaged[k])
        history["num"].append(num)
    stats_dtype = np.float32 if opts.error_function == "multiclass" else np.float64
    stats = {k: np.asarray(v, dtype=np.int64 if k == "num" else stats_dtype) for k, v in history.items()}
    return net, state, stats
