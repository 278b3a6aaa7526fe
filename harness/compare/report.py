"""The comparison report: one row per (layer, tensor), the first divergence, text and JSON.

JSON schema (``Report.to_json()``, stable; keys sorted):

    {"schema": "mcn-harness/report/1", "ok": bool, "dtype": str, "mode": str,
     "dialect": str, "convention": str, "alignment_problems": [str],
     "notes": [str], "limitations": [str],
     "first_divergence": null | {"layer": str, "keras": str, "tensor": str, "culprit": str},
     "rows": [{"layer": str, "type": str, "keras": str, "tensor": str, "ok": bool,
               "numel": int, "mismatches": int, "max_abs": float, "max_rel": float,
               "tolerance": float, "worst_index_mcn": [int] | null,
               "worst_index_keras": [int] | null, "ref_value": float | null,
               "keras_value": float | null, "note": str,
               "limitation": str}]}

A row whose ``limitation`` is set differs for a known, accepted reason (listed in
``limitations``) and does not count as a divergence. ``max_rel`` is normwise:
``max|keras - ref| / max|ref|``. Indices are 0-based, in MatConvNet's ``H x W x C x N``
layout and in Keras' ``N x H x W x C`` layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["Row", "Report"]

SCHEMA = "mcn-harness/report/1"


@dataclass
class Row:
    layer: str
    type: str
    keras: str
    tensor: str  # "x" (layer output), "dzdx" (derivative of the loss w.r.t. it), "dzdw{j}", "loss"
    ok: bool
    numel: int = 0
    mismatches: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    tolerance: float = 0.0
    worst_index_mcn: list[int] | None = None
    worst_index_keras: list[int] | None = None
    ref_value: float | None = None
    keras_value: float | None = None
    note: str = ""
    limitation: str = ""  # a known, accepted difference explains this row (not a divergence)


@dataclass
class Report:
    rows: list[Row]
    dtype: str
    mode: str
    dialect: str
    convention: str
    alignment_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    first_divergence: dict | None = None

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and not self.alignment_problems

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "dtype": self.dtype,
            "mode": self.mode,
            "dialect": self.dialect,
            "convention": self.convention,
            "alignment_problems": list(self.alignment_problems),
            "notes": list(self.notes),
            "limitations": list(self.limitations),
            "first_divergence": self.first_divergence,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def __str__(self) -> str:
        lines = [
            f"mcn-harness report: {'EQUIVALENT' if self.ok else 'DIVERGENT'} "
            f"({self.dtype}, mode {self.mode}, dialect {self.dialect})",
            f"loss convention: {self.convention}",
        ]
        if self.first_divergence:
            fd = self.first_divergence
            lines.append(
                f"first divergence: layer '{_safe(fd['culprit'])}' ({_safe(fd['tensor'])} of "
                f"'{_safe(fd['layer'])}' vs Keras '{_safe(fd['keras'])}')"
            )
        for p in self.alignment_problems:
            lines.append(f"alignment: {_safe(p)}")
        header = (
            f"{'layer':<14} {'keras':<22} {'tensor':<8} {'status':<6} {'mismatch':>13} "
            f"{'max abs':>9} {'max rel':>9}  worst (mcn idx: ref / keras)"
        )
        lines += [header, "-" * len(header)]
        for r in self.rows:
            status = "ok" if r.ok else ("known" if r.limitation else "DIFF")
            mism = f"{r.mismatches}/{r.numel}"
            worst = ""
            if not r.ok and r.worst_index_mcn is not None:
                worst = f"{tuple(r.worst_index_mcn)}: {r.ref_value:.6g} / {r.keras_value:.6g}"
            if r.note:
                worst = f"{worst}  {r.note}".strip()
            lines.append(
                f"{_safe(r.layer)[:14]:<14} {_safe(r.keras)[:22]:<22} {r.tensor:<8} {status:<6} {mism:>13} "
                f"{r.max_abs:>9.2e} {r.max_rel:>9.2e}  {_safe(worst)}"
            )
        for n in self.notes:
            lines.append(f"note: {_safe(n)}")
        for n in self.limitations:
            lines.append(f"limitation: {_safe(n)}")
        return "\n".join(lines)


def _safe(text: str) -> str:
    """Names come from .mat files and models: drop control characters (terminal escapes)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))
