"""Keras 3 optimizers that perform cnn_train's update exactly (examples/cnn_train.m).

``MatConvNetSGD`` is accumulateGradients' SGD (momentum, optional Nesterov step);
``MatConvNetAdam``, ``MatConvNetRMSprop``, ``MatConvNetAdagrad`` and ``MatConvNetAdadelta``
are examples/+solver/<name>.m. All share cnn_train's handling of each parameter j of a
layer: with ``thisDecay = weightDecay * weightDecay(j)`` and ``thisLR = lr *
learningRate(j)``, the parameter is skipped unless ``thisLR > 0 || thisDecay > 0``; the
solver sees ``g = dzdw/d + thisDecay * w`` (coupled decay, biases included unless their
multiplier is 0) and ``thisLR``. SGD keeps the learning rate out of its buffer::

    mom = momentum * mom - g
    w   = w + thisLR * (nesterov ? momentum * mom - g : mom)

so its state is MatConvNet's ``mom`` (Keras' SGD keeps ``lr * mom``: equal at a constant
rate, different from the first step after the rate changes). The solver states are
MatConvNet's too (``matconvnet_state``): adam ``m``, ``v`` and a per-parameter step count
``t`` (a parameter cnn_train skips does not count the step); rmsprop/adagrad ``g_sqr``
(starting at 0, epsilon outside the square root); adadelta ``g_sqr`` and ``delta_sqr``
(the learning rate only decides whether the parameter is updated, never the step size).

The gradient. ``update_step`` receives the gradient of the Keras loss and uses it as
MatConvNet's ``dzdw / d``:

- dialect ``master`` (d = numWorkers = numSubBatches on one CPU): vl_nnsoftmaxloss divides
  by the batch size N, so with numSubBatches 1 the gradient of the master-dialect Keras
  loss (``keras_loss(net, "master")``: summed over pixels, averaged over the batch) IS
  ``dzdw / numWorkers``. With S sub-batches cnn_train averages S sub-batch means: the
  same number when N is a multiple of S and there is no bnorm layer (bnorm statistics are
  per sub-batch), otherwise a different one.
- dialect ``beta25`` (d = batchSize): the loss is the batch sum and cnn_train divides its
  derivative by the number of images, which is the gradient of the batch MEAN. Train with
  the master-dialect loss (any ``sum_over_batch_size`` Keras loss whose per-image value is
  MatConvNet's), or divide the summed loss's gradient by N; the beta25 Keras loss alone
  steps N times too far.
- Keras' own losses (categorical_crossentropy) average over pixels where MatConvNet sums:
  identical for 1 x 1 score maps.

Exactness. In float64 the update is MatConvNet's operation for operation: every constant is
made in the variable's dtype (``ops.convert_to_tensor(value, dtype)``; ``ops.cast`` of a
Python float goes through float32, which turns 0.9 into 0.89999997615814 -- Keras' own
optimizers do that to momentum, rho, epsilon and decay, and keep a float learning rate in
``floatx()``, i.e. float32); a float learning rate is held in a float64 variable, a
schedule's rates are float64 (``MatConvNetSchedule``).

bnorm moments (a known difference, not part of the exactness claim). cnn_train updates a
bnorm layer's third parameter ``[mu, sigma]`` as ``(1 - lr3) * m + lr3 * batch`` outside
the solver. In Keras the BatchNormalization layer updates ``moving_mean`` and
``moving_variance`` itself in its training call (with ``momentum = 1 - lr3``, as
``to_keras`` sets it): the mean follows MatConvNet's formula exactly, but Keras averages the
VARIANCE where MatConvNet averages sigma = sqrt(variance + epsilon), so the mapped sigma
differs from the first update on. The optimizers here never see those variables; gains
and biases (learningRate(1:2), weightDecay(1:2)) are updated exactly.

Parameters are matched to Keras variables by ``"<keras layer name>/<variable name>"`` (the
last two parts of ``variable.path``): ``kernel`` is weights{1} of a conv/convt (also a
Dense for a fully-connected conv), ``bias`` weights{2} (an ``AddBias`` layer's too),
``gamma``/``beta`` weights{1}/{2} of a bnorm (``harness.translate.weights.ROLES``). The
table (``multipliers``) is part of the config, so an optimizer round-trips through
``get_config``/``from_config`` without the net.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from harness.mcn.dagnn import DagNet
from harness.mcn.net import Net
from harness.mcn.options import McnError, is_empty
from harness.mcn.solvers import SOLVER_DEFAULTS, check_multipliers
from harness.mcn.train import prepare_net
from harness.mcn.train_options import TrainOpts, learning_rate_schedule, real_part
from harness.translate.build import keras_name
from harness.translate.schedule import MatConvNetSchedule
from harness.translate.weights import roles_for

__all__ = [
    "MatConvNetAdadelta",
    "MatConvNetAdagrad",
    "MatConvNetAdam",
    "MatConvNetRMSprop",
    "MatConvNetSGD",
    "MatConvNetSchedule",
    "OPTIMIZERS",
    "matconvnet_multipliers",
    "matconvnet_optimizer",
    "variable_key",
]

_PACKAGE = "mcn_harness"


def variable_key(variable) -> str:
    """``"<layer>/<variable>"``: the last two parts of a Keras variable's path (a Sequential
    model prefixes its own name, a Functional model does not)."""
    path = getattr(variable, "path", None) or str(variable.name)
    return "/".join(path.split("/")[-2:])


# ------------------------------------------------------------------------------ optimizers


class MatConvNetOptimizer(keras.optimizers.Optimizer):
    """accumulateGradients' per-parameter frame; subclasses give the solver.

    ``coupled_weight_decay`` is cnn_train's ``weightDecay`` (added to the gradient; Keras'
    own ``weight_decay`` argument is the decoupled kind and stays available, off by
    default). ``multipliers`` maps ``"<layer>/<variable>"`` to ``(learningRate(j),
    weightDecay(j))``; a trainable variable missing from it gets ``default_multipliers``
    or, when that is None, raises at build time (a silently defaulted bias multiplier is
    exactly the divergence this optimizer exists to avoid).
    """

    solver: str | None = None
    _slots: tuple[str, ...] = ()

    def __init__(
        self,
        learning_rate=0.001,
        coupled_weight_decay: float = 0.0005,
        multipliers: dict[str, Any] | None = None,
        default_multipliers: Any = None,
        name: str | None = None,
        **kwargs,
    ):
        number = not callable(learning_rate) and not isinstance(
            learning_rate, keras.optimizers.schedules.LearningRateSchedule
        )
        if number:
            learning_rate = real_part(learning_rate, "learning_rate")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if number:
            # Keras keeps a float rate in floatx() (float32): hold it in float64 instead.
            self._untrack_variable(self._learning_rate)
            with keras.name_scope(self.name, caller=self):
                lr = keras.Variable(
                    learning_rate,
                    name="learning_rate",
                    dtype="float64",
                    trainable=False,
                    aggregation="only_first_replica",
                )
            self._track_variable(lr)
            self._learning_rate = lr
        self.coupled_weight_decay = real_part(coupled_weight_decay, "coupled_weight_decay")
        table = {}
        for key, value in dict(multipliers or {}).items():
            table[str(key)] = _pair(value, f"multipliers[{key!r}]")
        self.multipliers = table
        self.default_multipliers = (
            None if default_multipliers is None else _pair(default_multipliers, "default_multipliers")
        )

    # -- state

    def build(self, variables):
        if self.built:
            return
        per_variable, missing = [], []
        for v in variables:
            key = variable_key(v)
            if key in self.multipliers:
                per_variable.append(self.multipliers[key])
            elif self.default_multipliers is not None:
                per_variable.append(self.default_multipliers)
            else:
                missing.append(key)
        if missing:
            raise McnError(
                f"Expected every trainable variable in the optimizer's multiplier table "
                f"({sorted(self.multipliers)}). Received variables without an entry: {missing} "
                "(name the Keras layers with matconvnet_optimizer(..., mapping={mcn name: keras name}) "
                "or pass default_multipliers=(1.0, 1.0), cnn_train's default)"
            )
        super().build(variables)
        self._per_variable = per_variable
        self._mcn_slots = {}
        for slot in self._slots:
            if slot == "t":
                self._mcn_slots[slot] = [
                    self.add_variable((), dtype=v.dtype, name=f"{v.path.replace('/', '_')}_t")
                    for v in variables
                ]
            else:
                self._mcn_slots[slot] = self.add_optimizer_variables(variables, slot)

    def matconvnet_state(self, variable) -> Any:
        """This variable's state as cnn_train's ``state.solverState{l}{j}``: an array
        (SGD: mom; rmsprop/adagrad: g_sqr) or a dict (adam: m, v, t; adadelta: g_sqr,
        delta_sqr), in the variable's Keras layout."""
        i = self._get_variable_index(variable)
        values = {}
        for slot in self._slots:
            v = self._mcn_slots[slot][i].numpy()
            values[slot] = float(v) if slot == "t" else np.asarray(v)
        return values[self._slots[0]] if len(self._slots) == 1 else values

    # -- update

    def update_step(self, gradient, variable, learning_rate):
        dt = variable.dtype
        i = self._get_variable_index(variable)
        lr_j, wd_j = self._per_variable[i]
        this_decay = self.coupled_weight_decay * wd_j  # opts.weightDecay * weightDecay(j)
        this_lr = ops.multiply(ops.cast(learning_rate, dt), _const(lr_j, dt))
        g = ops.cast(gradient, dt)
        if this_decay != 0:
            g = ops.add(g, ops.multiply(_const(this_decay, dt), variable))
        state = {slot: self._mcn_slots[slot][i] for slot in self._slots}
        updates = self._solve(variable, state, g, this_lr, dt)
        # `if thisLR > 0 || thisDecay > 0`: otherwise weight and state stay as they are.
        active = None if this_decay > 0 else ops.greater(this_lr, _const(0.0, dt))
        for target, value in updates:
            self.assign(target, value if active is None else ops.where(active, value, target))

    def _solve(self, w, state: dict, g, this_lr, dt) -> list[tuple[Any, Any]]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Keras' from_config replaces config["learning_rate"] in place: work on a copy.
        return super().from_config(dict(config), custom_objects=custom_objects)

    def get_config(self):
        return {
            **super().get_config(),
            "coupled_weight_decay": self.coupled_weight_decay,
            "multipliers": {k: list(v) for k, v in self.multipliers.items()},
            "default_multipliers": None
            if self.default_multipliers is None
            else list(self.default_multipliers),
        }


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        a = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        a = np.asarray([np.nan])
    if a.size != 2 or not np.isfinite(a).all():
        raise ValueError(
            f"Expected {name} to be (learningRate(j), weightDecay(j)), two finite numbers. "
            f"Received {name}={value!r}"
        )
    return float(a[0]), float(a[1])


def _const(value: float, dt):
    # Not ops.cast: a Python float cast to float64 is first rounded to float32.
    return ops.convert_to_tensor(value, dtype=dt)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MatConvNetSGD(MatConvNetOptimizer):
    """cnn_train's SGD: ``mom = momentum*mom - g``, ``w += thisLR * (nesterov ? momentum*mom
    - g : mom)``; the state is MatConvNet's ``mom`` (no learning rate inside)."""

    _slots = ("momentum",)

    def __init__(self, learning_rate=0.001, momentum: float = 0.9, nesterov: bool = False, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.momentum = real_part(momentum, "momentum")
        self.nesterov = bool(nesterov)

    def _solve(self, w, state, g, this_lr, dt):
        mu = _const(self.momentum, dt)
        mom = ops.subtract(ops.multiply(mu, state["momentum"]), g)
        step = ops.subtract(ops.multiply(mu, mom), g) if self.nesterov else mom
        return [(state["momentum"], mom), (w, ops.add(w, ops.multiply(this_lr, step)))]

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MatConvNetAdam(MatConvNetOptimizer):
    """examples/+solver/adam.m: ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g.^2``,
    ``t = t+1``, ``lr_t = thisLR*sqrt(1-b2^t)/(1-b1^t)``, ``w -= lr_t*m/(sqrt(v)+eps)``
    (eps 1e-8; Keras' Adam: 1e-7, and one global step count)."""

    solver = "adam"
    _slots = ("m", "v", "t")

    def __init__(
        self, learning_rate=0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, **kwargs
    ):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta1 = real_part(beta1, "beta1")
        self.beta2 = real_part(beta2, "beta2")
        self.eps = real_part(eps, "eps")

    def _solve(self, w, state, g, this_lr, dt):
        b1, b2 = _const(self.beta1, dt), _const(self.beta2, dt)
        m = ops.add(ops.multiply(b1, state["m"]), ops.multiply(_const(1 - self.beta1, dt), g))
        v = ops.add(ops.multiply(b2, state["v"]), ops.multiply(_const(1 - self.beta2, dt), ops.square(g)))
        t = ops.add(state["t"], _const(1.0, dt))
        one = _const(1.0, dt)
        lr_t = ops.multiply(
            this_lr,
            ops.divide(ops.sqrt(ops.subtract(one, ops.power(b2, t))), ops.subtract(one, ops.power(b1, t))),
        )
        step = ops.divide(ops.multiply(lr_t, m), ops.add(ops.sqrt(v), _const(self.eps, dt)))
        return [(state["m"], m), (state["v"], v), (state["t"], t), (w, ops.subtract(w, step))]

    def get_config(self):
        return {**super().get_config(), "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}


class _SquaredGradientSolver(MatConvNetOptimizer):
    """rmsprop/adagrad: ``g_sqr = g_sqr*rho + g.^2*scale``, ``w -= thisLR*g/(sqrt(g_sqr)+epsilon)``."""

    _slots = ("g_sqr",)
    _defaults: dict[str, float] = {}

    def __init__(self, learning_rate=0.001, epsilon: float | None = None, rho: float | None = None, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.epsilon = real_part(self._defaults["epsilon"] if epsilon is None else epsilon, "epsilon")
        self.rho = real_part(self._defaults["rho"] if rho is None else rho, "rho")

    def _scale(self) -> float | None:
        raise NotImplementedError

    def _solve(self, w, state, g, this_lr, dt):
        sq = ops.square(g)
        scale = self._scale()
        g_sqr = ops.add(
            ops.multiply(state["g_sqr"], _const(self.rho, dt)),
            sq if scale is None else ops.multiply(sq, _const(scale, dt)),
        )
        step = ops.divide(ops.multiply(this_lr, g), ops.add(ops.sqrt(g_sqr), _const(self.epsilon, dt)))
        return [(state["g_sqr"], g_sqr), (w, ops.subtract(w, step))]

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "rho": self.rho}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MatConvNetRMSprop(_SquaredGradientSolver):
    """examples/+solver/rmsprop.m: rho 0.99, epsilon 1e-8 OUTSIDE the square root (Keras'
    RMSprop: rho 0.9, epsilon 1e-7 inside it)."""

    solver = "rmsprop"
    _defaults = SOLVER_DEFAULTS["rmsprop"]

    def _scale(self):
        return 1 - self.rho


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MatConvNetAdagrad(_SquaredGradientSolver):
    """examples/+solver/adagrad.m: ``g_sqr = g_sqr*rho + g.^2`` from 0 (rho 1), epsilon 1e-10
    outside the square root (Keras' Adagrad starts its accumulator at 0.1, epsilon 1e-7
    inside)."""

    solver = "adagrad"
    _defaults = SOLVER_DEFAULTS["adagrad"]

    def _scale(self):
        return None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MatConvNetAdadelta(MatConvNetOptimizer):
    """examples/+solver/adadelta.m: rho 0.9, epsilon 1e-6; ``g_sqr = g_sqr*rho +
    g.^2*(1-rho)``, ``delta = -sqrt((delta_sqr+eps)/(g_sqr+eps)).*g``, ``delta_sqr =
    delta_sqr*rho + delta.^2*(1-rho)``, ``w += delta``. The learning rate is ignored (it
    only decides, with the decay, whether the parameter is updated at all); Keras'
    Adadelta multiplies delta by it."""

    solver = "adadelta"
    _slots = ("g_sqr", "delta_sqr")

    def __init__(self, learning_rate=0.001, epsilon: float = 1e-6, rho: float = 0.9, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.epsilon = real_part(epsilon, "epsilon")
        self.rho = real_part(rho, "rho")

    def _solve(self, w, state, g, this_lr, dt):
        rho, eps = _const(self.rho, dt), _const(self.epsilon, dt)
        one_minus = _const(1 - self.rho, dt)
        g_sqr = ops.add(ops.multiply(state["g_sqr"], rho), ops.multiply(ops.square(g), one_minus))
        ratio = ops.divide(ops.add(state["delta_sqr"], eps), ops.add(g_sqr, eps))
        delta = ops.multiply(ops.negative(ops.sqrt(ratio)), g)
        delta_sqr = ops.add(ops.multiply(state["delta_sqr"], rho), ops.multiply(ops.square(delta), one_minus))
        return [(state["g_sqr"], g_sqr), (state["delta_sqr"], delta_sqr), (w, ops.add(w, delta))]

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "rho": self.rho}


OPTIMIZERS: dict[str | None, type[MatConvNetOptimizer]] = {
    None: MatConvNetSGD,
    "adam": MatConvNetAdam,
    "rmsprop": MatConvNetRMSprop,
    "adagrad": MatConvNetAdagrad,
    "adadelta": MatConvNetAdadelta,
}


# ------------------------------------------------------------------------------ builders


def matconvnet_multipliers(net: Net, mapping: dict[str, str] | None = None) -> dict[str, tuple[float, float]]:
    """``{"<keras layer>/<variable>": (learningRate(j), weightDecay(j))}`` for every
    conv/convt/bnorm parameter of ``net`` after cnn_train's preparation (missing
    multipliers are ones). Keras layer names are ``keras_name(layer.name)`` (what
    ``to_keras`` uses) unless ``mapping`` gives ``{MatConvNet name: Keras name}``."""
    net = prepare_net(net)
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - {layer.name for layer in net.layers})
    if unknown:
        raise McnError(
            f"Expected mapping keys to be MatConvNet layer names. Received unknown names {unknown}"
        )
    table: dict[str, tuple[float, float]] = {}
    for layer in net.layers:
        roles = roles_for(layer.type, trainable=True)  # which Keras variable holds which weights{j}
        if not roles or not layer.weights:
            continue
        kname = mapping.get(layer.name, keras_name(layer.name))
        lr = np.asarray(layer.learning_rate, dtype=np.float64).ravel(order="F")
        wd = np.asarray(layer.weight_decay, dtype=np.float64).ravel(order="F")
        for role in roles:
            j = role.index
            if j >= len(layer.weights) or is_empty(layer.weights[j]):
                continue
            if j >= lr.size or j >= wd.size:
                raise McnError(
                    f"layer '{layer.name}' ({layer.type}): Expected learning_rate and weight_decay to have "
                    f"at least {j + 1} entries. "
                    f"Received learning_rate={lr.tolist()}, weight_decay={wd.tolist()}"
                )
            table[f"{kname}/{role.variable}"] = (float(lr[j]), float(wd[j]))
    return table


def matconvnet_optimizer(
    net: Net | DagNet,
    train_opts: TrainOpts | None = None,
    schedule: Any = None,
    steps_per_epoch: int = 1,
    *,
    mapping: dict[str, str] | None = None,
    name: str | None = None,
) -> MatConvNetOptimizer:
    """The Keras optimizer that performs cnn_train's update for ``net`` with ``train_opts``
    (cnn_train_dag's for a DagNet: the multipliers of each param, for ``to_keras_dag(net)``).

    The class follows ``train_opts.solver`` (SGD with ``momentum``/``nesterov_update``, or
    adam/rmsprop/adagrad/adadelta with ``solver_options``); ``weight_decay`` becomes the
    coupled decay; per-variable multipliers come from ``matconvnet_multipliers(net,
    mapping)``. The learning rate is ``schedule`` (or ``train_opts.learning_rate``): one
    value gives a constant float64 rate, several a ``MatConvNetSchedule`` with
    ``steps_per_epoch`` iterations per epoch. Like cnn_train, a bnorm layer whose
    learningRate has fewer than three entries is refused (cnn_train reads learningRate(3)).
    The gradient passed to the optimizer must be MatConvNet's ``dzdw / d``: the gradient of
    the batch-mean loss (see the module docstring for both dialects).
    """
    opts = TrainOpts() if train_opts is None else train_opts
    if not isinstance(opts, TrainOpts):
        raise McnError(f"Expected train_opts to be a TrainOpts. Received train_opts={type(opts).__name__}")
    if isinstance(net, DagNet):
        from harness.translate.dag_weights import dag_multipliers

        multipliers = dag_multipliers(net)  # each param's own; moments are the Keras layer's
    else:
        prepared = prepare_net(net)
        check_multipliers(prepared, [len(layer.weights) for layer in prepared.layers])
        multipliers = matconvnet_multipliers(prepared, mapping)
    rates = opts.learning_rate if schedule is None else learning_rate_schedule(schedule, "schedule")
    learning_rate: Any = float(rates[0]) if rates.size == 1 else MatConvNetSchedule(rates, steps_per_epoch)
    common = {
        "learning_rate": learning_rate,
        "coupled_weight_decay": opts.weight_decay,
        "multipliers": multipliers,
        "name": name,
    }
    cls = OPTIMIZERS[opts.solver]
    if opts.solver is None:
        return cls(momentum=opts.momentum, nesterov=opts.nesterov_update, **common)
    return cls(**opts.solver_options, **common)
