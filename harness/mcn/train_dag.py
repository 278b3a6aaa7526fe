"""cnn_train_dag: MatConvNet's DagNN training loop, replayed step by step (examples/cnn_train_dag.m).

``cnn_train_dag_step`` is one batch of processEpoch's 'train' loop (sub-batches evaluated
with ``net.eval(inputs, derOutputs)`` in mode normal, param derivatives accumulated across
sub-batches with ``accumulateParamDers``) followed by ``accumulateGradients``;
``cnn_train_dag`` replays whole epochs over given batches (the shuffling of cnn_train_dag,
``randperm`` after ``rng(epoch + randomSeed)``, is not reproduced: pass the batch order a
MatConvNet run logged), with the validation batches in mode test.

The update, per param p in order (numWorkers = ``num_sub_batches`` on one CPU):

* trainMethod ``gradient``: ``g = der / numWorkers + weightDecay * p.weightDecay * value``,
  skipped unless ``lr * p.learningRate > 0`` or the decay is; SGD with momentum
  ``mom = momentum * mom - g; value += lr * p.learningRate * mom`` (Nesterov:
  ``momentum * mom - g``), or an examples/+solver function (harness.mcn.solvers);
* trainMethod ``average`` (BatchNorm moments): ``value = (1 - p.learningRate) * value +
  p.learningRate / numWorkers / p.fanout * der`` (no global rate, no decay).

``state`` is ``{"solverState": [one entry per param]}``: 0 before the first update, the
momentum array, or a dict for a solver (adam: ``m``, ``v``, ``t``). Statistics are the Loss
layers' running averages (``DagNet.loss_averages``, MatConvNet's ``extractStats``) over the
epoch, and ``num`` the images seen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np

from harness.mcn.dagnn import DagNet
from harness.mcn.options import McnError, is_empty
from harness.mcn.solvers import solver_step
from harness.mcn.train_inputs import batch_indices, resumed_state
from harness.mcn.train_options import TrainOpts, learning_rate_schedule, real_part

__all__ = [
    "accumulate_gradients_dag",
    "cnn_train_dag",
    "cnn_train_dag_step",
    "der_objective",
    "fresh_dag_state",
    "split_batch",
]

DEFAULT_DER_OUTPUTS = {"objective": 1.0}


def fresh_dag_state(net: DagNet) -> dict[str, Any]:
    """processEpoch: ``state.solverState = cell(1, numel(net.params))`` filled with 0."""
    return {"solverState": [0] * len(net.params)}


def _copy_entries(net: DagNet, entries: list) -> list:
    """Each param's solver state entry in the param's shape where it has its size."""
    copied = []
    for p, s in zip(net.params, entries, strict=True):
        if isinstance(s, dict):
            copied.append({k: _shaped(v, p.value) for k, v in s.items()})
        else:
            copied.append(_shaped(s, p.value))
    return copied


def _shaped(s: Any, w: Any) -> Any:
    if np.ndim(s) == 0 or np.size(s) != np.size(w):
        return s
    return np.asarray(s).reshape(np.shape(w))


def split_batch(inputs: Mapping[str, Any], s: int, num: int) -> tuple[dict[str, Any], int]:
    """Sub-batch ``s`` (0-based) of ``num``: images s, s+num, s+2num ... of every input, as
    cnn_train_dag's ``subset(batchStart : numSubBatches : batchEnd)``. An input is split
    along its last (4th) dimension ``N``; a 1 x N row (per-image labels) along its columns.
    Returns the inputs and the number of images."""
    out: dict[str, Any] = {}
    n_images = None
    for name, value in inputs.items():
        a = np.asarray(value)
        if a.ndim == 2 and a.shape[0] == 1:
            n = a.shape[1]
            out[name] = a[:, s::num]
        else:
            a4 = a.reshape(a.shape + (1,) * (4 - a.ndim)) if a.ndim <= 4 else a
            if a4.ndim != 4:
                raise McnError(f"Expected input {name!r} to have at most 4 dimensions. Received {a.shape}")
            n = a4.shape[3]
            out[name] = a4[..., s::num]
        if n_images is None:
            n_images = n
        elif n != n_images:
            raise McnError(
                f"Expected every input to hold the same number of images. Received {name!r} with {n}, "
                f"another with {n_images}"
            )
    return out, len(range(s, n_images or 0, num))


def _taccum(alpha: float, a: Any, beta: float, b: Any, dt: np.dtype) -> Any:
    """vl_taccum: ``alpha * a + beta * b`` in the precision of the parameter."""
    return dt.type(alpha) * a + dt.type(beta) * b


def _der(p: Any, value: np.ndarray, dt: np.dtype) -> np.ndarray:
    """The param's derivative in its value's shape (MATLAB's vl_taccum ignores shapes)."""
    if is_empty(p.der):
        raise McnError(
            f"param '{p.name}': no derivative to update it with (no der_output reaches it); "
            "MatConvNet's vl_taccum fails on the empty derivative"
        )
    d = np.asarray(p.der, dtype=dt)
    if d.size != value.size:
        raise McnError(
            f"param '{p.name}': Expected a derivative of {value.size} elements. Received {d.shape}"
        )
    return d.reshape(value.shape)


def accumulate_gradients_dag(net: DagNet, state: dict, opts: TrainOpts, lr: float, num_workers: int) -> None:
    """cnn_train_dag's accumulateGradients, in place on ``net`` and ``state``."""
    solver_state = state["solverState"]
    for i, p in enumerate(net.params):
        value = np.asarray(p.value)
        dt = value.dtype if value.dtype in (np.float32, np.float64) else np.dtype(np.float64)

        if p.train_method == "average":
            this_lr = float(p.learning_rate)
            p.value = _taccum(1 - this_lr, value, this_lr / num_workers / p.fanout, _der(p, value, dt), dt)
        elif p.train_method == "gradient":
            this_decay = opts.weight_decay * float(p.weight_decay)
            this_lr = lr * float(p.learning_rate)
            if not (this_lr > 0 or this_decay > 0):
                continue
            g = _taccum(1 / num_workers, _der(p, value, dt), this_decay, value, dt)
            if opts.solver is None:
                mom = _taccum(opts.momentum, solver_state[i], -1, g, dt)
                solver_state[i] = mom
                delta = dt.type(opts.momentum) * mom - g if opts.nesterov_update else mom
                p.value = _taccum(1, value, this_lr, delta, dt)
            else:
                p.value, solver_state[i] = solver_step(
                    opts.solver, value, solver_state[i], g, opts.solver_options, this_lr, dt
                )
        else:
            raise McnError(f"Unknown training method {p.train_method!r} for parameter {p.name!r}.")


def _train_batch(
    net: DagNet,
    state: dict,
    inputs: Mapping[str, Any],
    lr: float,
    opts: TrainOpts,
    der_outputs: Mapping[str, Any],
    rng: np.random.Generator | None,
    objectives: list[float] | None = None,
) -> int:
    """One batch of processEpoch in mode 'train' (sub-batches, then the update); in place.
    ``objectives`` (if given) receives each evaluated sub-batch's ``der_objective``."""
    S = opts.num_sub_batches
    num = 0
    for s in range(S):
        sub, n = split_batch(inputs, s, S)
        num += n
        if n == 0:
            continue
        if opts.batch_size is not None and n > opts.batch_size:
            raise McnError(f"Expected at most batch_size={opts.batch_size} images per batch. Received {n}")
        for v in net.vars:  # conserveMemory: derivatives do not outlive their eval
            v.der = None
        net.accumulate_param_ders = s != 0
        net.eval(sub, der_outputs, mode="normal", rng=rng)
        if objectives is not None:
            objectives.append(der_objective(net, der_outputs))
    net.accumulate_param_ders = False
    accumulate_gradients_dag(net, state, opts, lr, S)
    return num


def der_objective(net: DagNet, der_outputs: Mapping[str, Any]) -> float:
    """What an eval with ``der_outputs`` differentiates, from the values it left: the sum
    over its vars of ``der .* value`` (``weight * loss`` for a Loss output); NaN when one
    of them holds no value (its layer did not run)."""
    total = 0.0
    for v, w in der_outputs.items():
        value = net.var(v).value
        if value is None:
            return float("nan")
        total += float(np.sum(np.asarray(w) * np.asarray(value)))
    return total


def _check(net: Any, opts: Any) -> TrainOpts:
    if not isinstance(net, DagNet):
        raise McnError(f"Expected net to be a harness.mcn.dagnn.DagNet. Received net={type(net).__name__}")
    opts = TrainOpts() if opts is None else opts
    if not isinstance(opts, TrainOpts):
        raise McnError(f"Expected opts to be a TrainOpts. Received opts={type(opts).__name__}")
    if opts.dialect != "master":
        raise McnError("Expected opts.dialect 'master': cnn_train_dag is replayed as of commit 1e5ae7b7")
    return opts


def cnn_train_dag_step(
    net: DagNet,
    state: dict | None,
    inputs: Mapping[str, Any],
    *,
    learning_rate: float | None = None,
    opts: TrainOpts | None = None,
    der_outputs: Mapping[str, Any] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[DagNet, dict, dict[str, Any]]:
    """One training step of cnn_train_dag on the batch ``inputs`` (``{'input': x, 'label':
    labels}``, every input holding the batch's N images; ``opts.num_sub_batches`` splits
    them as ``split_batch`` says), then accumulateGradients. ``der_outputs`` defaults to
    cnn_train_dag's ``{'objective': 1}``; ``learning_rate`` to the first entry of
    ``opts.learning_rate``; DropOut masks come from ``rng``.

    Returns ``(net, state, stats)``, new objects (the inputs are not modified): ``stats``
    holds ``num``, every Loss layer's average over this batch (``objective``, ``top1err``
    ...), as cnn_train_dag reports after a first batch, and ``der_objective``: the mean
    over the ``opts.num_sub_batches`` sub-batches of ``der_objective(net, der_outputs)``
    before the update (an empty sub-batch counts 0), what the step differentiated."""
    opts = _check(net, opts)
    lr = float(opts.learning_rate[0]) if learning_rate is None else real_part(learning_rate, "learning_rate")
    net = net.copy()
    state = resumed_state(
        state, fresh_dag_state(net)["solverState"], partial(_copy_entries, net), per="param"
    )
    seen: list[float] = []
    num = _train_batch(net, state, inputs, lr, opts, der_outputs or DEFAULT_DER_OUTPUTS, rng, seen)
    stats = {"num": num, **_stats(net), "der_objective": sum(seen) / opts.num_sub_batches}
    net.reset()
    return net, state, stats


def _stats(net: DagNet) -> dict[str, Any]:
    """extractStats: the running average of every Loss layer without ignoreAverage."""
    skip = {l.outputs[0] for l in net.layers if l.outputs and l.block.get("ignore_average", False)}
    return {k: v for k, v in net.loss_averages().items() if k not in skip}


def _getter(data: Any) -> Callable[[np.ndarray], dict[str, Any]]:
    """``data`` as getBatch: a callable of 1-based indices, or a dict of inputs holding all
    images (sliced like ``imdb.images.data(:,:,:,batch)`` and ``labels(1,batch)``)."""
    if callable(data):
        return data
    if not isinstance(data, Mapping):
        raise McnError(
            f"Expected data to be a dict of inputs or a getBatch callable. Received {type(data).__name__}"
        )

    def get(idx: np.ndarray) -> dict[str, Any]:
        out = {}
        for name, value in data.items():
            a = np.asarray(value)
            n_all = a.shape[1] if a.ndim == 2 and a.shape[0] == 1 else (a.shape[3] if a.ndim == 4 else 1)
            if idx.max() > n_all:
                raise McnError(f"Expected indices 1..{n_all} for input {name!r}. Received {int(idx.max())}")
            out[name] = a[:, idx - 1] if a.ndim == 2 and a.shape[0] == 1 else a[..., idx - 1]
        return out

    return get


def cnn_train_dag(
    net: DagNet,
    data: Mapping[str, Any] | Callable[[np.ndarray], dict[str, Any]],
    opts: TrainOpts | None,
    schedule: Any,
    batches: list,
    *,
    val_batches: list | None = None,
    state: dict | None = None,
    der_outputs: Mapping[str, Any] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[DagNet, dict, dict[str, list[dict[str, Any]]]]:
    """Replay a cnn_train_dag run (examples/cnn_train_dag.m, one CPU).

    ``data`` gives a batch's inputs: a dict ``{'input': images (H x W x C x Nall), 'label':
    labels (1 x Nall)}`` sliced by image, or a callable ``get_batch(indices) -> inputs``
    (1-based indices, like getBatch). ``batches[e]`` lists the training batches of epoch
    e+1 and ``val_batches[e]`` its validation batches (evaluated in mode test after the
    training batches; none when omitted), each an array of 1-based image indices.
    Epoch e uses ``schedule[min(e, end)]`` (None: ``opts.learning_rate``). ``state``
    resumes a run (``load_checkpoint(...).state``).

    Returns ``(net, state, stats)`` with ``stats = {'train': [...], 'val': [...]}``, one
    dict per epoch like ``stats.train(e)`` without ``time``: ``num`` and the average of every
    Loss layer's output (``objective``, ``top1err`` ...). As in cnn_train_dag the net is
    reset (values, derivatives, Loss averages) after each training and validation pass.
    """
    opts = _check(net, opts)
    lrs = opts.learning_rate if schedule is None else learning_rate_schedule(schedule, "schedule")
    if not isinstance(batches, list | tuple):
        raise McnError(
            f"Expected batches to be a list (one entry per epoch). Received {type(batches).__name__}"
        )
    if val_batches is not None and (
        not isinstance(val_batches, list | tuple) or len(val_batches) != len(batches)
    ):
        raise McnError("Expected val_batches to be a list with one entry per epoch, like batches.")
    get = _getter(data)
    der_outputs = der_outputs or DEFAULT_DER_OUTPUTS
    net = net.copy()
    state = resumed_state(
        state, fresh_dag_state(net)["solverState"], partial(_copy_entries, net), per="param"
    )
    history: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for e, entry in enumerate(batches):
        lr = float(lrs[min(e, lrs.size - 1)])
        stats: dict[str, Any] = {"num": 0}
        for idx in batch_indices(entry, f"batches[{e}]"):
            stats["num"] += _train_batch(net, state, get(idx), lr, opts, der_outputs, rng)
            stats.update(_stats(net))
        history["train"].append(stats)
        net.reset()
        stats = {"num": 0}
        entry = val_batches[e] if val_batches is not None else []
        for idx in batch_indices(entry, f"val_batches[{e}]") if entry is not None else []:
            inputs = get(idx)
            for s in range(opts.num_sub_batches):
                sub, n = split_batch(inputs, s, opts.num_sub_batches)
                stats["num"] += n
                if n:
                    net.eval(sub, mode="test", rng=rng)
            stats.update(_stats(net))
        history["val"].append(stats)
        net.reset()
    return net, state, history
