"""The rows of a DagNN comparison (``compare_dag``), var by var, and its first divergence.

Rows (``Report``/``Row``, the records of ``compare``):

- per data input var: its derivative (``dzdx``);
- per layer output var, in execution order: its value (``x``) and derivative (``dzdx``);
  ``x+`` when a Keras layer with no DagNN counterpart changes the var before a layer
  reads it;
- per param, after the first layer that uses it: with ``weights="model"`` its value
  (``w{j}``, Keras layout) and its derivative (``dzdw{j}``, Keras layout; a param shared
  by several layers is one Keras variable, whose gradient is already the sum);
- the model's output against the Loss's score var, and the loss.

Each row has a place in execution order and a culprit (a DagNN layer name); the first
Divergence: forward, the earliest var that differs, blamed on the layer computing it (or,
for a Keras layer inserted after it, on the layer it follows); else the backward pass read
from the loss down: a var derivative that differs first is blamed on the layer reading the
var, a param derivative that differs while its layer's output derivative agrees on that
layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.equivalence.dag_feed import LOSS
from harness.equivalence.report import Divergence, Row
from harness.equivalence.rows import (
    bias_scale,
    extra_layer_row,
    filter_scale,
    gain_scale,
    match_note,
    measure_row,
    own_output,
)
from harness.mcn.options import as_4d
from harness.translate.build import TranslationError, keras_name
from harness.translate.dag_build import dag_keras_layers, scale_weights
from harness.translate.weights import conv_to_keras, to_hwcn, to_nhwc

if TYPE_CHECKING:
    from harness.equivalence.keras_pass import KerasSide
    from harness.equivalence.match import Match
    from harness.equivalence.tolerance import Tolerance
    from harness.mcn.dagnn import DagLayer, DagNet

__all__ = ["DagRows", "param_variables"]


def param_variables(net: DagNet, model, notes: list[str]) -> dict[str, tuple]:
    """param name -> (Keras variable, layout, Keras layer name), for the params a Keras
    layer of the name ``dag_keras_layers`` gives holds (BatchNorm moments: None); what
    cannot be found is said in ``notes``."""
    try:
        names = dag_keras_layers(net)
    except TranslationError as err:
        notes.append(f"param derivatives not compared: {err}")
        return {}
    out: dict[str, tuple] = {}
    missing = []
    for i in net.execution_order():
        layer = net.layers[i]
        if not layer.params or any(p in out for p in layer.params):
            continue
        try:
            klayer = model.get_layer(names.get(layer.name, keras_name(layer.name)))
        except ValueError:
            missing.append(layer.name)
            continue
        if layer.type in ("dagnn.Conv", "dagnn.ConvTranspose"):
            held = [getattr(klayer, "kernel", None), getattr(klayer, "bias", None)]
            for p, v, how in zip(layer.params, held, ("filters", "vector"), strict=False):
                out[p] = (v, how, klayer.name)
        elif layer.type == "dagnn.BatchNorm":
            held = [getattr(klayer, "gamma", None), getattr(klayer, "beta", None), None]
            for p, v in zip(layer.params, held, strict=False):
                out[p] = (v, "vector", klayer.name)
        elif layer.type == "dagnn.Scale":
            held = list(klayer.trainable_variables)
            for p, v in zip(scale_weights(layer), held, strict=False):
                out[p] = (v, "scale", klayer.name)
    if missing:
        notes.append(
            f"no Keras layer named after DagNN layer(s) {', '.join(missing[:6])}: "
            "their params are not compared"
        )
    return out


class DagRows:
    """The rows of one DagNN comparison, each with its place in execution order and its
    culprit. ``layers`` are the compared layers (Loss layers left out) in execution order,
    ``matches`` the Keras capture found for each one's output var, ``params`` the
    ``param_variables``."""

    def __init__(
        self,
        net: DagNet,
        layers: list[DagLayer],
        matches: list[Match],
        side: KerasSide,
        tol: Tolerance,
        params: dict[str, tuple],
        *,
        backward: bool,
    ):
        self.net, self.layers, self.matches, self.side, self.tol = net, layers, matches, side, tol
        self.params, self.backward = params, backward
        self.rows: list[Row] = []
        self.where: dict[int, tuple[float, str]] = {}  # id(row) -> (place in execution order, culprit)
        self.readers = _readers([net.layers[i] for i in net.execution_order()])
        # a derivative that cancels to ~0 holds rounding noise of the derivatives it was summed
        # from: its scale is the largest derivative later in the execution order
        self.downstream = [0.0] * (len(layers) + 1)
        for k in range(len(layers) - 1, -1, -1):
            d = net.var(layers[k].outputs[0]).der if backward else None
            m = float(np.max(np.abs(d), initial=0.0)) if d is not None and np.size(d) else 0.0
            self.downstream[k] = max(self.downstream[k + 1], m if np.isfinite(m) else 0.0)

    def add(self, row: Row | None, at: float, culprit: str) -> None:
        """Keep ``row`` (None: nothing) at place ``at``, blamed on layer ``culprit``."""
        if row is not None:
            self.rows.append(row)
            self.where[id(row)] = (at, culprit)

    def input_rows(self, grads: dict[str, tuple[np.ndarray | None, str]]) -> None:
        """The derivative of each data var, against ``grads`` (var -> the gradient of the
        Keras input it feeds, N x H x W x C, and that input's label)."""
        if not self.backward:
            return
        for v, (g, label) in grads.items():
            ref = self.net.var(v).der
            if ref is None:
                continue
            this = {"layer": v, "type": "input", "keras": label, "tolerance": self.tol.backward}
            row = measure_row(
                **this,
                tensor="dzdx",
                ref=ref,
                got=None if g is None else to_hwcn(g),
                scale=self.downstream[0],
            )
            self.add(row, -1.0, (self.readers.get(v) or [v])[0])

    def var_rows(self, refs: list[np.ndarray], paired: set[str], *, weights: str) -> None:
        """Per compared layer: its params' values (``weights="model"``), its output var's
        value, any extra Keras layer changing it, its derivative and its params'
        derivatives."""
        net, side, tol = self.net, self.side, self.tol
        seen_params: set[str] = set()
        for k, (layer, match) in enumerate(zip(self.layers, self.matches, strict=True)):
            var = layer.outputs[0]
            this = {"layer": var, "type": layer.type}
            for j, p in enumerate(layer.params):
                if weights == "model" and p not in seen_params and p in self.params:
                    self.add(self._param_row(p, layer, j, derivative=False), k - 0.5, layer.name)
            hwc = tuple(as_4d(refs[k]).shape[:3])
            got = grad = None
            klabel = "-"
            if match.capture is not None:
                got, grad = side.in_mcn_layout(match, hwc)
                klabel = side.labels[match.capture]
            note = "; ".join(s for s in (f"output of layer '{layer.name}'", match_note(match)) if s)
            x_row = measure_row(
                **this, keras=klabel, tensor="x", ref=refs[k], got=got, tolerance=tol.forward, note=note
            )
            self.add(x_row, k, layer.name)
            self.add(self._extra_row(k, paired, this), k + 0.25, layer.name)
            ref_der = net.var(var).der if self.backward else None
            if ref_der is not None:
                if grad is None and match.capture is not None and side.grads[match.capture] is None:
                    grad = np.zeros_like(np.asarray(ref_der, dtype=np.float64))  # no path to the loss
                d_row = measure_row(
                    **this,
                    keras=klabel,
                    tensor="dzdx",
                    ref=ref_der,
                    got=grad,
                    tolerance=tol.backward,
                    scale=self.downstream[k + 1],
                )
                self.add(d_row, k + 0.5, (self.readers.get(var) or [layer.name])[0])
            if self.backward:
                for j, p in enumerate(layer.params):
                    if p not in seen_params and p in self.params:
                        self.add(self._param_row(p, layer, j, derivative=True), k, layer.name)
            seen_params.update(layer.params)

    def output_rows(self, outputs: list[str], losses: list[DagLayer]) -> None:
        """Each of the model's outputs against the net's output var in its place, and the
        loss (the sum of the seeded Loss layers' outputs)."""
        side, tol = self.side, self.tol
        pos = {l.name: k for k, l in enumerate(self.layers)}
        producer = {l.outputs[0]: l for l in self.layers}
        for out_var, got, label in zip(outputs, side.outputs, side.output_labels, strict=True):
            out_layer = producer.get(out_var)
            ref_out = as_4d(self.net.var(out_var).value)
            last = len(self.layers) - 1 if out_layer is None else pos[out_layer.name]
            culprit = (
                out_layer.name if out_layer is not None else (self.layers[-1].name if self.layers else "-")
            )
            row = measure_row(
                layer=out_var,
                type="output",
                keras=label,
                tensor="output",
                ref=ref_out,
                got=own_output(ref_out, got, label, tol),
                tolerance=tol.forward,
                note="the model's output",
            )
            self.add(row, last + 0.75, culprit)
        if losses:
            ref_loss = sum(float(np.asarray(self.net.var(l.outputs[0]).value).ravel()[0]) for l in losses)
            row = measure_row(
                layer="+".join(l.outputs[0] for l in losses),
                type=LOSS,
                keras="loss",
                tensor="loss",
                ref=ref_loss,
                got=side.loss,
                tolerance=tol.forward,
                note="sum of " + ", ".join(f"'{l.name}'" for l in losses),
            )
            self.add(row, len(self.layers) + 1.0, losses[0].name)

    def first_divergence(self) -> Divergence | None:
        """Forward: the earliest differing var (or param value) in execution order; else the
        backward pass read from the loss down (the latest differing derivative)."""
        bad = [r for r in self.rows if not r.ok and not r.limitation]
        if not bad:
            return None
        forward = [r for r in bad if r.tensor in ("x", "x+", "output", "loss") or r.tensor.startswith("w{")]
        if forward:
            r = min(forward, key=lambda r: self.where[id(r)][0])
        else:
            r = max(bad, key=lambda r: self.where[id(r)][0])
        return Divergence(layer=r.layer, keras=r.keras, tensor=r.tensor, culprit=self.where[id(r)][1])

    def _extra_row(self, k: int, paired: set[str], this: dict) -> Row | None:
        """A Keras layer with no DagNN counterpart that changes var ``k`` (matched exactly)
        before a DagNN layer reads it: a leaf Keras layer's output of the same shape,
        computed from the var's tensor, that feeds the tensor compared with a reader's
        output (the first such layer)."""
        side, matches, m = self.side, self.matches, self.matches[k]
        if not m.exact or m.capture is None:
            return None
        a = m.capture
        var = self.layers[k].outputs[0]
        matched = {x.capture for x in matches if x.exact}
        targets = [
            matches[r].capture
            for r, l in enumerate(self.layers)
            if var in l.inputs and matches[r].capture is not None and matches[r].capture != a
        ]
        obs = side.obs
        for c in range(a + 1, len(side.values)):
            cap = obs.captures[c]
            if cap.layer is None or id(cap.layer) not in side.leaf_ids or c in matched:
                continue
            if side.labels[c] in paired:
                continue  # the Keras layer named after a DagNN layer: its counterpart, not an extra
            if side.values[c].shape != side.values[a].shape or cap.inside is not None:
                continue
            ta, tc = obs.captures[a].tensor, cap.tensor
            if not obs.feeds(ta, tc) or not any(obs.feeds(tc, obs.captures[b].tensor) for b in targets):
                continue
            row = extra_layer_row(side, a, c, self.tol, this, noun="var", net="the DagNN net")
            if row is not None:
                return row
        return None

    def _param_row(self, p: str, layer: DagLayer, j: int, *, derivative: bool) -> Row | None:
        """Param ``p`` (``j``-th of ``layer``), in Keras' layout: its value against the
        Keras variable's (``w{j}``), or its derivative against the variable's gradient
        (``dzdw{j}``: a param shared by several layers is one variable, whose gradient is
        already the sum of theirs)."""
        variable, how, klabel = self.params[p]
        ref = self.net.param(p).der if derivative else self.net.param(p).value
        if variable is None or ref is None:
            return None
        note = f"param '{p}' of layer '{layer.name}', Keras layout"
        if derivative:
            users = [
                self.net.layers[i].name for i in self.net.execution_order() if p in self.net.layers[i].params
            ]
            if len(users) > 1:
                note += f"; shared by {', '.join(users)}: derivatives summed"
            g = self.side.obs.weight_grads.get(id(variable))
            got = None if g is None else np.asarray(g, dtype=np.float64)
            scale = sum(
                _der_scale(self.net, self.net.layer(u), i) for u in users for i in _indexes(self.net, u, p)
            )
        else:
            got, scale = np.asarray(variable.numpy(), dtype=np.float64), 0.0
        ref = _keras_layout(ref, how)
        if got is not None and ref.size == got.size:
            ref = ref.reshape(got.shape)
        return measure_row(
            layer=p,
            type="param",
            keras=klabel,
            tensor=f"{'dzdw' if derivative else 'w'}{{{j + 1}}}",
            ref=ref,
            got=got,
            tolerance=self.tol.parameter if derivative else self.tol.forward,
            same_layout=True,
            note=note,
            scale=scale if np.isfinite(scale) else 0.0,
        )


def _readers(layers: list[DagLayer]) -> dict[str, list[str]]:
    """var -> the layers reading it, in execution order."""
    out: dict[str, list[str]] = {}
    for layer in layers:
        for v in layer.inputs:
            if layer.name not in out.setdefault(v, []):
                out[v].append(layer.name)
    return out


def _keras_layout(value, how: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if how == "filters":
        return conv_to_keras(value)
    if how == "scale":
        return to_nhwc(as_4d(value))
    return value.ravel()


def _indexes(net: DagNet, layer: str, p: str) -> list[int]:
    return [j for j, q in enumerate(net.layer(layer).params) if q == p]


def _der_scale(net: DagNet, layer: DagLayer, j: int) -> float:
    """The size of the rounding noise of param ``j``'s derivative in ``layer`` where it
    cancels to ~0 (a bias or filters followed by BatchNorm, a gain followed by another
    BatchNorm): ``rows.bias_scale``/``filter_scale``/``gain_scale``."""
    x = net.var(layer.inputs[0]).value if layer.inputs else None
    dzdy = net.var(layer.outputs[0]).der if layer.outputs else None
    if x is None or dzdy is None:
        return 0.0
    if layer.type in ("dagnn.Conv", "dagnn.ConvTranspose"):
        return bias_scale(dzdy) if j == 1 else filter_scale(x, dzdy)
    if layer.type == "dagnn.BatchNorm":
        return gain_scale(x, dzdy, layer.block.get("epsilon", 1e-5)) if j == 0 else bias_scale(dzdy)
    return 0.0
