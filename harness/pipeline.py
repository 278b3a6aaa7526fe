"""``harness.check``: the one place where the pieces are chained.

    net, model -> static findings (diagnosis) -> probe batch (io.specs) -> compare
    (equivalence: reference pass, Keras pass, alignment, measurement, report)
    -> cause probes on the first divergence (diagnosis) -> CheckResult

The command line, the pytest plugin and Python callers all call ``check``; none of them
chains these steps itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.equivalence.report import Report
from harness.io.text import json_dumps
from harness.io.text import safe_text as _text

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from harness.mcn.net import Net

__all__ = ["CheckResult", "check"]


@dataclass
class CheckResult:
    """What ``check`` found: the layer-by-layer ``report``, the static ``findings``
    (configuration differences, whatever the verdict) and the ``causes`` (porting
    mistakes that reproduce the Keras side at the first divergence)."""

    report: Report
    findings: list = field(default_factory=list)
    causes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The verdict: True only when the comparison completed and found no divergence."""
        return self.report.ok

    def to_dict(self) -> dict:
        """The report's JSON schema (``harness.equivalence.report``) plus ``findings``
        and ``causes``."""
        payload = self.report.to_dict()
        payload["findings"] = [f.to_dict() for f in self.findings]
        payload["causes"] = [c.to_dict() if hasattr(c, "to_dict") else str(c) for c in self.causes]
        return payload

    def to_json(self, indent: int | None = 2) -> str:
        return json_dumps(self.to_dict(), indent=indent)

    def lines(self) -> list[str]:
        """The report table, then one line per cause and per finding; every name made
        safe for a terminal."""
        out = str(self.report).splitlines()
        fd = self.report.first_divergence
        culprit = _text(fd.culprit) if fd else ""
        out += [f"likely cause at '{culprit}': {_text(c)}" for c in self.causes]
        if self.findings:
            out.append("")
            out.append(f"findings ({len(self.findings)}):")
            out += [f"  {_text(f)}" for f in self.findings]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def check(
    net: Net,
    model: keras.Model,
    x: Any = None,
    labels: Any = None,
    *,
    batch: int = 4,
    seed: int = 0,
    dtype: str = "float64",
    mode: str = "normal",
    dialect: str = "master",
    weights: str = "net",
    mapping: dict[str, list[str]] | None = None,
    findings: bool = True,
    causes: bool = True,
    upto: str | None = None,
    input_size: Any = None,
) -> CheckResult:
    """Check the Keras ``model`` against the MatConvNet ``net``.

    ``x`` (H x W x C x N) and ``labels`` (1-based) default to a probe batch of ``batch``
    standard-normal images drawn with ``seed`` from ``net.meta['inputSize']``. ``dtype``,
    ``mode``, ``dialect``, ``weights`` and ``mapping`` are those of ``harness.compare``.
    With ``findings``, the static differences of ``harness.diagnosis.diagnose`` are
    included; with ``causes``, a divergent layer is re-run with the usual porting
    mistakes (``harness.diagnosis.probe_causes``).

    A net without ``meta.inputSize`` is probed at the model's input size, else at
    ``input_size`` (H, W, C), else at a size inferred from the net. Layers the reference
    cannot run (a ``custom`` layer) end the comparison before them, with a note; ``upto``
    (a layer name or 1-based index) ends it earlier, and the model is then compared up to
    its layer paired with that one (a Sequential or functional model).

    Raises ``McnError`` (``InputError``) when the comparison cannot run: a bad net or
    batch, a model whose parameter layers cannot be paired with the net's, or shapes
    that do not fit. A returned result always comes from a completed comparison.
    """
    import numpy as np

    from harness.diagnosis import diagnose, probe_causes
    from harness.equivalence.align import align
    from harness.equivalence.run import compare
    from harness.io.specs import InputError, probe_batch, resolve_input_size, runnable_net, with_input_size
    from harness.mcn.dagnn import DagNet
    from harness.mcn.matfile import require_simplenn
    from harness.mcn.simplenn import vl_simplenn_tidy

    if isinstance(net, DagNet):
        if upto is not None:
            raise InputError("upto applies to simplenn networks only so far")
        found = diagnose(net, model) if findings else []
        result = _check_dag(net, model, x, labels, batch, seed, dtype, mode, weights, input_size)
        return CheckResult(result.report, found, [])
    require_simplenn(net, "check")
    net, cut = runnable_net(net, upto)
    net = vl_simplenn_tidy(net)
    net.notes = [*net.notes, *(c for c in cut if c not in net.notes)]
    net = with_input_size(net, *resolve_input_size(net, model, input_size))
    if upto is not None:
        model = model_upto(net, model, mapping)
    alignment = align(net, model, mapping)
    for pair in alignment.pairs:
        if net.layers[pair.index].type in ("conv", "convt", "bnorm") and pair.param_layer is None:
            raise InputError(
                f"cannot align the model with the net: MatConvNet layer '{pair.name}' ({pair.type}) "
                "has no Keras partner"
            )
    found = diagnose(net, model) if findings else []
    if x is None:
        x, probe_labels = probe_batch(net, batch, seed=seed)
        labels = probe_labels if labels is None else labels
    elif labels is None:
        n = np.shape(x)[3] if np.ndim(x) == 4 else 1
        labels = probe_batch(net, n, seed=seed)[1]
    report = compare(
        net, model, x, labels, dtype=dtype, mode=mode, dialect=dialect, weights=weights, mapping=mapping
    )
    report.notes = [*net.notes, *report.notes]
    if report.alignment_problems and all("shapes" in p for p in report.alignment_problems):
        raise InputError(report.alignment_problems[0])
    explained = []
    if causes and not report.ok and report.first_divergence:
        explained = probe_causes(net, model, report, x, labels, mode=mode, dialect=dialect, weights=weights)
    return CheckResult(report, found, explained)


def model_upto(net: Net, model: keras.Model, mapping: dict[str, list[str]] | None = None) -> keras.Model:
    """The model up to its layer the structure pairs with the net's last layer (the net
    cut by ``--upto``): a Sequential or functional model, cut at that layer's output."""
    import keras

    from harness.equivalence.align import align
    from harness.io.specs import InputError

    last = net.layers[-1]
    if not isinstance(model, keras.Sequential | keras.src.models.functional.Functional):
        raise InputError(
            f"--upto '{last.name}': the model is not a Sequential or functional model, so it cannot be "
            "stopped at one of its layers; give a model that ends there"
        )
    pair = align(net, model, mapping).pairs[-1] if net.layers else None
    own = [n for n in pair.keras if f"extra Keras layer {n}" not in pair.notes] if pair is not None else []
    name = (pair.param_layer or (own[-1] if own else None)) if pair is not None else None
    if name is None:
        raise InputError(f"--upto '{last.name}': no Keras layer of the model is paired with it")
    layer = next((l for l in model.layers if l.name == name), None)
    inputs = getattr(model, "inputs", None)
    try:
        output = layer.output if layer is not None else None
    except (AttributeError, ValueError):
        output = None
    if output is None or not inputs:
        raise InputError(
            f"--upto '{last.name}': the model is not a Sequential or functional model, so it cannot be "
            f"stopped at its layer '{name}'; give a model that ends there"
        )
    if any(output is o for o in model.outputs):
        return model
    return keras.Model(inputs, output, name=f"{model.name}_upto_{name}")


def _check_dag(net, model, x, labels, batch, seed, dtype, mode, weights, input_size) -> CheckResult:
    """``check`` of a DagNN network (``equivalence.dag_run.compare_dag``): a probe batch of
    ``batch`` random images per data input (the size of the model's input for it, else
    ``input_size``, else 32 x 32 and the depth of the filters reading the input) and random
    labels for its Loss layers.
    Cause probes are simplenn-only so far."""
    import numpy as np

    from harness.equivalence.dag_feed import declared_shapes, var_shapes
    from harness.equivalence.dag_run import compare_dag
    from harness.io.specs import InputError
    from harness.mcn.geometry import DEFAULT_SPATIAL
    from harness.translate.dag_build import dag_inputs

    names = dag_inputs(net)
    losses = [l for l in net.layers if l.type == "dagnn.Loss" and len(l.inputs) > 1]
    label_vars = list(dict.fromkeys(l.inputs[1] for l in losses))
    rng = np.random.RandomState(seed)
    fitted = []
    if x is None:
        shapes = declared_shapes(model, names)  # the model's input named after the var, else in its place
        sizes, chosen = {}, set()
        for name in names:
            shape = shapes.get(name, (None, None, None))
            if None in shape:
                depth = shape[2] if len(shape) == 3 and shape[2] is not None else _dag_depth(net, name)
                shape = (
                    tuple(input_size) if input_size is not None else (DEFAULT_SPATIAL, DEFAULT_SPATIAL, depth)
                )
                chosen |= set() if input_size is not None else {name}
            sizes[name] = tuple(int(d) for d in shape)
        sizes, batch, fitted = _fit_probe(net, sizes, chosen, batch)
        inputs = {name: rng.randn(*shape, batch) for name, shape in sizes.items()}
    elif isinstance(x, dict):
        inputs = dict(x)
    elif len(names) == 1:
        inputs = {names[0]: np.asarray(x, dtype=np.float64)}
    else:
        raise InputError(f"Expected x as a dict of the network's inputs {names}. Received one array")
    if label_vars and not all(v in inputs for v in label_vars):
        if labels is not None and len(label_vars) == 1:
            inputs[label_vars[0]] = np.asarray(labels, dtype=np.float64)
        else:
            data = {k: np.shape(v) for k, v in inputs.items() if k in names}
            n = next((d[3] if len(d) > 3 else 1 for d in data.values()), 1)
            per_image = var_shapes(net, {k: (*d, 1, 1)[:3] for k, d in data.items()})
            for layer in losses:
                if layer.inputs[1] in inputs:
                    continue
                h, w, c, _ = per_image[layer.inputs[0]][0]
                inputs[layer.inputs[1]] = rng.randint(1, c + 1, size=(h, w, 1, n)).astype(np.float64)
    report = compare_dag(net, model, inputs, dtype=dtype, mode=mode, weights=weights, seed=seed)
    report.notes = [*net.notes, *fitted, *report.notes]
    return CheckResult(report, [], [])


def _fit_probe(net, sizes: dict, chosen: set, batch: int) -> tuple[dict, int, list[str]]:
    """The random probe of a DagNN net made to fit the memory budget: fewer images, then (for
    the inputs whose size the harness chose, not the model or the user) halved sides down to
    8 pixels. Returns the sizes, the batch and a note saying what was reduced. What still
    does not fit is refused by compare_dag, naming the largest var."""
    from harness.equivalence.dag_feed import ACTIVATION_COPIES, activation_bytes
    from harness.mcn.options import format_bytes, memory_budget

    budget, want = memory_budget(), (dict(sizes), batch)
    per_image = activation_bytes(net, sizes)[0] * ACTIVATION_COPIES
    while per_image > budget and chosen and min(min(sizes[k][:2]) for k in chosen) >= 16:
        sizes = {k: (v[0] // 2, v[1] // 2, v[2]) if k in chosen else v for k, v in sizes.items()}
        per_image = activation_bytes(net, sizes)[0] * ACTIVATION_COPIES
    batch = max(1, min(batch, int(budget // max(per_image, 1))))
    if (sizes, batch) == want:
        return sizes, batch, []
    shown = ", ".join(f"{k} {v[0]} x {v[1]} x {v[2]}" for k, v in sizes.items())
    return (
        sizes,
        batch,
        [
            f"probe reduced to {batch} image(s) ({shown}) to fit the memory budget of "
            f"{format_bytes(budget)} (MCN_HARNESS_MEMORY_BUDGET; --batch and --input-size choose)"
        ],
    )


def _dag_depth(net, name: str) -> int:
    """The depth of the filters that first read input var ``name`` (1 without any)."""
    import numpy as np

    for layer in net.layers:
        if name in layer.inputs and layer.type in ("dagnn.Conv", "dagnn.ConvTranspose") and layer.params:
            f = np.asarray(net.param(layer.params[0]).value)
            f = f.reshape(f.shape + (1,) * (4 - f.ndim))
            return int(f.shape[2] if layer.type == "dagnn.Conv" else f.shape[3])
    return 1
