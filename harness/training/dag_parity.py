"""Training parity for a DagNN net: cnn_train_dag's steps and a Keras model's, side by side
(``dag_train_parity``; ``harness.training.parity.train_parity`` dispatches here once the
options and batches, shared with the simplenn path, are set).

The imdb's training images go into the net's one image input (``dag_inputs``), their
labels into the label input of every Loss layer, in the batches and order of the simplenn
path (``training_plan``, ``epoch_batches``: cnn_train's shuffle per epoch). The steps are
replayed by ``harness.compare_training`` (``compare_training_dag``): the reference is
cnn_train_dag's step in float64, the objective ``der_outputs`` is ``{'objective': 1}``
(cnn_train_dag's default) when a Loss outputs ``objective``, else every softmaxlog or log
Loss with weight 1. The Keras optimizer is chosen as the simplenn path chooses it
(``keras_optimizer``: ``harness.matconvnet_optimizer(net, opts)`` for "matconvnet").

Each step of the result holds the rate, both objectives before the step (the loss per
image) and the largest difference of a param after it (``max_abs`` of the report's weight
rows; rows of a known limitation, BatchNorm's sigma, left out). The batch errors are not
measured (NaN): the replay compares objectives and params, not scores. The report's first
divergence, if any, is in ``settings['first_divergence']``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.equivalence.dag_feed import loss_type
from harness.io.imdb import Imdb
from harness.mcn.dagnn import DagNet
from harness.mcn.options import McnError
from harness.mcn.train_options import TrainOpts
from harness.training.parity import ParityResult, ParityStep, epoch_batches, keras_optimizer, show_progress
from harness.translate.dag_plan import dag_inputs, dag_outputs

if TYPE_CHECKING:
    import keras

    from harness.training.report import TrainingReport

__all__ = ["check_dag_imdb", "dag_train_parity", "dag_training_vars"]

_TRAINED = ("softmaxlog", "log")  # the Loss types compare_training_dag trains on


def dag_training_vars(net: DagNet) -> tuple[str, list[str], dict[str, float]]:
    """``(image input, label inputs, der_outputs)`` of a DagNN net trained on an imdb: its
    one image input, the label input of each Loss layer, and the objective (``objective``
    when a Loss outputs it, else every softmaxlog or log Loss). McnError for a net with
    another number of image inputs, or without such a Loss layer."""
    data = dag_inputs(net)
    if len(data) != 1:
        raise McnError(
            f"the DagNN network has {len(data)} image inputs ({', '.join(data) or 'none'}); training "
            "parity feeds the imdb's images into one"
        )
    losses = [l for l in net.layers if l.type == "dagnn.Loss" and len(l.inputs) > 1]
    trained = [l for l in losses if loss_type(l) in _TRAINED]
    if not trained:
        raise McnError(
            "the DagNN network has no dagnn.Loss layer (softmaxlog or log, of scores and labels) to "
            "train: training parity needs one, its label input taking the imdb's labels"
        )
    outputs = {l.outputs[0] for l in trained}
    der = {"objective": 1.0} if "objective" in outputs else {l.outputs[0]: 1.0 for l in trained}
    inputs = set(net.get_inputs())
    labels = list(dict.fromkeys(l.inputs[1] for l in losses if l.inputs[1] in inputs))
    return data[0], labels, der


def check_dag_imdb(net: DagNet, model: keras.Model, imdb: Imdb, source: str) -> None:
    """Refuse (McnError naming ``source``) images of another size than the model's input
    and labels above the classes of the scores the trained Loss layers read."""
    from harness.io.imdb import check_imdb_labels

    dag_training_vars(net)
    inputs = getattr(model, "inputs", None) or []
    want = tuple(inputs[0].shape[1:]) if len(inputs) == 1 else ()
    got = imdb.images.shape[:3]
    if len(want) == 3 and any(w is not None and int(w) != g for w, g in zip(want, got, strict=True)):
        shown = tuple(None if w is None else int(w) for w in want)
        raise McnError(f"{source}: images are {got} (H, W, C), the model takes {shown}")
    outputs = getattr(model, "outputs", None) or []
    names = dag_outputs(net)
    _, _, der = dag_training_vars(net)
    producer = {l.outputs[0]: l for l in net.layers if l.outputs}
    depths = set()
    for var in der:
        scores = producer[var].inputs[0]
        if scores in names and names.index(scores) < len(outputs):
            depth = outputs[names.index(scores)].shape[-1]
            depths.add(None if depth is None else int(depth))
    if len(depths) == 1 and None not in depths:
        check_imdb_labels(imdb, depths.pop(), source)


def dag_train_parity(
    net: DagNet,
    model: keras.Model,
    imdb: Imdb,
    result: ParityResult,
    *,
    optimizer: Any,
    opts: TrainOpts,
    train: np.ndarray,
    progress=None,
) -> ParityResult:
    """``train_parity`` of a DagNN net, from where the two paths part: ``result`` holds the
    run's settings (epochs, batch_size, steps_per_epoch, dtype, seed), ``opts`` the
    training options (its learning rate the schedule), ``train`` the 0-based indices of
    the training images. Fills ``result`` with the steps of the replay and returns it.
    The model must be ``to_keras_dag(net)`` or have its layer names (params load by name)."""
    from harness.training.replay import compare_training

    data, labels, der = dag_training_vars(net)
    settings = result.settings
    batch, steps = settings["batch_size"], settings["steps_per_epoch"]
    schedule = np.asarray(opts.learning_rate, dtype=float).ravel()
    opt = keras_optimizer(net, model, optimizer, opts, schedule, steps)
    batches, epoch_of = [], []
    for e in range(1, settings["epochs"] + 1):
        for idx in epoch_batches(train, batch, steps, seed=settings["seed"], epoch=e):
            batches.append({data: imdb.images[..., idx], **{v: imdb.labels[:, idx] for v in labels}})
            epoch_of.append(e)
    t0 = time.perf_counter()
    report = compare_training(
        net, model, opt, batches, opts, epochs_of_steps=epoch_of, dtype=settings["dtype"], der_outputs=der
    )
    show_progress(len(batches), len(batches), t0, sys.stderr if progress is None else progress)
    result.steps = _steps(report)
    settings["optimizer"] = type(opt).__name__
    settings.update(reference="cnn_train_dag", der_outputs=der, first_divergence=report.first_divergence)
    return result


def _steps(report: TrainingReport) -> list[ParityStep]:
    """One ParityStep per step of the report: the rate, both objectives, and the largest
    difference of a param after the step (absolute and relative), known limitations aside."""
    out = []
    for s in report.steps:
        rows = [r for r in report.rows_at(s["step"]) if r.kind == "weight" and not r.limitation]
        diff, rel = (_worst([getattr(r, f) for r in rows]) for f in ("max_abs", "max_rel"))
        step = (s["step"], s["epoch"], s["learning_rate"], s["objective"], s["keras_objective"])
        out.append(ParityStep(*step, math.nan, math.nan, diff, rel))
    return out


def _worst(values: list[float]) -> float:
    """The largest value; NaN when one is NaN (a param gone non-finite); 0 for none."""
    return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)
