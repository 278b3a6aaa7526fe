"""The training report: ``TrainingRow`` (a layer-report Row for one step) and
``TrainingReport`` (the rows of every step, the first divergence, text and JSON), as
``harness.training.compare_training`` returns it.

JSON schema (``TrainingReport.to_json()``, stable; keys sorted; non-finite numbers null):

    {"schema": "mcn-harness/training-report/2", "ok": bool, "dtype": str, "dialect": str,
     "convention": str, "solver": str, "optimizer": str, "tolerance": float,
     "alignment_problems": [str], "notes": [str], "limitations": [str],
     "first_divergence": null | {"step": int, "epoch": int, "layer": str, "keras": str,
         "tensor": str, "max_abs": float, "max_rel": float,
         "weight": null | {layer, keras, tensor, max_abs, max_rel}, "state": null | {...}},
     "steps": [{"step": int, "epoch": int, "learning_rate": float,
                "keras_learning_rate": float | null, "objective": float,
                "keras_objective": float}],
     "rows": [the layer report's row fields (layer, type, keras, tensor, ok, numel,
              mismatches, max_abs, max_rel, tolerance, worst_index_mcn, worst_index_keras,
              ref_value, keras_value, note, limitation, nonfinite_ref, nonfinite_keras)
              + "step": int, "epoch": int,
              "kind": "weight" | "state" | "objective", "update_rel": float | null]}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.equivalence.report import Row, row_table, text_tail
from harness.io.text import json_dumps
from harness.io.text import safe_text as _text

__all__ = ["SCHEMA", "TrainingReport", "TrainingRow", "find_first_divergence"]

SCHEMA = "mcn-harness/training-report/2"


@dataclass
class TrainingRow(Row):
    """A Row of the layer report, for one training step. ``tensor`` is ``w{j}`` (a
    parameter after the step), ``w{3}.mu``/``w{3}.sigma`` (bnorm moments),
    ``w{1}*`` (Keras-only kernel entries off MatConvNet's filter groups),
    ``solverState{j}`` or ``solverState{j}.<field>`` (the optimizer state after the step)
    or ``objective`` (the batch loss per image before the step). ``update_rel`` is the
    normwise relative error of this step's change: ``max|dkeras - dref| / max(max|dref|,
    max|dkeras|)`` (0.5 when Keras steps half as far, ~1 when the steps are unrelated)."""

    step: int = 0
    epoch: int = 1
    kind: str = "weight"  # "weight", "state", "objective"
    update_rel: float | None = None


@dataclass
class TrainingReport:
    rows: list[TrainingRow]
    steps: list[dict]  # per step: step, epoch, learning_rate (mcn), keras_learning_rate, objectives
    dtype: str
    dialect: str
    convention: str
    solver: str  # cnn_train's update, e.g. "SGD (momentum 0.9)"
    optimizer: str  # the Keras optimizer's class
    tolerance: float
    alignment_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    first_divergence: dict | None = None

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and not self.alignment_problems

    def rows_at(self, step: int) -> list[TrainingRow]:
        return [r for r in self.rows if r.step == step]

    def worst(
        self,
        step: int | None = None,
        *,
        kind: str | None = None,
        layer: str | None = None,
        tensor: str | None = None,
        known: bool = False,
    ) -> TrainingRow | None:
        """The row with the greatest ``max_rel`` among those matching (``known``: include
        rows explained by a limitation)."""
        rows = [
            r
            for r in self.rows
            if (step is None or r.step == step)
            and (kind is None or r.kind == kind)
            and (layer is None or r.layer == layer)
            and (tensor is None or r.tensor == tensor)
            and (known or not r.limitation)
        ]
        return max(rows, key=lambda r: r.max_rel, default=None)

    def max_rel(self, step: int | None = None, **kwargs: Any) -> float:
        row = self.worst(step, **kwargs)
        return 0.0 if row is None else row.max_rel

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "dtype": self.dtype,
            "dialect": self.dialect,
            "convention": self.convention,
            "solver": self.solver,
            "optimizer": self.optimizer,
            "tolerance": self.tolerance,
            "alignment_problems": list(self.alignment_problems),
            "notes": list(self.notes),
            "limitations": list(self.limitations),
            "first_divergence": _finite_tree(self.first_divergence),
            "steps": [_finite_tree(s) for s in self.steps],
            "rows": [{k: _finite(v) for k, v in asdict(r).items()} for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json_dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [
            f"mcn-harness training report: {'EQUIVALENT' if self.ok else 'DIVERGENT'} "
            f"({self.dtype}, dialect {self.dialect}, {len(self.steps)} steps, "
            f"tolerance {self.tolerance:.0e})",
            f"cnn_train: {_text(self.solver)}; Keras: {_text(self.optimizer)}",
            f"loss convention: {self.convention}",
        ]
        fd = self.first_divergence
        if fd:
            lines.append(
                f"first divergence: step {fd['step']} (epoch {fd['epoch']}): layer '{_text(fd['layer'])}' "
                f"{_text(fd['tensor'])} (Keras '{_text(fd['keras'])}'), max rel {fd['max_rel']:.2e}"
            )
            for kind in ("weight", "state"):
                other = fd.get(kind)
                if other and (other["layer"], other["tensor"]) != (fd["layer"], fd["tensor"]):
                    lines.append(
                        f"  worst {kind} at that step: layer '{_text(other['layer'])}' "
                        f"{_text(other['tensor'])}, max rel {other['max_rel']:.2e}"
                    )
        for p in self.alignment_problems:
            lines.append(f"alignment: {_text(p)}")
        header = (
            f"{'step':>4} {'epoch':>5} {'lr mcn':>9} {'lr keras':>9} {'objective':>11} "
            f"{'worst weight':<24} {'max rel':>9} {'worst state':<28} {'max rel':>9}"
        )
        lines += [header, "-" * len(header)]
        for s in self.steps:
            w = self.worst(s["step"], kind="weight")
            st = self.worst(s["step"], kind="state")
            k_lr = s.get("keras_learning_rate")
            lines.append(
                f"{s['step']:>4} {s['epoch']:>5} {s['learning_rate']:>9.3g} "
                f"{'?' if k_lr is None else f'{k_lr:.3g}':>9} {s['objective']:>11.6g} "
                f"{_label(w):<24} {_rel(w):>9} {_label(st):<28} {_rel(st):>9}"
            )
        shown = fd["step"] if fd else (self.steps[-1]["step"] if self.steps else None)
        if shown is not None:
            lines.append(f"tensors after step {shown}:")
            lines += row_table(
                self.rows_at(shown),
                keras_width=26,
                tensor_width=20,
                tensor_cut=20,
                extra=("step rel", lambda r: "" if r.update_rel is None else f"{r.update_rel:.2e}"),
            )
        lines += text_tail(self.notes, self.limitations)
        return "\n".join(lines)


def _finite(v: Any) -> Any:
    # JSON has no inf/nan: a non-finite error (a Keras weight gone to nan/inf) is null
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _finite_tree(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _finite_tree(v) for k, v in d.items()}
    return _finite(d)


def _label(r: TrainingRow | None) -> str:
    return "-" if r is None else f"{_text(r.layer)[:12]} {_text(r.tensor)}"[:28]


def _rel(r: TrainingRow | None) -> str:
    return "-" if r is None else f"{r.max_rel:.2e}"


def _summary(r: TrainingRow | None) -> dict | None:
    if r is None:
        return None
    return {
        "layer": r.layer,
        "keras": r.keras,
        "tensor": r.tensor,
        "max_abs": r.max_abs,
        "max_rel": r.max_rel,
    }


def find_first_divergence(report: TrainingReport) -> dict | None:
    """The first step with a divergent row; named by its worst weight (else its worst state,
    else the objective), with the worst weight and state of that step beside it."""
    for s in report.steps:
        bad = [r for r in report.rows_at(s["step"]) if not r.ok and not r.limitation]
        if not bad:
            continue
        by_kind = {
            kind: max((r for r in bad if r.kind == kind), key=lambda r: r.max_rel, default=None)
            for kind in ("weight", "state", "objective")
        }
        head = by_kind["weight"] or by_kind["state"] or by_kind["objective"]
        return {
            "step": s["step"],
            "epoch": s["epoch"],
            **_summary(head),
            "weight": _summary(by_kind["weight"]),
            "state": _summary(by_kind["state"]),
        }
    return None
