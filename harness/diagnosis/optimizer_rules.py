"""One table of the ways a Keras optimizer set-up differs from cnn_train's update,
shared by ``diagnose`` (as Findings, through ``setup_rules``) and
``harness.training.compare_training`` (as its notes).

``OPTIMIZER_RULES`` is the table. Each rule reads a ``SetUp`` (the Keras optimizer,
cnn_train's ``TrainOpts``, the net; the model and the alignment when the caller has them)
and returns ``Difference`` records: the Finding's fields (kind, MatConvNet's value,
Keras' value, the fix) and the sentence of a note. The facts: the solver, SGD's momentum
(value, Nesterov, the learning rate folded into the buffer), the adaptive solvers'
constants, a MatConvNet optimizer set up unlike the net, decoupled and coupled weight
decay, the learning-rate schedule, the learning-rate multipliers, and constants Keras
rounds to float32.

The per-variable facts (multipliers, coupled weight decay) have two views. With the
alignment (compare_training) they are compared variable by variable as the Keras side
applies them: L2 regularisers, a MatConvNet optimizer's multipliers and coupled decay.
Without it (diagnose), from the optimizer's configuration and the net's multipliers: the
weight-decay rule then sees only the optimizer's own ``weight_decay``, and reports
cnn_train's coupled decay as missing even where L2 regularisers or a MatConvNet optimizer
supply it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.diagnosis.findings import Finding, fmt_value
from harness.mcn.net import Net
from harness.mcn.options import is_empty
from harness.mcn.train import SOLVERS, TrainOpts

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment

__all__ = [
    "KERAS_SOLVERS",
    "OPTIMIZER_RULES",
    "SOLVER_NAMES",
    "Difference",
    "SetUp",
    "keras_solver",
    "optimizer_differences",
    "schedule_text",
]

# cnn_train's solver (None: its built-in SGD) that each of Keras' own optimizers runs
KERAS_SOLVERS = {
    "SGD": None,
    "Adam": "adam",
    "RMSprop": "rmsprop",
    "Adagrad": "adagrad",
    "Adadelta": "adadelta",
}
SOLVER_NAMES = {None: "SGD"} | {name: name for name in SOLVERS}

# Keras' own optimizers that pass Python-float constants through ops.cast (float32 first);
# the others combine them with float64 tensors directly, which is exact.
FLOAT32_CASTS = {
    "SGD": ("momentum",),
    "Adam": ("beta_1", "beta_2"),
    "AdamW": ("beta_1", "beta_2"),
    "Adamax": ("beta_1",),
    "Nadam": ("beta_1", "beta_2"),
}


def keras_solver(optimizer: Any) -> str | None:
    """The cnn_train solver an optimizer runs (None: SGD), or "?" for none of them."""
    from harness.translate.optim import MatConvNetOptimizer

    if isinstance(optimizer, MatConvNetOptimizer):
        return optimizer.solver
    return KERAS_SOLVERS.get(type(optimizer).__name__, "?")


@dataclass(frozen=True)
class Difference:
    """One way the Keras set-up differs from cnn_train's update: the Finding's fields
    and ``note``, the sentence compare_training prints."""

    kind: str
    mcn_value: str
    keras_value: str
    fix: str
    note: str

    def finding(self) -> Finding:
        return Finding(self.kind, "", "optimizer", self.mcn_value, self.keras_value, self.fix)


@dataclass(frozen=True)
class _PerVariable:
    rates: list[str]  # "<layer> w{j} x<learningRate(j)>" where the Keras rate differs
    decays: list[str]  # "<layer> w{j}: <keras> instead of <cnn_train>" (coupled decay)
    decayed: bool  # any coupled decay on the Keras side


@dataclass
class SetUp:
    """What the rules read. ``rate``: cnn_train's learning rate at the first step;
    ``dtype``: what the Keras side computes in; ``model``/``alignment``: the per-variable
    view (None: the configuration alone)."""

    optimizer: Any
    opts: TrainOpts
    net: Net
    rate: float
    dtype: str = "float64"
    model: keras.Model | None = None
    alignment: Alignment | None = None
    cls: str = field(init=False)

    def __post_init__(self) -> None:
        self.cls = type(self.optimizer).__name__

    @cached_property
    def ours(self) -> bool:
        from harness.translate.optim import MatConvNetOptimizer

        return isinstance(self.optimizer, MatConvNetOptimizer)

    @cached_property
    def config(self) -> dict:
        return self.optimizer.get_config()

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self.optimizer, name, default)

    @cached_property
    def per_variable(self) -> _PerVariable | None:
        """The learning-rate multipliers and coupled decay the Keras side applies to each
        aligned parameter, against cnn_train's ``learningRate(j)``/``weightDecay(j)``."""
        if self.alignment is None:
            return None
        rates, decays, decayed = [], [], False
        opt, ours = self.optimizer, self.ours
        for pair in self.alignment.pairs:
            if pair.param_layer is None:
                continue
            layer, klayer = self.net.layers[pair.index], self.model.get_layer(pair.param_layer)
            lr = np.asarray(layer.learning_rate, dtype=np.float64).ravel()
            wd = np.asarray(layer.weight_decay, dtype=np.float64).ravel()
            names = ("gamma", "beta") if layer.type == "bnorm" else ("kernel", "bias")
            for j, name in enumerate(names):
                if j >= min(lr.size, wd.size, len(layer.weights)) or is_empty(layer.weights[j]):
                    continue
                where = f"{layer.name} w{{{j + 1}}}"
                k_lr, k_wd = 1.0, 0.0
                if ours:
                    k_lr, k_wd = opt.multipliers.get(
                        f"{klayer.name}/{name}", opt.default_multipliers or (lr[j], wd[j])
                    )
                    k_wd *= opt.coupled_weight_decay
                reg = getattr(klayer, f"{name}_regularizer", None)
                k_wd += 2 * float(getattr(reg, "l2", 0.0) or 0.0)
                decayed |= k_wd != 0
                if k_lr != lr[j]:
                    rates.append(f"{where} x{lr[j]:g}" + (f" (Keras x{k_lr:g})" if ours else ""))
                want = self.opts.weight_decay * wd[j]
                if want != k_wd and not self.get("weight_decay"):
                    decays.append(f"{where}: {k_wd:g} instead of {want:g}")
        return _PerVariable(sorted(rates), decays, decayed)


# ------------------------------------------------------------------------------ the rules

_EXACT = "harness.matconvnet_optimizer(net, train_opts)"


def _solver(s: SetUp) -> list[Difference]:
    if keras_solver(s.optimizer) == s.opts.solver:
        return []
    sgd = s.opts.solver is None
    return [
        Difference(
            "optimizer",
            f"SGD with momentum {s.opts.momentum:g}" if sgd else s.opts.solver,
            s.cls,
            (f"keras.optimizers.SGD(momentum={s.opts.momentum:g}) or " if sgd else "")
            + "harness.matconvnet_optimizer(net, opts)",
            f"{'' if s.ours else 'Keras '}{s.cls} where cnn_train runs {SOLVER_NAMES[s.opts.solver]} "
            f"(fix: {_EXACT})",
        )
    ]


def _sgd_momentum(s: SetUp) -> list[Difference]:
    """Keras' SGD against cnn_train's: the momentum, Nesterov, and the rate in the buffer."""
    if s.ours or s.cls != "SGD" or s.opts.solver is not None:
        return []
    out = []
    o, momentum = s.opts, float(s.get("momentum", 0.0))
    if momentum != o.momentum:
        out.append(
            Difference(
                "momentum",
                fmt_value(o.momentum),
                fmt_value(momentum),
                f"SGD(momentum={o.momentum:g})",
                f"Keras SGD momentum {s.get('momentum')} vs cnn_train's {o.momentum:g}",
            )
        )
    if bool(s.get("nesterov")) != o.nesterov_update:
        out.append(
            Difference(
                "nesterov",
                f"nesterovUpdate={o.nesterov_update}",
                f"nesterov={s.get('nesterov')}",
                f"SGD(nesterov={o.nesterov_update})",
                f"Keras SGD nesterov={s.get('nesterov')} vs cnn_train's nesterovUpdate={o.nesterov_update}",
            )
        )
    if momentum:
        out.append(
            Difference(
                "momentum form",
                "lr multiplies the momentum buffer at use",
                "lr folded into the buffer",
                "identical at constant lr; parts when the lr changes (harness.matconvnet_optimizer is exact)",
                "Keras SGD folds the learning rate into its momentum buffer (velocity = momentum*velocity "
                "- lr*g, i.e. lr*mom): the same as cnn_train's w += lr*mom at a constant rate, different "
                "from the first step after the rate changes",
            )
        )
    return out


def _solver_constants(s: SetUp) -> list[Difference]:
    """A Keras adaptive optimizer of cnn_train's solver kind against examples/+solver."""
    if s.ours or keras_solver(s.optimizer) != s.opts.solver or s.opts.solver is None:
        return []
    get, o = s.get, s.opts.solver_options
    kind = "optimizer constants"
    if s.cls == "RMSprop":
        return [
            Difference(
                kind,
                f"rho {o['rho']:g}, epsilon {o['epsilon']:g} outside sqrt",
                f"rho {get('rho')}, epsilon {get('epsilon')} inside sqrt",
                f"RMSprop(rho={o['rho']:g}) (epsilon's place: {_EXACT})",
                f"Keras RMSprop: rho {get('rho')} (cnn_train {o['rho']:g}), epsilon {get('epsilon')} INSIDE "
                f"the square root, w -= lr*g/sqrt(v + eps) (cnn_train {o['epsilon']:g} outside: "
                "g/(sqrt(v) + eps))",
            )
        ]
    if s.cls == "Adam":
        if (get("beta_1"), get("beta_2"), get("epsilon")) == (o["beta1"], o["beta2"], o["eps"]):
            return []
        return [
            Difference(
                kind,
                f"beta1 {o['beta1']:g}, beta2 {o['beta2']:g}, eps {o['eps']:g}",
                f"beta_1 {get('beta_1')}, beta_2 {get('beta_2')}, epsilon {get('epsilon')}",
                f"Adam(beta_1={o['beta1']:g}, beta_2={o['beta2']:g}, epsilon={o['eps']:g})",
                f"Keras Adam beta_1 {get('beta_1')}, beta_2 {get('beta_2')}, epsilon {get('epsilon')} "
                f"(cnn_train: {o['beta1']:g}, {o['beta2']:g}, {o['eps']:g})",
            )
        ]
    if s.cls == "Adagrad":
        return [
            Difference(
                kind,
                f"accumulator from 0, epsilon {o['epsilon']:g} outside sqrt",
                f"accumulator from {get('initial_accumulator_value')}, epsilon {get('epsilon')} inside sqrt",
                f"Adagrad(initial_accumulator_value=0.0) (epsilon's place: {_EXACT})",
                f"Keras Adagrad starts its accumulator at {get('initial_accumulator_value')} (cnn_train 0) "
                f"and puts epsilon {get('epsilon')} inside the square root (cnn_train {o['epsilon']:g} "
                "outside)",
            )
        ]
    return [  # Adadelta
        Difference(
            kind,
            f"step independent of the learning rate; rho {o['rho']:g}, epsilon {o['epsilon']:g}",
            f"step times the learning rate; rho {get('rho')}, epsilon {get('epsilon')}",
            f"Adadelta(learning_rate=1.0, rho={o['rho']:g}, epsilon={o['epsilon']:g})",
            "Keras Adadelta multiplies its step by the learning rate, cnn_train's adadelta ignores it "
            f"(fix: learning_rate=1.0); rho {get('rho')} (cnn_train {o['rho']:g}), epsilon "
            f"{get('epsilon')} (cnn_train {o['epsilon']:g})",
        )
    ]


def _matconvnet_settings(s: SetUp) -> list[Difference]:
    """A MatConvNet optimizer of the right solver, set up unlike cnn_train's options."""
    if not s.ours or s.optimizer.solver != s.opts.solver:
        return []
    want = {"momentum": s.opts.momentum, "nesterov": s.opts.nesterov_update} if s.opts.solver is None else {}
    want |= s.opts.solver_options  # the decay: with the regularisers, below
    return [
        Difference(
            key,
            repr(value),
            repr(s.config.get(key)),
            _EXACT,
            f"{s.cls} {key}={s.config.get(key)!r} where cnn_train has {value!r}",
        )
        for key, value in want.items()
        if s.config.get(key) != value
    ]


def _weight_decay(s: SetUp) -> list[Difference]:
    wd, decoupled = s.opts.weight_decay, s.get("weight_decay")
    if decoupled:
        return [
            Difference(
                "weight decay coupling",
                f"{wd:g} coupled through the gradient",
                f"weight_decay={decoupled} (decoupled)",
                f"L2(l2={wd / 2:g}) regularisers instead" if wd else "no weight_decay (cnn_train has none)",
                f"Keras weight_decay={decoupled} is decoupled (w -= lr*wd*w beside the update); cnn_train's "
                "weightDecay is added to the gradient (fix: L2(l2=wd/2) regularisers on kernels and biases, "
                "or harness.matconvnet_optimizer)",
            )
        ]
    view = s.per_variable
    if view is None and s.ours:
        # the exact optimizer, read from its configuration: coupled decay is its own
        k_wd = float(getattr(s.optimizer, "coupled_weight_decay", 0.0))
        if abs(k_wd - wd) <= 1e-15 * max(abs(wd), 1.0):
            return []
        return [
            Difference(
                "weight decay",
                f"{wd:g}, coupled",
                f"coupled_weight_decay={k_wd:g}",
                f"coupled_weight_decay={wd:g}",
                f"the optimizer's coupled weight decay {k_wd:g} where cnn_train's is {wd:g}",
            )
        ]
    if view is None and wd <= 0 or view is not None and not view.decays:
        return []
    if view is not None and view.decayed:
        return [
            Difference(
                "weight decay",
                f"{wd:g}*weightDecay(j), coupled",
                "; ".join(view.decays),
                "L2(l2=wd*weightDecay(j)/2) on each variable, or harness.matconvnet_optimizer",
                "coupled weight decay differs (2*l2 of the L2 regularisers plus the optimizer's coupled "
                "decay, vs cnn_train's weightDecay*weightDecay(j)): " + "; ".join(view.decays),
            )
        ]
    lrcfg = s.config.get("learning_rate")
    inverse_time = isinstance(lrcfg, dict) and lrcfg.get("class_name") == "InverseTimeDecay"
    return [
        Difference(
            "weight decay",
            f"{wd:g}, coupled (g += wd*w), biases included",
            "none"
            + (" (Keras 2's `decay` argument was a learning-rate decay, not weight decay)" * inverse_time),
            f"add L2 regularisers with l2 = {wd / 2:g} on kernels and biases (coupled), or "
            "harness.matconvnet_optimizer",
            "no coupled weight decay in Keras (no L2 regulariser, no weight_decay) where cnn_train adds "
            f"weightDecay*weightDecay(j)*w = {wd:g}*w to the gradients (fix: L2(l2=wd/2) on kernels and "
            "biases, or harness.matconvnet_optimizer)",
        )
    ]


def _schedule(s: SetUp) -> list[Difference]:
    if s.opts.solver == "adadelta":
        return []  # cnn_train's adadelta does not use the learning rate (_solver_constants)
    lr = np.asarray(s.opts.learning_rate, dtype=float).ravel()
    lrcfg = s.config.get("learning_rate")
    if isinstance(lrcfg, dict):
        name, config = str(lrcfg.get("class_name")), lrcfg.get("config", {})
        same = np.array_equal(np.asarray(config.get("learning_rate"), dtype=float).ravel(), lr)
        if (
            name == "MatConvNetSchedule"
            and same
            and np.unique(lr).size > 1
            and config.get("steps_per_epoch") == 1
        ):
            return [
                Difference(
                    "schedule steps",
                    f"{schedule_text(lr)}, one rate per epoch",
                    "MatConvNetSchedule(steps_per_epoch=1)",
                    "MatConvNetSchedule(rates, steps_per_epoch=<batches per epoch>)",
                    "the schedule is cnn_train's, but with steps_per_epoch=1 it counts epochs in steps: "
                    "each batch moves to the next epoch's rate unless training runs one batch per epoch "
                    "(fix: steps_per_epoch = the number of batches per epoch)",
                )
            ]
        if "Piecewise" in name or name == "MatConvNetSchedule" and same:
            return []
        k_sched = f"{name} {config}"
    else:
        k_sched = "?" if lrcfg is None else f"constant {float(lrcfg):g}"
    if np.unique(lr).size > 1:
        return [
            Difference(
                "learning-rate schedule",
                schedule_text(lr),
                k_sched,
                "keras.optimizers.schedules.PiecewiseConstantDecay at the epoch boundaries (in steps)",
                f"Keras' learning rate is {k_sched} where cnn_train's learningRate is {schedule_text(lr)} "
                "(fix: PiecewiseConstantDecay at the epoch boundaries, in steps)",
            )
        ]
    if isinstance(lrcfg, dict) or lrcfg is None or abs(float(lrcfg) - lr[0]) <= 1e-15:
        return []
    return [
        Difference(
            "learning rate",
            fmt_value(float(lr[0])),
            fmt_value(float(lrcfg)),
            f"learning_rate={lr[0]:g}",
            f"Keras' learning rate {float(lrcfg):g} where cnn_train's is {lr[0]:g} "
            f"(fix: learning_rate={lr[0]:g})",
        )
    ]


def _multipliers(s: SetUp) -> list[Difference]:
    """cnn_train multiplies the rate by learningRate(j) (conv biases [1 2] in cnn_mnist_init)."""
    fix = "harness.matconvnet_optimizer (per-variable multipliers)"
    view = s.per_variable
    if view is not None:
        if not view.rates:
            return []
        keras_value = "the optimizer's multipliers" if s.ours else "one learning rate for every variable"
        return [
            Difference(
                "learning-rate multiplier",
                "learningRate(j): " + ", ".join(view.rates),
                keras_value,
                fix,
                (
                    "the optimizer's multipliers differ from the net's"
                    if s.ours
                    else "Keras applies one learning rate to every variable"
                )
                + "; cnn_train multiplies the rate by learningRate(j): "
                + ", ".join(view.rates)
                + ("" if s.ours else " (fix: harness.matconvnet_optimizer)"),
            )
        ]
    multipliers = {
        tuple(np.asarray(l.learning_rate, dtype=float).ravel()[:2])
        for l in s.net.layers
        if l.type == "conv" and l.has("learning_rate")
    }
    if s.ours or not any(len(m) > 1 and m[1] != m[0] for m in multipliers):
        return []
    text = "learningRate " + " / ".join(fmt_value(list(m)) for m in sorted(multipliers))
    return [
        Difference(
            "bias learning-rate multiplier",
            text,
            "one learning rate for every variable",
            fix,
            "Keras applies one learning rate to every variable; cnn_train multiplies the rate by "
            f"learningRate(j): {text} (fix: harness.matconvnet_optimizer)",
        )
    ]


def _float32_constants(s: SetUp) -> list[Difference]:
    """Constants a Keras optimizer rounds to float32: those it ``ops.cast``s, its decoupled
    ``weight_decay``, and a learning rate held (or scheduled) in float32 when cnn_train's
    first rate is not a float32 number; they matter where Keras computes in float64."""
    if s.ours or s.dtype != "float64":
        return []
    rounded = []
    for name in FLOAT32_CASTS.get(s.cls, ()) + ("weight_decay",):
        value = s.get(name)
        if isinstance(value, float) and float(np.float32(value)) != value:
            rounded.append(f"{name} {value:g} -> {float(np.float32(value))!r}")
    try:
        lr = s.optimizer.learning_rate
        dt, value = str(lr.dtype), float(np.asarray(lr))
    except (AttributeError, TypeError, ValueError):
        dt, value = "", 0.0
    if "float32" in dt and float(np.float32(s.rate)) != s.rate:
        iteration = int(np.asarray(s.optimizer.iterations))
        rounded.append(f"learning rate in float32 ({value!r} at iteration {iteration})")
    if not rounded:
        return []
    return [
        Difference(
            "float32 constants",
            "float64 constants",
            "; ".join(rounded),
            "constants that are float32 numbers (binary fractions such as momentum 0.875), or "
            "harness.matconvnet_optimizer",
            f"Keras {s.cls} computes with float32-rounded constants ({'; '.join(rounded)}): relative "
            "differences of ~1e-8 in float64 comparisons",
        )
    ]


OPTIMIZER_RULES: tuple[Callable[[SetUp], list[Difference]], ...] = (
    _solver,
    _sgd_momentum,
    _solver_constants,
    _matconvnet_settings,
    _weight_decay,
    _schedule,
    _multipliers,
    _float32_constants,
)


def optimizer_differences(
    optimizer: Any,
    opts: TrainOpts,
    net: Net,
    *,
    rate: float | None = None,
    dtype: str = "float64",
    model: keras.Model | None = None,
    alignment: Alignment | None = None,
) -> list[Difference]:
    """Every rule of ``OPTIMIZER_RULES`` on this set-up. ``net``: tidied, with its
    multipliers; ``rate``: cnn_train's rate at the first step (default the schedule's
    first); ``model`` and ``alignment`` together: the per-variable view."""
    first = float(np.asarray(opts.learning_rate, dtype=float).ravel()[0]) if rate is None else float(rate)
    setup = SetUp(optimizer, opts, net, first, dtype, model, alignment if model is not None else None)
    return [d for rule in OPTIMIZER_RULES for d in rule(setup)]


def schedule_text(lr: Any) -> str:
    """A per-epoch learning rate as runs: "0.01 for 10 epochs, 0.001 for 1 epoch"."""
    lr = np.asarray(lr, dtype=float).ravel()
    if lr.size == 0:
        return "none"
    runs = []
    start = 0
    for i in range(1, lr.size + 1):
        if i == lr.size or lr[i] != lr[start]:
            runs.append(f"{lr[start]:g} for {i - start} epoch{'s' if i - start > 1 else ''}")
            start = i
    return ", ".join(runs)
