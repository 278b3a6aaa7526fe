"""diagnose's findings on the training set-up, against cnn_train's options in
``net.meta['trainOpts']``: the optimizer (the rules of ``optimizer_rules``, in their
configuration view), the loss, the batch size, the epochs, the metrics, and the
initialisation of the parameter layers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.diagnosis.findings import Finding
from harness.diagnosis.optimizer_rules import optimizer_differences
from harness.mcn.net import Net
from harness.mcn.options import McnError
from harness.mcn.train import TrainOpts

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment

__all__ = ["init_findings", "training_findings"]

# cnn_train's options that shape the update (the others do not concern the optimizer)
_UPDATE_OPTIONS = ("learningRate", "weightDecay", "momentum", "nesterovUpdate", "solver", "solverOpts")


def training_findings(
    net: Net,
    model: keras.Model,
    optimizer: Any,
    *,
    loss: Any = None,
    metrics: list[str] | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    loss_layer: str | None = None,
) -> list[Finding]:
    """The training set-up against ``net.meta['trainOpts']`` (a tidied net): the optimizer
    rules in the configuration view, then the loss, the batch size, the epochs, the metrics.
    ``loss_layer`` names the loss in the findings (default: the net's last layer)."""
    raw = dict(net.meta.get("trainOpts", {}) or {})
    out = []
    if optimizer is not None:
        try:
            opts = TrainOpts.from_matconvnet({k: raw[k] for k in _UPDATE_OPTIONS if k in raw})
        except McnError as e:
            out.append(Finding("training options", "", "optimizer", f"unreadable trainOpts ({e})", "-", "-"))
        else:
            variables = getattr(model, "trainable_weights", None) or [None]
            dtype = str(getattr(variables[0], "dtype", "float32"))
            out += [d.finding() for d in optimizer_differences(optimizer, opts, net, dtype=dtype)]
    if loss is not None:
        out += _loss_findings(net.layers[-1].name if loss_layer is None else loss_layer, loss)
    mcn_batch = raw.get("batchSize")
    if mcn_batch is not None and (batch_size is None or int(batch_size) != int(mcn_batch)):
        out.append(
            Finding(
                "batch size",
                "",
                "fit",
                str(int(mcn_batch)),
                "Keras' default 32 unless passed to fit" if batch_size is None else str(int(batch_size)),
                f"model.fit(..., batch_size={int(mcn_batch)})",
            )
        )
    mcn_epochs = raw.get("numEpochs")
    if mcn_epochs is not None and epochs is not None and int(epochs) != int(mcn_epochs):
        out.append(
            Finding("epochs", "", "fit", str(int(mcn_epochs)), str(int(epochs)), f"epochs={int(mcn_epochs)}")
        )
    if metrics and any(m in ("binary_accuracy",) for m in metrics):
        out.append(
            Finding(
                "metric",
                "",
                "metrics",
                "top-1 error (error_multiclass)",
                "binary_accuracy",
                "'accuracy' (categorical) for a softmax over classes",
            )
        )
    return out


def init_findings(net: Net, model: keras.Model, alignment: Alignment) -> list[Finding]:
    """MatConvNet's init is a Gaussian with the std the filters show; compare Keras' initialiser."""
    out = []
    for pair_ in alignment.pairs:
        layer = net.layers[pair_.index]
        if layer.type != "conv" or not pair_.param_layer:
            continue
        f = np.asarray(layer.weights[0], dtype=np.float64)
        if f.size < 2:
            continue
        std = float(f.std())
        main = model.get_layer(pair_.param_layer)
        init = getattr(main, "kernel_initializer", None)
        if init is None:
            continue
        name = type(init).__name__
        cfg = init.get_config()
        kernel = main.kernel
        shape = tuple(kernel.shape)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
        fan_out = int(np.prod(shape[:-2]) * shape[-1]) if len(shape) > 2 else shape[-1]
        if (
            name in ("RandomNormal", "TruncatedNormal")
            and abs(float(cfg.get("stddev", 0)) - std) <= 0.1 * std
        ):
            continue
        scale = {
            "GlorotUniform": ("uniform", math.sqrt(6 / (fan_in + fan_out))),
            "GlorotNormal": ("normal", math.sqrt(2 / (fan_in + fan_out))),
            "HeNormal": ("normal", math.sqrt(2 / fan_in)),
            "HeUniform": ("uniform", math.sqrt(6 / fan_in)),
            "RandomNormal": ("normal", float(cfg.get("stddev", 0.05))),
        }.get(name)
        kval = (
            name
            if scale is None
            else (
                f"{name}: {'uniform(-a, a), a' if scale[0] == 'uniform' else 'std'} = {scale[1]:.4g}"
                + (f" (std {scale[1] / math.sqrt(3):.4g})" if scale[0] == "uniform" else "")
            )
        )
        out.append(
            Finding(
                "initialisation",
                layer.name,
                main.name,
                f"Gaussian(0, {std:.4g}) (f * randn), biases 0",
                kval,
                f"kernel_initializer=RandomNormal(0.0, {std:.4g}), bias_initializer='zeros'",
            )
        )
    return out


def _loss_findings(last: str, loss: Any) -> list[Finding]:
    """The Keras loss against MatConvNet's loss layer ``last``: reduction and label base."""
    lname = loss if isinstance(loss, str) else getattr(loss, "name", type(loss).__name__)
    if lname not in ("categorical_crossentropy", "sparse_categorical_crossentropy"):
        return []
    out = [
        Finding(
            "loss reduction",
            last,
            "loss",
            "summed over pixels, divided by the batch size (master) or summed (beta25)",
            f"{lname}: mean over the batch and over pixels",
            "identical for 1x1 outputs; for spatial outputs multiply by H*W",
        )
    ]
    if lname == "categorical_crossentropy":
        out.append(
            Finding(
                "label base",
                last,
                "loss",
                "1-based class labels, 0 = ignore",
                "one-hot targets",
                "one-hot of (label - 1); drop or zero-weight label 0",
            )
        )
    return out
