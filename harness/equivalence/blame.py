"""Which layer to blame: the first Divergence of a Report.

Forward rows first (the earliest layer whose output differs), then the backward pass
read from the loss down. A layer whose output no Keras tensor reproduces is not blamed
when MatConvNet's layer, run on a tensor Keras computed after the last match, gives a
tensor Keras computed: the Keras operations in between have no MatConvNet counterpart,
and the layer they follow is to blame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.equivalence.keras_pass import LOSS_TYPES
from harness.equivalence.match import to_mcn_view, usual_view
from harness.equivalence.metrics import measure
from harness.equivalence.report import Divergence
from harness.equivalence.tolerance import tolerance_for
from harness.mcn.net import Net
from harness.mcn.options import as_4d
from harness.mcn.simplenn import vl_simplenn
from harness.translate.weights import to_hwcn

if TYPE_CHECKING:
    from harness.equivalence.keras_pass import KerasSide
    from harness.equivalence.match import Match
    from harness.equivalence.report import Report
    from harness.mcn.simplenn import Res

__all__ = ["SOFTMAX_OPS", "first_divergence"]

# TensorFlow ops a softmax (of any axis, in log form) is computed with
SOFTMAX_OPS = frozenset(
    {"Softmax", "LogSoftmax", "Transpose", "Reshape", "Identity", "Exp", "Log", "Sub", "Max", "Sum"}
    | {"RealDiv", "Squeeze", "ExpandDims", "Neg", "Mean"}
)


def first_divergence(
    report: Report, net: Net, res: list[Res], side: KerasSide, matches: list[Match], mode: str, dialect: str
) -> Divergence | None:
    """Forward divergences point at the earliest layer whose output differs; with a
    clean forward pass, the backward pass is read from the loss down: a derivative that
    differs first at the output of layer i was made wrong by layer i+1; a parameter
    derivative that differs while its layer's output derivative agrees, by that layer.

    A layer whose output no Keras tensor reproduces is not blamed when Keras computes it
    faithfully from a tensor that Keras operations with no MatConvNet counterpart made
    after the last match: those extra operations are, and the layer they follow."""
    names = [l.name for l in net.layers]
    bad = [r for r in report.rows if not r.ok and not r.limitation]
    if not bad:
        return None
    order = {n: i for i, n in enumerate(names)}
    order["input"] = -1
    forward = ("x", "x+", "loss", "output")
    fwd = [r for r in bad if r.tensor in forward or r.tensor.startswith("w{")]
    if fwd:
        r = min(fwd, key=lambda r: order[r.layer])
        culprit = r.layer
        i = order[r.layer]
        if r.tensor == "x" and i < len(matches):
            culprit = _extra_operations_culprit(net, i, res, side, matches, mode, dialect) or culprit
        elif r.tensor == "output" and side.has_loss and len(net.layers) >= 2:
            last = len(net.layers) - 2
            # Keras operations after the last scoring layer are to blame, unless they all
            # belong to a softmax: then the loss's own part differs (a second softmax, a
            # log-softmax, a softmax over the wrong axis)
            if last < len(matches) and matches[last].exact:
                after = _ops_after(
                    side, matches[last].capture, side.runs[last] if last < len(side.runs) else None
                )
                if not after or not all(op in SOFTMAX_OPS for op in after):
                    culprit = names[last]
        return Divergence(layer=r.layer, keras=r.keras, tensor=r.tensor, culprit=culprit)
    r = max(bad, key=lambda r: (order[r.layer], r.tensor.startswith("dzdw")))
    culprit = r.layer
    if r.tensor == "dzdx":
        nxt = order[r.layer] + 1
        culprit = names[nxt] if nxt < len(names) else r.layer
        last = len(net.layers) - 2
        if side.has_loss and order[r.layer] == last and _extra_after(side, matches, last):
            culprit = r.layer  # Keras operations after the last scoring layer
    return Divergence(layer=r.layer, keras=r.keras, tensor=r.tensor, culprit=culprit)


def _ops_after(side: KerasSide, j: int, own: set | None = None) -> list[str]:
    """The TensorFlow ops Keras ran after capture ``j``, outside the Keras layer that
    made it and the layers ``own`` (the run the structure pairs with the same MatConvNet
    layer: a Subsample after a strided conv); a grouped conv's side outputs and function
    calls left out."""
    mine = {side.labels[j].split(":")[0], *(own or ())}
    return [
        op
        for op, label in zip(side.op_types[j + 1 :], side.labels[j + 1 :], strict=True)
        if label.split(":")[0] not in mine and not op.startswith("__")
    ]


def _extra_after(side: KerasSide, matches: list[Match], last: int) -> bool:
    """Keras ran operations of its own (not a softmax) between the last scoring layer's
    output and the model's output."""
    if last >= len(matches) or not matches[last].exact:
        return False
    after = _ops_after(side, matches[last].capture, side.runs[last] if last < len(side.runs) else None)
    return bool(after) and not all(op in SOFTMAX_OPS for op in after)


def _extra_operations_culprit(
    net: Net, i: int, res: list[Res], side: KerasSide, matches: list[Match], mode: str, dialect: str
) -> str | None:
    """The layer before ``i`` when MatConvNet's layer ``i``, run on a tensor Keras
    computed after the last match, gives the tensor Keras computed for layer ``i`` (the
    nearest one, or one of the Keras layers the structure pairs with it, such as a
    conv's subsampling): the operations in between are extra."""
    match = matches[i]
    layer = net.layers[i]
    if match.capture is None or layer.type in ("dropout", *LOSS_TYPES):
        return None
    previous = [k for k in range(i) if matches[k].exact]
    if not previous:
        return None
    last = previous[-1]
    start = matches[last].capture
    out_hwc = tuple(as_4d(res[i + 1].x).shape[:3])
    hwc = tuple(as_4d(res[i].x).shape[:3])
    tol = tolerance_for("float64").forward * 1e3

    own = side.runs[i] if i < len(side.runs) else set()
    n = side.values[start].shape[0]
    # the tensors Keras computed for layer i: its nearest one, and its own run's
    targets = {}
    for k in range(start + 1, len(side.values)):
        view = match.view if k == match.capture else None
        if view is None and side.labels[k].split(":")[0] in own and side.values[k].shape[0] == n:
            view = usual_view(side.values[k].shape, out_hwc)
        if view is not None:
            targets[k] = to_mcn_view(side.values[k], view, out_hwc)
    for j in range(start + 1, max(targets, default=start)):
        if side.labels[j].split(":")[0] in own:
            continue  # the layer's own Keras run (its padding): not an extra operation
        value = side.values[j]
        if value.ndim != 4 or tuple(value.shape[1:]) != hwc:
            continue
        try:
            got = vl_simplenn(
                Net([layer.copy()]), to_hwcn(value), mode=mode, dialect=dialect, lrn_exact=True
            )[-1].x
        except Exception:  # a layer that does not run on it does not explain anything
            continue
        got = as_4d(np.asarray(got, dtype=np.float64))
        if any(k > j and t.shape == got.shape and measure(got, t, tol).ok for k, t in targets.items()):
            return net.layers[last].name
    return None
