"""Training parity: the reference and a Keras model trained side by side.

Both start from the net's weights and see the same batches in the same order (cnn_train's
order: per epoch e, the training set shuffled by ``RandomState(seed + e)``). The reference
runs cnn_train's step (harness.mcn.train) with the net's training options; the Keras
model runs its own optimizer (the compiled one, or ``harness.matconvnet_optimizer``).
After every step both losses, both batch errors (top-1, measured on the batch before the
step, as cnn_train does) and the largest weight difference are recorded.

A DagNN net (``DagNet``) is trained by ``harness.training.dag_parity`` (``train_parity``
dispatches): cnn_train_dag's steps replayed by ``harness.compare_training``. Both paths
share the batches (``training_plan``, ``epoch_batches``), the choice of the Keras
optimizer (``keras_optimizer``) and the progress line (``show_progress``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.io.imdb import Imdb
from harness.io.text import json_dumps, safe_text
from harness.mcn.net import Net
from harness.mcn.options import McnError
from harness.mcn.train import TrainOpts, fresh_state, prepare_net, train_batch

if TYPE_CHECKING:
    import keras

__all__ = [
    "ParityResult",
    "ParityStep",
    "check_plot_path",
    "epoch_batches",
    "keras_optimizer",
    "plot_parity",
    "show_progress",
    "train_parity",
    "training_plan",
]


@dataclass
class ParityStep:
    step: int
    epoch: int
    learning_rate: float
    loss_ref: float
    loss_keras: float
    error_ref: float  # top-1 error on the batch, before the step (NaN: not measured)
    error_keras: float
    max_weight_diff: float  # max |w_keras - w_ref| over every parameter, after the step
    max_weight_rel: float  # that, divided by the largest |w_ref| of the same tensor


@dataclass
class ParityResult:
    steps: list[ParityStep] = field(default_factory=list)
    val_error_ref: list[float] = field(default_factory=list)  # per epoch
    val_error_keras: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The table ``mcn-harness train-parity`` prints: a row per step (a batch error not
        measured is ``-``), the DagNN replay's verdict, the validation error per epoch."""
        out = [
            f"{'step':>5} {'epoch':>5} {'lr':>8} {'loss ref':>10} {'loss keras':>10} {'err ref':>8} "
            f"{'err keras':>9} {'max |dw|':>10}"
        ]
        for s in self.steps:
            out.append(
                f"{s.step:>5} {s.epoch:>5} {s.learning_rate:>8.2g} {s.loss_ref:>10.6f} {s.loss_keras:>10.6f} "
                f"{_percent(s.error_ref, 8)} {_percent(s.error_keras, 9)} {s.max_weight_diff:>10.2e}"
            )
        if self.settings.get("reference") == "cnn_train_dag":
            head = "DagNN: cnn_train_dag replayed by harness.compare_training (batch errors not measured)"
            first = self.settings.get("first_divergence")
            out.append(
                f"{head}: every param agrees after every step"
                if not first
                else safe_text(
                    f"{head}: first divergence at step {first['step']}: '{first['layer']}' "
                    f"{first['tensor']} (relative error {first['max_rel']:.2g})"
                )
            )
        if self.val_error_ref:
            out.append(
                "validation error per epoch: reference "
                + " ".join(f"{100 * v:.1f}%" for v in self.val_error_ref)
                + "; Keras "
                + " ".join(f"{100 * v:.1f}%" for v in self.val_error_keras)
            )
        return out

    def to_json(self) -> str:
        """Strict JSON; a non-finite number (a loss gone to NaN) is null."""
        return json_dumps(
            {
                "settings": self.settings,
                "steps": [asdict(s) for s in self.steps],
                "val_error_ref": self.val_error_ref,
                "val_error_keras": self.val_error_keras,
            }
        )


def _percent(rate: float, width: int) -> str:
    """A batch error in a column of ``width``: ``12.5%``, or ``-`` when not measured (NaN)."""
    return f"{'-':>{width}}" if np.isnan(rate) else f"{100 * rate:>{width - 1}.1f}%"


def show_progress(done: int, total: int, t0: float, stream) -> None:
    """A progress bar on a terminal ``stream``; elsewhere one line once ``done == total``."""
    if stream is None or not getattr(stream, "isatty", lambda: False)():
        if stream is not None and done == total:
            stream.write(f"training: {total} steps in {time.perf_counter() - t0:.1f} s\n")
        return
    width = 30
    filled = int(width * done / max(total, 1))
    eta = (time.perf_counter() - t0) / max(done, 1) * (total - done)
    stream.write(
        f"\rtraining [{'#' * filled}{'.' * (width - filled)}] {done}/{total} steps, eta {eta:5.0f} s"
    )
    if done == total:
        stream.write("\n")
    stream.flush()


def _errors(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 error of H x W x K x N (or N x K) scores against 1-based labels (per image)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2:
        s = s.T[None, None]
    pred = s.reshape(-1, s.shape[2], s.shape[3]).sum(axis=0).argmax(axis=0) + 1
    lab = np.asarray(labels).ravel()
    keep = lab > 0
    return float(np.mean(pred[keep] != lab[keep])) if keep.any() else 0.0


def train_parity(
    net: Net,
    model: keras.Model,
    imdb: Imdb,
    *,
    epochs: int = 3,
    batch_size: int | None = None,
    optimizer: Any = "model",
    train_opts: TrainOpts | None = None,
    dtype: str = "float32",
    dialect: str = "master",
    seed: int = 0,
    max_steps_per_epoch: int | None = None,
    progress=None,
) -> ParityResult:
    """Train both sides for ``epochs`` epochs of ``imdb``'s training set (set 1).

    ``optimizer``: "model" (the model's compiled optimizer; a MatConvNet optimizer is
    rebuilt for this run's steps per epoch), "matconvnet" (harness.matconvnet_optimizer),
    or a Keras optimizer. ``train_opts`` default to the net's ``meta.trainOpts``.
    A DagNN net (``DagNet``, ``dialect`` master) is trained by
    ``dag_parity.dag_train_parity``: cnn_train_dag replayed by ``compare_training``.
    """
    from harness.equivalence.align import align
    from harness.equivalence.keras_pass import with_dtype
    from harness.mcn.dagnn import DagNet
    from harness.training.keras_step import ends_in_probabilities, keras_train_step
    from harness.training.state import keras_params, keras_variable_value, reference_value
    from harness.translate.weights import WeightMap

    if dtype not in ("float32", "float64"):
        raise McnError(f"Expected dtype 'float32' or 'float64'. Received dtype={dtype!r}")
    dag = isinstance(net, DagNet)
    if dag and dialect != "master":
        raise McnError(f"Expected dialect 'master' for a DagNN net (cnn_train_dag). Received {dialect!r}")
    np_dtype = np.float32 if dtype == "float32" else np.float64
    raw_opts = dict(net.meta.get("trainOpts", {}) or {})
    opts = train_opts or TrainOpts.from_matconvnet(raw_opts, dialect=dialect)
    train, batch, n_batches = training_plan(
        imdb, raw_opts, epochs=epochs, batch_size=batch_size, max_steps_per_epoch=max_steps_per_epoch
    )
    opts = replace(opts, batch_size=batch)
    schedule = np.asarray(opts.learning_rate, dtype=float).ravel()
    result = ParityResult(
        settings={
            "epochs": epochs,
            "batch_size": batch,
            "steps_per_epoch": n_batches,
            "dtype": dtype,
            "dialect": dialect,
            "optimizer": "",  # the class of the Keras optimizer, once chosen
            "train_images": int(train.size),
            "seed": seed,
        }
    )
    if dag:
        from harness.training.dag_parity import dag_train_parity

        return dag_train_parity(
            net, model, imdb, result, optimizer=optimizer, opts=opts, train=train, progress=progress
        )

    ref = prepare_net(net, np_dtype)
    state = fresh_state(ref)
    model = with_dtype(model, dtype)
    alignment = align(ref, model)
    weights = WeightMap(ref, model, alignment, dtype, load=True)
    if weights.problems:
        raise McnError(f"cannot load the net's weights into the model: {weights.problems[0]}")
    params = keras_params(ref, model, alignment, weights)
    opt = keras_optimizer(ref, model, optimizer, opts, schedule, n_batches)
    probabilities = ends_in_probabilities(model, alignment)
    result.settings["optimizer"] = type(opt).__name__
    total = epochs * n_batches
    t0 = time.perf_counter()
    step = 0
    for e in range(1, epochs + 1):
        lr = float(schedule[min(e, schedule.size) - 1])
        for idx in epoch_batches(train, batch, n_batches, seed=seed, epoch=e):
            x = imdb.images[..., idx].astype(np_dtype)
            labels = imdb.labels[:, idx]
            scores_k = np.asarray(model(x.transpose(3, 0, 1, 2), training=False))
            err_k = _errors(scores_k.transpose(1, 2, 3, 0) if scores_k.ndim == 4 else scores_k, labels)
            errors, num, loss_r = train_batch(ref, state, x, labels, lr, opts, None)
            err_r = float(errors[1]) / num if errors is not None and errors.size > 1 else float("nan")
            loss_k = keras_train_step(
                model, opt, x, labels, dialect=dialect, probabilities=probabilities, dtype=dtype
            )
            diffs = []
            for p in params:
                if p.role == "variance":
                    continue
                a, ref_w = keras_variable_value(p), reference_value(ref, p)
                got, _ = p.to_mcn(a) if p.groups is not None else (a.reshape(ref_w.shape), None)
                d = float(np.max(np.abs(got - ref_w))) if ref_w.size else 0.0
                diffs.append((d, d / max(float(np.max(np.abs(ref_w))), 1e-30)))
            step += 1
            result.steps.append(
                ParityStep(
                    step,
                    e,
                    lr,
                    float(loss_r),
                    float(loss_k),
                    err_r,
                    err_k,
                    max((d for d, _ in diffs), default=0.0),
                    max((r for _, r in diffs), default=0.0),
                )
            )
            show_progress(step, total, t0, sys.stderr if progress is None else progress)
        val = imdb.subset(2) - 1
        if val.size:
            xv = imdb.images[..., val].astype(np_dtype)
            from harness.mcn.simplenn import vl_simplenn

            body = Net(ref.layers[:-1], ref.meta)
            result.val_error_ref.append(
                _errors(vl_simplenn(body, xv, mode="test")[-1].x, imdb.labels[:, val])
            )
            sk = np.asarray(model(xv.transpose(3, 0, 1, 2), training=False))
            result.val_error_keras.append(
                _errors(sk.transpose(1, 2, 3, 0) if sk.ndim == 4 else sk, imdb.labels[:, val])
            )
    return result


def training_plan(
    imdb: Imdb, raw_opts: dict, *, epochs: int, batch_size: int | None, max_steps_per_epoch: int | None
) -> tuple[np.ndarray, int, int]:
    """``(train, batch, steps)``: the 0-based indices of the imdb's training images (set 1),
    the batch size (``batch_size``, else trainOpts' batchSize, else 256) and the steps per
    epoch (at most ``max_steps_per_epoch``), checked."""
    if epochs < 1:
        raise McnError(f"Expected epochs >= 1. Received epochs={epochs}")
    batch = int(batch_size or raw_opts.get("batchSize", 256))
    if batch < 1:
        raise McnError(f"Expected batch_size >= 1. Received batch_size={batch}")
    train = imdb.subset(1) - 1
    if train.size == 0:
        raise McnError("Expected training images (set 1) in the imdb. Received none")
    n_batches = int(np.ceil(train.size / batch))
    if max_steps_per_epoch:
        n_batches = min(n_batches, int(max_steps_per_epoch))
    return train, batch, n_batches


def epoch_batches(
    train: np.ndarray, batch: int, steps: int, *, seed: int, epoch: int
) -> Iterator[np.ndarray]:
    """The image indices of each of the ``steps`` batches of 1-based ``epoch``: cnn_train's
    order, the training set shuffled by ``RandomState(seed + epoch)``."""
    order = train[np.random.RandomState(seed + epoch).permutation(train.size)]
    for b in range(steps):
        yield order[b * batch : (b + 1) * batch]


def keras_optimizer(net: Any, model: keras.Model, optimizer: Any, opts: TrainOpts, schedule, steps: int):
    """The Keras side's optimizer for ``optimizer``: "matconvnet" (and "model" when the
    model was compiled with one) ``harness.matconvnet_optimizer(net, opts)`` on this run's
    ``schedule`` and ``steps`` per epoch; "model" a fresh copy of the compiled optimizer;
    or the Keras optimizer given."""
    import keras

    from harness.translate.optim import MatConvNetOptimizer, matconvnet_optimizer

    if optimizer == "matconvnet" or (
        optimizer == "model" and isinstance(getattr(model, "optimizer", None), MatConvNetOptimizer)
    ):
        return matconvnet_optimizer(net, opts, schedule=schedule, steps_per_epoch=steps)
    if optimizer == "model":
        opt = getattr(model, "optimizer", None)
        if opt is None:
            raise McnError("Expected a compiled model (optimizer='model') or optimizer='matconvnet'")
        return opt.__class__.from_config(opt.get_config())  # a fresh copy: no state from earlier runs
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    raise McnError(f"Expected optimizer 'model', 'matconvnet' or a Keras optimizer. Received {optimizer!r}")


def check_plot_path(path: str) -> str:
    """The image format of ``path`` (its suffix), if matplotlib can write it; else an
    McnError naming the formats it can (checked before training, not after)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    fmt = os.path.splitext(str(path))[1].lower().lstrip(".")
    if fmt not in supported:
        raise McnError(
            f"--plot {str(path)!r}: expected an image file name ending in one of "
            f"{', '.join('.' + f for f in sorted(supported))}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise McnError(f"--plot {str(path)!r}: no such directory ({directory})")
    return fmt


def plot_parity(result: ParityResult, path: str, *, title: str = "MatConvNet reference vs Keras") -> None:
    """Loss and batch error per step for both sides, and the largest weight difference
    per step on a log scale; written as PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s.step for s in result.steps]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(steps, [s.loss_ref for s in result.steps], "-", label="MatConvNet (reference)", lw=2)
    axes[0].plot(steps, [s.loss_keras for s in result.steps], "--", label="Keras", lw=2)
    axes[0].set(title="training loss per step", xlabel="step", ylabel="loss per image")
    axes[1].plot(steps, [100 * s.error_ref for s in result.steps], "-", label="MatConvNet (reference)", lw=2)
    axes[1].plot(steps, [100 * s.error_keras for s in result.steps], "--", label="Keras", lw=2)
    axes[1].set(title="batch top-1 error per step", xlabel="step", ylabel="error (%)")
    diffs = [max(s.max_weight_diff, 1e-17) for s in result.steps]
    axes[2].semilogy(steps, diffs, "-o", ms=3, color="C3")
    axes[2].set(title="largest weight difference", xlabel="step", ylabel="max |w_keras - w_ref|")
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fmt = check_plot_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".plot.", suffix=f".{fmt}", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90, format=fmt)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    plt.close(fig)
