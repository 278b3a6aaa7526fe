"""Static differences between a MatConvNet net and a Keras model, without running them.

This module holds the record, ``Finding`` (what differs, MatConvNet's value, Keras' value
and the fix), and ``diagnose``, which gathers the findings of the rule modules beside it:

- ``layer_rules``: per-layer configuration, from the alignment (groups, kernel size,
  stride, padding, pooling, activations, bnorm epsilon and momentum, dropout);
- ``setup_rules``: the training set-up against cnn_train's options in
  ``net.meta['trainOpts']`` and the layers' multipliers: the optimizer and its schedule
  (read from the compiled model or passed in) through the one table of
  ``optimizer_rules`` that ``compare_training`` shares, the loss, batch size, epochs,
  metrics, and the initialisation.

``dag_findings`` reads a DagNN net as ``layer_rules`` reads a simplenn net (the layers of
its names in the model). ``causes`` re-runs a layer that diverges numerically with the
usual porting mistakes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.dagnn import DagNet
from harness.mcn.net import Net
from harness.mcn.simplenn import vl_simplenn_tidy

if TYPE_CHECKING:
    import keras

__all__ = ["Finding", "diagnose", "fmt_value"]


@dataclass
class Finding:
    kind: str  # e.g. "groups", "optimizer", "initialisation"
    layer: str  # MatConvNet layer name, or "" for training-wide findings
    keras: str  # Keras layer name, or the component ("optimizer", "loss")
    mcn_value: str
    keras_value: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.layer} / {self.keras}" if self.layer else self.keras
        return (
            f"[{self.kind}] {where}: MatConvNet {self.mcn_value}; Keras {self.keras_value}. Fix: {self.fix}"
        )


def fmt_value(v: Any) -> str:
    """A value as a finding prints it: ``%g`` numbers, ``[a b]`` sequences."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple | list):
        return "[" + " ".join(fmt_value(x) for x in v) + "]"
    return str(v)


def diagnose(
    net: Net | DagNet,
    model: keras.Model,
    *,
    optimizer: Any = None,
    loss: Any = None,
    metrics: list | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    input_size: Any = None,
) -> list[Finding]:
    """Static findings: per-layer configuration, initialisation, and the training set-up
    (``optimizer``/``loss``/``metrics`` default to the compiled model's).

    A DagNN ``net`` (``DagNet``) is read through ``dag_findings.dag_layer_findings``: its
    Conv, ConvTranspose, BatchNorm, Pooling, ReLU and DropOut layers against the Keras
    layers of their names (initialisation is not diagnosed there); ``input_size`` then
    sizes its one image input."""
    # the rule modules build Findings of this module: imported once it is complete
    from harness.diagnosis.setup_rules import training_findings

    if isinstance(net, DagNet):
        from harness.diagnosis.dag_findings import dag_layer_findings

        findings, setup_net, loss_layer = dag_layer_findings(net, model, input_size=input_size)
    else:
        net = vl_simplenn_tidy(net)
        findings, setup_net, loss_layer = _simplenn_layer_findings(net, model, input_size), net, None
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if isinstance(net, DagNet) and loss_layer is None:
        loss = None  # no softmaxlog Loss layer to hold the Keras loss against
    elif loss is None:
        loss = getattr(model, "loss", None)
    if metrics is None:
        try:
            metrics = (model.get_compile_config() or {}).get("metrics")
        except Exception:  # an uncompiled model has no compile config
            metrics = None
        metrics = [m if isinstance(m, str) else str(m) for m in (metrics or [])]
    findings += training_findings(
        setup_net,
        model,
        optimizer,
        loss=loss,
        metrics=metrics,
        batch_size=batch_size,
        epochs=epochs,
        loss_layer=loss_layer,
    )
    return findings


def _simplenn_layer_findings(net: Net, model: keras.Model, input_size: Any) -> list[Finding]:
    """The layer and initialisation findings of a tidied simplenn net."""
    from harness.diagnosis.layer_rules import input_shapes, layer_findings
    from harness.diagnosis.setup_rules import init_findings
    from harness.equivalence.align import align

    size = input_size if input_size is not None else net.meta.get("inputSize")
    if size is None:
        size = tuple(int(s) for s in model.inputs[0].shape[1:])
    h, w, c = (int(v) for v in np.asarray(size, dtype=float).ravel()[:3])
    alignment = align(net, model)
    findings = layer_findings(net, model, input_shapes(net, (h, w, c)), alignment=alignment)
    return findings + init_findings(net, model, alignment)
