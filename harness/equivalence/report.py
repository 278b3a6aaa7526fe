"""The comparison report: one row per (layer, tensor), the first divergence, text and JSON.

JSON schema (``Report.to_json()``, stable; keys sorted; strict JSON: a non-finite
number (NaN, Inf: a tensor that went non-finite) is written as null):

    {"schema": "mcn-harness/report/4", "ok": bool, "dtype": str, "mode": str,
     "dialect": str, "convention": str, "alignment_problems": [str],
     "problems": [str], "hints": [str], "notes": [str],
     "limitations": [{"kind": str, "text": str}],
     "first_divergence": null | {"layer": str, "keras": str, "tensor": str, "culprit": str},
     "rows": [{"layer": str, "type": str, "keras": str, "tensor": str, "ok": bool,
               "numel": int, "mismatches": int, "max_abs": float, "max_rel": float,
               "tolerance": float, "worst_index_mcn": [int] | null,
               "worst_index_keras": [int] | null, "ref_value": float | null,
               "keras_value": float | null, "note": str,
               "limitation": str, "nonfinite_ref": int, "nonfinite_keras": int}]}

``mcn-harness check --json`` (and ``CheckResult.to_dict()``) add
``"findings": [Finding.to_dict()]`` and ``"causes": [Cause.to_dict()]``.

Changes from schema 3: rows are aligned by value with the tensors the model's real
call computed, so ``keras`` names a Keras layer ("conv1"), an operation inside one
("conv1:BiasAdd") or one in the model's own code ("net:Relu"); ``alignment_problems``
holds only parameters that could not be loaded; what the structural alignment could not
pair is in ``hints``, told only with a divergence; new row tensor ``output`` (the
model's own output against the reference's scores or their softmax); ``dtype`` is the
precision the comparison ran in (float32 when the model could not be copied to float64,
with a note); limitation kind ``float32-rounding``.

Changes from schema 2: ``limitations`` are records (``Limitation``: kind and text),
``first_divergence`` is a ``Divergence`` record (same keys). Changes from schema 1:
``problems`` (non-finite parameters or inputs on either side: the verdict is then
DIVERGENT), the rows' ``nonfinite_ref``/``nonfinite_keras`` counts, and null for
non-finite numbers (schema 1 wrote invalid ``NaN`` tokens).

A NaN or Inf never compares equal (``harness.equivalence.metrics``): a row with a non-finite
element on either side is a mismatch, and a non-finite reference is flagged in the
row's note.
A row whose ``limitation`` is set differs for a known, accepted reason (listed in
``limitations``) and does not count as a divergence. ``max_rel`` is normwise:
``max|keras - ref| / max|ref|``. Indices are 0-based, in MatConvNet's ``H x W x C x N``
layout and in Keras' ``N x H x W x C`` layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.io.text import json_dumps
from harness.io.text import safe_text as _text

__all__ = [
    "LIMITATIONS",
    "Divergence",
    "Limitation",
    "Report",
    "Row",
    "row_table",
    "text_tail",
    "verdict_reasons",
]

SCHEMA = "mcn-harness/report/4"


@dataclass(frozen=True)
class Divergence:
    """Where the two sides part first. ``layer``/``keras``/``tensor`` name the first row
    that differs; ``culprit`` is the MatConvNet layer held responsible (for a derivative
    that differs first at a layer's output, the layer after it)."""

    layer: str
    keras: str
    tensor: str
    culprit: str

    def to_dict(self) -> dict:
        return {"layer": self.layer, "keras": self.keras, "tensor": self.tensor, "culprit": self.culprit}

    def __getitem__(self, key: str) -> str:  # mapping access, as schema 1's dict allowed
        if key not in ("layer", "keras", "tensor", "culprit"):
            raise KeyError(key)
        return getattr(self, key)


@dataclass(frozen=True)
class Limitation:
    """A known, accepted difference between MatConvNet and Keras (``kind``: a short
    key such as "lrn-fast-pow"); rows it explains carry its ``text`` and do not count."""

    kind: str
    text: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text}

    def __str__(self) -> str:
        return self.text


# The known, accepted differences between the two sides, by kind.
LIMITATIONS = {
    "lrn-exact-power": Limitation(
        "lrn-exact-power",
        "LRN compared with the exact power (MatConvNet's CPU fast_pow differs by up to 3.3e-3)",
    ),
    "float32-rounding": Limitation(
        "float32-rounding",
        "differences explained by float32 rounding in the port: it matches the reference whose "
        "constants (ReLU leak, LRN parameters, bnorm epsilon) and transferred weights are rounded "
        "to float32 as the port holds them",
    ),
    "bnorm-test-mode-backward": Limitation(
        "bnorm-test-mode-backward",
        "test mode: MatConvNet's backward pass through bnorm uses batch statistics (vl_simplenn "
        "calls vl_nnbnorm without 'moments'), Keras differentiates through the stored moments",
    ),
}


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
    nonfinite_ref: int = 0  # NaN/Inf elements in the MatConvNet tensor (never trusted)
    nonfinite_keras: int = 0  # NaN/Inf elements in the Keras tensor

    @property
    def status(self) -> str:
        """ "ok", "known" (a limitation explains it) or "DIFF"."""
        return "ok" if self.ok else ("known" if self.limitation else "DIFF")

    def detail(self) -> str:
        """The worst element of a differing row (index: ref / Keras) and the note, safe
        for a terminal."""
        worst = ""
        if not self.ok and self.worst_index_mcn is not None and self.ref_value is not None:
            worst = f"{tuple(self.worst_index_mcn)}: {self.ref_value:.6g} / {self.keras_value:.6g}"
        if self.note:
            worst = f"{worst}  {self.note}".strip()
        return _text(worst)


def text_tail(notes: list, limitations: list) -> list[str]:
    """The closing lines of a report's text: its notes and its limitations."""
    return [f"note: {_text(n)}" for n in notes] + [f"limitation: {_text(n)}" for n in limitations]


def row_table(
    rows: list,
    *,
    keras_width: int = 22,
    tensor_width: int = 8,
    tensor_cut: int | None = None,
    extra: tuple[str, Callable[[Any], str]] | None = None,
) -> list[str]:
    """The text table of ``rows``: a header, a rule and one line per row (layer, Keras
    name, tensor, status, mismatches, max abs, max rel, then ``extra``'s column if given
    (its heading and the text of a row), then the worst element and the note). Names are
    cut to their columns (the tensor name at ``tensor_cut``) and made safe."""
    kw, tw = keras_width, tensor_width
    more = f" {extra[0]:>9}" if extra else ""
    header = (
        f"{'layer':<14} {'keras':<{kw}} {'tensor':<{tw}} {'status':<6} {'mismatch':>13} "
        f"{'max abs':>9} {'max rel':>9}{more}  worst (mcn idx: ref / keras)"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        tensor = _text(r.tensor)[:tensor_cut]
        more = f" {extra[1](r):>9}" if extra else ""
        lines.append(
            f"{_text(r.layer)[:14]:<14} {_text(r.keras)[:kw]:<{kw}} {tensor:<{tw}} {r.status:<6} "
            f"{f'{r.mismatches}/{r.numel}':>13} {r.max_abs:>9.2e} {r.max_rel:>9.2e}{more}  {r.detail()}"
        )
    return lines


def verdict_reasons(report: Report, esc: Callable[[Any], str], quote: str = "'") -> list[tuple[str, str]]:
    """``(label, text)`` of what makes a report divergent: the first divergence (its names
    in ``quote``), the alignment problems and the problems, every name through ``esc``."""
    out = []
    fd = report.first_divergence
    if fd:
        q = quote
        out.append(
            (
                "first divergence",
                f"layer {q}{esc(fd.culprit)}{q} ({esc(fd.tensor)} of {q}{esc(fd.layer)}{q} "
                f"vs Keras {q}{esc(fd.keras)}{q})",
            )
        )
    out += [("alignment", esc(p)) for p in report.alignment_problems]
    return out + [("problem", esc(p)) for p in report.problems]


@dataclass
class Report:
    rows: list[Row]
    dtype: str
    mode: str
    dialect: str
    convention: str
    alignment_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limitations: list[Limitation] = field(default_factory=list)
    first_divergence: Divergence | None = None
    # non-finite parameters or inputs on either side: never equivalent
    problems: list[str] = field(default_factory=list)
    # what the structural alignment could not pair (told with a divergence, as a hint)
    hints: list[str] = field(default_factory=list)
    # MatConvNet layer name -> the Keras tensor compared with its output (H x W x C x N)
    observed: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and not self.alignment_problems and not self.problems

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "dtype": self.dtype,
            "mode": self.mode,
            "dialect": self.dialect,
            "convention": self.convention,
            "alignment_problems": list(self.alignment_problems),
            "problems": list(self.problems),
            "hints": list(self.hints),
            "notes": list(self.notes),
            "limitations": [x.to_dict() for x in self.limitations],
            "first_divergence": None if self.first_divergence is None else self.first_divergence.to_dict(),
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json_dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [
            f"mcn-harness report: {'EQUIVALENT' if self.ok else 'DIVERGENT'} "
            f"({self.dtype}, mode {self.mode}, dialect {self.dialect})",
            f"loss convention: {self.convention}",
        ]
        lines += [f"{label}: {text}" for label, text in verdict_reasons(self, _text)]
        for p in self.hints:
            lines.append(f"hint: {_text(p)}")
        lines += row_table(self.rows)
        lines += text_tail(self.notes, self.limitations)
        return "\n".join(lines)


def _chart_svg(report: Report) -> str:
    """An inline SVG chart: log10 of the greatest relative error per layer, forward
    (activations) and backward (derivatives w.r.t. them); no external resources."""
    import html
    import math

    layers: list[str] = []
    fwd: dict[str, float] = {}
    bwd: dict[str, float] = {}
    for r in report.rows:
        if r.layer not in layers:
            layers.append(r.layer)
        target = fwd if r.tensor in ("x", "loss") or r.tensor.startswith("w{") else bwd
        target[r.layer] = max(target.get(r.layer, 0.0), r.max_rel)
    width, height, left, bottom = max(360, 60 * len(layers) + 80), 260, 60, 60
    lo, hi = -17.0, 1.0

    def y(v: float) -> float:
        lv = min(max(math.log10(v) if v > 0 else lo, lo), hi)
        return 20 + (hi - lv) / (hi - lo) * (height - bottom - 20)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
        f'aria-label="relative error per layer">'
    ]
    for tick in range(-16, 1, 4):
        ty = y(10.0**tick)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="4" y="{ty + 4:.1f}" font-size="11">1e{tick}</text>')
    tol = report.rows[0].tolerance if report.rows else 0.0
    if tol > 0:
        ty = y(tol)
        parts.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#c00" '
            'stroke-dasharray="4 3"/>'
        )
    for series, colour, dx in ((fwd, "#1f77b4", -7), (bwd, "#ff7f0e", 7)):
        for i, name in enumerate(layers):
            if name not in series:
                continue
            cx = left + 30 + 60 * i + dx
            parts.append(f'<circle cx="{cx}" cy="{y(series[name]):.1f}" r="4" fill="{colour}"/>')
    for i, name in enumerate(layers):
        cx = left + 30 + 60 * i
        parts.append(
            f'<text x="{cx}" y="{height - bottom + 16}" font-size="11" text-anchor="end" '
            f'transform="rotate(-35 {cx} {height - bottom + 16})">{html.escape(_text(name)[:16])}</text>'
        )
    parts.append(
        f'<text x="{left}" y="14" font-size="12"><tspan fill="#1f77b4">● forward</tspan> '
        '<tspan fill="#ff7f0e">● backward</tspan> <tspan fill="#c00">- - tolerance</tspan></text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: Report, findings: list | None = None, title: str = "mcn-harness report") -> str:
    """One self-contained HTML page: summary, findings, the per-layer table and the chart.
    Every name is escaped (names come from .mat files and models: untrusted)."""
    import html

    def e(value) -> str:
        return html.escape(_text(value))

    status = "EQUIVALENT" if report.ok else "DIVERGENT"
    head = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        ".DIFF{background:#fdd}.known{background:#ffd}.ok{background:#efe}"
        "</style></head><body>"
    )
    body = [
        f"<h1>{e(title)}: {status}</h1>",
        f"<p>{e(report.dtype)}, mode {e(report.mode)}, "
        f"dialect {e(report.dialect)}. Loss convention: {e(report.convention)}</p>",
    ]
    for label, text in verdict_reasons(report, e, quote=""):
        head_of = f"<b>{label.capitalize()}:</b>" if label == "first divergence" else f"{label.capitalize()}:"
        body.append(f"<p>{head_of} {text}</p>")
    if findings:
        body.append(
            "<h2>Findings</h2><table><tr><th>kind</th><th>layer</th><th>Keras</th><th>MatConvNet</th>"
            "<th>Keras value</th><th>fix</th></tr>"
        )
        for f in findings:
            body.append(
                f"<tr><td>{e(f.kind)}</td><td>{e(f.layer)}</td><td>{e(f.keras)}</td><td>{e(f.mcn_value)}</td>"
                f"<td>{e(f.keras_value)}</td><td>{e(f.fix)}</td></tr>"
            )
        body.append("</table>")
    body.append("<h2>Error per layer</h2>")
    body.append(_chart_svg(report))
    body.append(
        "<h2>Tensors</h2><table><tr><th>layer</th><th>Keras</th><th>tensor</th><th>status</th>"
        "<th>mismatches</th><th>max abs</th><th>max rel</th><th>worst index (MatConvNet)</th>"
        "<th>ref</th><th>Keras</th><th>note</th></tr>"
    )
    for r in report.rows:
        status_r = r.status
        worst = "" if r.worst_index_mcn is None else e(str(tuple(r.worst_index_mcn)))
        ref = "" if r.ref_value is None else f"{r.ref_value:.6g}"
        kv = "" if r.keras_value is None else f"{r.keras_value:.6g}"
        body.append(
            f"<tr class='{status_r}'><td>{e(r.layer)}</td><td>{e(r.keras)}</td><td>{e(r.tensor)}</td>"
            f"<td>{status_r}</td><td>{r.mismatches}/{r.numel}</td><td>{r.max_abs:.2e}</td><td>{r.max_rel:.2e}</td>"
            f"<td>{worst}</td><td>{ref}</td><td>{kv}</td><td>{e(r.note or r.limitation)}</td></tr>"
        )
    body.append("</table>")
    for n in report.notes:
        body.append(f"<p>Note: {e(n)}</p>")
    for n in report.limitations:
        body.append(f"<p>Limitation: {e(n)}</p>")
    return head + "".join(body) + "</body></html>\n"
