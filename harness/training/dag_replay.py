"""compare_training for DagNN nets: cnn_train_dag's steps (NumPy reference) against a Keras
training set-up, step by step (``compare_training_dag``; ``harness.compare_training``
dispatches here when given a ``DagNet``).

Both sides start from the net's params (loaded into the model by ``dag_weights_to_keras``)
and see the same batches: dicts of input vars as ``DagNet.eval`` takes them (``{'input':
x, 'label': labels}``, ``x`` ``H x W x C x N``). The reference is
``harness.mcn.train_dag.cnn_train_dag_step`` in float64 with ``learningRate(min(epoch,
end))``; the Keras step (``keras_step.keras_apply_step``) is what ``model.fit`` does, its
loss MatConvNet's: the ``der_outputs``-weighted sum (cnn_train_dag's default
``{'objective': 1}``) of the seeded Loss layers, each computed on the model output that is
the Loss's scores (``dag_outputs``) with the batch's labels (softmaxlog on scores, log on
probabilities; summed over pixels, divided by N unless the Loss's opts set normalise
false). The objective compared is that sum before the step (with S sub-batches, the mean
of the S sub-batch objectives, which is what cnn_train_dag's update differentiates:
``der / numWorkers``; the Keras side divides an unnormalised loss by S to match).

After each step every param (per-param learning_rate and weight_decay are the DagNN
params', ``harness.matconvnet_optimizer(net)`` applies them) and its optimizer state is
compared in MatConvNet's layout, with the rows, scales and tolerances of
``compare_training`` (``state.step_items``/``compare_step``; one row per param, named by
the param, ``w{j}`` its position in the first layer using it).

BatchNorm moments (trainMethod ``average``): cnn_train_dag updates ``[mu sigma]`` as
``(1 - lr) m + lr / fanout * der``, the der being the batch moments; Keras'
BatchNormalization (momentum ``1 - lr``, as ``to_keras_dag`` sets it) follows the same
formula for the mean, which is compared; sigma is ``SIGMA_LIMITATION`` (Keras averages the
variance). A moments param shared by several BatchNorm layers is averaged once per step
over the layers in MatConvNet and updated once per call in Keras:
``SHARED_MOMENTS_LIMITATION``.

Not supported (McnError): DropOut (the two sides cannot share masks), der_outputs on vars
that are not a softmaxlog/log Loss's output, Loss layers with instance or class weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.diagnosis.optimizer_rules import optimizer_differences
from harness.equivalence.dag_feed import loss_type
from harness.equivalence.keras_pass import keras_batch_loss, with_dtype
from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.dagnn_blocks import parse_opts
from harness.mcn.options import McnError, as_4d
from harness.mcn.train_dag import cnn_train_dag_step
from harness.mcn.train_options import TrainOpts
from harness.training.dag_state import dag_keras_params, dag_reference_value, optimizer_view
from harness.training.keras_step import current_learning_rate, keras_apply_step
from harness.training.replay import (
    check_set_up,
    describe_solver,
    epochs_for,
    finish_report,
    rate_of,
    step_record,
)
from harness.training.report import TrainingReport, TrainingRow
from harness.training.state import (
    SIGMA_LIMITATION,
    compare_step,
    initial_values,
    objective_row,
    state_reader,
    step_items,
)
from harness.translate.build import TranslationError
from harness.translate.dag_build import dag_inputs, dag_outputs, dag_weights_to_keras
from harness.translate.weights import to_nhwc

if TYPE_CHECKING:
    import keras

__all__ = ["DAG_TRAINING_CONVENTION", "SHARED_MOMENTS_LIMITATION", "compare_training_dag"]

DAG_TRAINING_CONVENTION = (
    "cnn_train_dag: the objective is the der_outputs-weighted sum of the Loss outputs (softmaxlog "
    "or log, summed over pixels, divided by the batch size N unless normalise is false); Keras "
    "differentiates the same sum of MatConvNet's losses on the model's outputs"
)
SHARED_MOMENTS_LIMITATION = (
    "BatchNorm moments shared by several layers: cnn_train_dag averages the layers' batch "
    "moments into one update per step (divided by the param's fanout), Keras' "
    "BatchNormalization updates its moving statistics once per call"
)
# vl_nnloss options a seeded Loss may carry (MATLAB name -> keyword)
_LOSS_OPTIONS = {
    "instanceweights": "instance_weights",
    "classweights": "class_weights",
    "normalise": "normalise",
    "threshold": "threshold",
    "topk": "top_k",
}
_PROBABILITIES = {"softmaxlog": False, "log": True}  # the Loss types Keras computes


@dataclass
class _Seed:
    """A seeded Loss layer: its der_output weight and how Keras computes it."""

    layer: DagLayer
    weight: float
    output: int  # index of its scores among the model's outputs
    normalise: bool
    probabilities: bool


def compare_training_dag(
    net: DagNet,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    batches: list,
    train_opts: TrainOpts | None = None,
    *,
    epochs_of_steps: Any = None,
    der_outputs: Mapping[str, Any] | None = None,
    dtype: str = "float64",
    tolerance: float | None = None,
) -> TrainingReport:
    """Train the DagNN ``net`` (cnn_train_dag, NumPy) and ``model`` (with ``optimizer``) on
    the same ``batches`` from the same params and compare them after every step.

    ``batches``: a list of dicts of the net's input vars (data ``H x W x C x N``, labels
    ``1 x N`` or per pixel, 1-based). ``der_outputs`` None is cnn_train_dag's
    ``{'objective': 1}``. ``epochs_of_steps``, ``dtype`` and ``tolerance`` as in
    ``compare_training``. The params are loaded into ``model`` (a ``to_keras_dag`` model,
    or one whose layers have its names; overwritten) and ``optimizer`` is built on its
    variables (pass a fresh one: ``harness.matconvnet_optimizer(net)`` is cnn_train_dag's
    exact update). Returns a TrainingReport (rows per step, param and tensor; first
    divergence)."""
    if not isinstance(net, DagNet):
        raise McnError(f"Expected a DagNN net (harness.mcn.dagnn.DagNet). Received {type(net).__name__}")
    opts = TrainOpts() if train_opts is None else train_opts
    opts, tol = check_set_up(opts, optimizer, batches, dtype, tolerance, what="dicts of input vars")
    if opts.dialect != "master":
        raise McnError(f"Expected train_opts.dialect 'master' (cnn_train_dag). Received {opts.dialect!r}")
    ref = net.copy()
    for p in ref.params:
        if isinstance(p.value, np.ndarray) and p.value.dtype.kind == "f":
            p.value = p.value.astype(np.float64)
    dropout = [l.name for l in ref.layers if l.type == "dagnn.DropOut"]
    if dropout:
        raise McnError(
            "Expected a net without DropOut layers (the two sides cannot share masks during training). "
            f"Received DropOut layers {dropout}"
        )
    seeds = _seeds(ref, {"objective": 1.0} if der_outputs is None else der_outputs)
    data_vars = dag_inputs(ref)
    batches = [_batch(ref, b, k, data_vars, seeds) for k, b in enumerate(batches)]
    epochs = epochs_for(epochs_of_steps, len(batches), optimizer)
    rates = np.asarray(opts.learning_rate, dtype=np.float64).ravel()

    model = with_dtype(model, dtype)
    if len(getattr(model, "outputs", None) or dag_outputs(ref)) != len(dag_outputs(ref)):
        raise McnError(
            f"Expected a model with the net's {len(dag_outputs(ref))} output(s) "
            f"({', '.join(dag_outputs(ref))}, as to_keras_dag builds it). Received {len(model.outputs)}"
        )
    try:
        dag_weights_to_keras(ref, model)
    except TranslationError as err:
        raise McnError(
            f"Could not load the net's params into the model by layer name ({err}): train a model "
            "built by to_keras_dag, or with its layer names"
        ) from None
    params, problems, notes = dag_keras_params(ref, model)
    shared = {p.name for p in ref.params if p.train_method == "average" and p.fanout > 1}
    limitations = [SIGMA_LIMITATION] if any(p.role == "variance" for p in params) else []
    limitations += [SHARED_MOMENTS_LIMITATION] if shared & {p.layer for p in params} else []
    if opts.num_sub_batches > 1:
        notes.append(
            f"numSubBatches {opts.num_sub_batches}: cnn_train_dag averages the sub-batches' derivatives, "
            "Keras differentiates the whole batch (the same only for equal sub-batches and no BatchNorm)"
        )
    state_of, state_note = state_reader(optimizer, opts)
    notes += [state_note] if state_note else []
    view, pairs = optimizer_view(ref, model)
    differences = optimizer_differences(
        optimizer, opts, view, rate=rate_of(rates, epochs[0]), dtype=dtype, model=model, alignment=pairs
    )
    notes += [d.note for d in differences]

    rows: list[TrainingRow] = []
    steps: list[dict] = []
    state = None
    prev = initial_values(params, lambda p: dag_reference_value(ref, p))
    der = {s.layer.outputs[0]: s.weight for s in seeds}
    for k, (inputs, epoch) in enumerate(zip(batches, epochs, strict=True)):
        step, lr = k + 1, rate_of(rates, epoch)
        ref, state, ref_stats = cnn_train_dag_step(
            ref, state, inputs, learning_rate=lr, opts=opts, der_outputs=der
        )
        objective = ref_stats["der_objective"]  # before the update, from the step's own forward pass
        k_lr = current_learning_rate(optimizer)
        feed, loss = _keras_side(inputs, data_vars, seeds, dtype, opts.num_sub_batches)
        k_obj = keras_apply_step(model, optimizer, feed, loss)
        steps.append(step_record(step, epoch, lr, k_lr, objective, k_obj))
        rows.append(objective_row("+".join(der), "dagnn.Loss", objective, k_obj, tol, step, epoch))
        items = step_items(
            params,
            lambda p, net=ref: dag_reference_value(net, p),
            lambda p, net=ref, st=state: st["solverState"][net.param_index(p.layer)],
            state_of,
            k_lr,
        )
        for row in compare_step(items, tol, prev, step, epoch):
            if row.layer in shared and not row.ok and not row.limitation:
                row.limitation = SHARED_MOMENTS_LIMITATION
            rows.append(row)
    return finish_report(
        rows,
        steps,
        notes,
        optimizer=optimizer,
        reference="cnn_train_dag",
        dtype=dtype,
        dialect="master",
        convention=DAG_TRAINING_CONVENTION,
        solver=describe_solver(opts),
        tolerance=tol,
        alignment_problems=problems,
        limitations=limitations,
    )


def _seeds(net: DagNet, der_outputs: Any) -> list[_Seed]:
    """The Loss layers ``der_outputs`` seeds, checked: each var the output of a softmaxlog
    or log Loss (scores, labels) whose scores are a model output; a scalar weight."""
    if not isinstance(der_outputs, Mapping) or not der_outputs:
        raise McnError(f"Expected der_outputs to be a dict {{var: weight}}. Received {der_outputs!r}")
    producer = {v: layer for layer in net.layers for v in layer.outputs}
    outputs = dag_outputs(net)
    seeds = []
    for var, weight in der_outputs.items():
        layer = producer.get(var)
        if layer is None or layer.type != "dagnn.Loss":
            raise McnError(
                f"der_outputs: Expected var {var!r} to be the output of a dagnn.Loss layer (the Keras side "
                "computes MatConvNet's loss of the model's outputs; name the net's loss var with "
                "der_outputs={'<var>': 1})"
            )
        where = f"der_outputs: layer '{layer.name}' (dagnn.Loss)"
        kind = loss_type(layer)
        options = parse_opts(layer.block.get("opts", []), _LOSS_OPTIONS, "vl_nnloss")
        if kind not in _PROBABILITIES or len(layer.inputs) != 2:
            raise McnError(
                f"{where}: Expected a softmaxlog or log loss of (scores, labels). Received {kind!r}"
            )
        if "instance_weights" in options or "class_weights" in options:
            raise McnError(f"{where}: instance or class weights are not supported")
        if layer.inputs[0] not in outputs:
            raise McnError(f"{where}: its scores '{layer.inputs[0]}' are not an output of the model")
        if np.size(weight) != 1:
            raise McnError(
                f"der_outputs[{var!r}]: Expected a scalar weight. Received shape {np.shape(weight)}"
            )
        normalise = bool(np.asarray(options.get("normalise", True)).ravel()[0])
        seeds.append(
            _Seed(
                layer,
                float(np.asarray(weight).ravel()[0]),
                outputs.index(layer.inputs[0]),
                normalise,
                _PROBABILITIES[kind],
            )
        )
    return seeds


def _batch(net: DagNet, b: Any, k: int, data_vars: list[str], seeds: list[_Seed]) -> dict[str, np.ndarray]:
    """``batches[k]`` checked: a dict of the net's input vars holding the data inputs and
    the seeded Losses' labels (float64 for the reference)."""
    if not isinstance(b, Mapping):
        raise McnError(f"Expected batches[{k}] to be a dict of input vars. Received {type(b).__name__}")
    unknown = [str(v) for v in b if v not in net.get_inputs()]
    if unknown:
        raise McnError(
            f"Expected batches[{k}] to name input vars of the net ({', '.join(net.get_inputs())}). "
            f"Received {', '.join(unknown)}"
        )
    needed = data_vars + [s.layer.inputs[1] for s in seeds]
    missing = [v for v in dict.fromkeys(needed) if v not in b]
    if missing:
        raise McnError(f"Expected batches[{k}] to hold input var(s) {', '.join(missing)}")
    out = {}
    for name, value in b.items():
        a = np.asarray(value)
        if name in data_vars and not np.issubdtype(a.dtype, np.floating):
            raise McnError(f"Expected batches[{k}][{name!r}] to be a float array. Received dtype={a.dtype}")
        out[name] = a.astype(np.float64)
    return out


def _keras_side(inputs: dict, data_vars: list[str], seeds: list[_Seed], dtype: str, num: int):
    """The model's inputs (NHWC tensors, one or a list) and its data loss for this batch."""
    import tensorflow as tf

    xs = [as_4d(inputs[v], v) for v in data_vars]
    n = xs[0].shape[3]
    feed = [tf.constant(to_nhwc(x.astype(dtype))) for x in xs]
    labels = [inputs[s.layer.inputs[1]] for s in seeds]

    def loss(out):
        outs = out if isinstance(out, list | tuple) else [out]
        total = None
        for seed, lab in zip(seeds, labels, strict=True):
            dialect = "master" if seed.normalise else "beta25"
            term = keras_batch_loss(outs[seed.output], lab, n, dialect, seed.probabilities)
            scale = seed.weight / (1 if seed.normalise else num)  # cnn_train_dag: der / numWorkers
            if scale != 1.0:
                term = term * tf.constant(scale, dtype=term.dtype)
            total = term if total is None else total + term
        return total

    return (feed[0] if len(feed) == 1 else feed), loss
