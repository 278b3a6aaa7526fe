"""cnn_train: MatConvNet's SGD loop, replayed step by step (examples/cnn_train.m).

Owns the parameter update of ``accumulateGradients`` (SGD with momentum, optional Nesterov
step, the bnorm moments running average) and the ``examples/+solver`` functions (adam,
rmsprop, adagrad, adadelta), the sub-batch split and gradient accumulation of
``processEpoch``, and the training statistics (objective, ``error_multiclass``) in both
dialects: ``"master"`` (commit 1e5ae7b7) divides gradients by the number of workers
(= ``numSubBatches`` on one CPU), ``"beta25"`` (tag v1.0-beta25) by the batch size.

The shuffling of cnn_train (``randperm`` after ``rng(epoch + randomSeed)``) is not
reproduced: ``cnn_train`` here replays a given batch order, e.g. the one a MatConvNet run
logged. ``state`` is a dict ``{"solverState": [[...] per parameter] per layer}`` exactly
like cnn_train's ``state`` (and ``load_checkpoint(...).state``): each entry is ``0`` before
the first update, the momentum array for SGD, the ``g_sqr`` array for rmsprop/adagrad, or a
dict mirroring the MATLAB struct (adam: ``m``, ``v``, ``t``; adadelta: ``g_sqr``,
``delta_sqr``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d, float_dtype, is_empty
from harness.mcn.simplenn import DIALECTS, vl_simplenn, vl_simplenn_tidy

__all__ = [
    "ERROR_FUNCTIONS",
    "SOLVERS",
    "SOLVER_DEFAULTS",
    "TrainOpts",
    "cnn_train",
    "cnn_train_step",
    "error_multiclass",
    "prepare_net",
]

# examples/+solver/<name>.m called without arguments returns these default options.
SOLVER_DEFAULTS: dict[str, dict[str, float]] = {
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    "rmsprop": {"epsilon": 1e-8, "rho": 0.99},
    "adagrad": {"epsilon": 1e-10, "rho": 1.0},
    "adadelta": {"epsilon": 1e-6, "rho": 0.9},
}
SOLVERS = tuple(SOLVER_DEFAULTS)
ERROR_FUNCTIONS = ("multiclass", "binary", "none")
# cnn_train's default errorLabels per errorFunction: the statistics' names.
_ERROR_LABELS = {"multiclass": ["top1err", "top5err"], "binary": ["binerr"], "none": []}

# cnn_train options that do not change the replayed numbers (I/O, plotting, shuffling,
# epoch bookkeeping, device settings); from_matconvnet accepts and ignores them.
_IGNORED_OPTIONS = frozenset(
    {
        "expDir",
        "continue",
        "train",
        "val",
        "epochSize",
        "prefetch",
        "numEpochs",
        "saveSolverState",
        "randomSeed",
        "memoryMapFile",
        "profile",
        "parameterServer",
        "conserveMemory",
        "sync",
        "cudnn",
        "errorLabels",
        "plotDiagnostics",
        "plotStatistics",
    }
)
_MAPPED_OPTIONS = {
    "momentum": "momentum",
    "weightDecay": "weight_decay",
    "nesterovUpdate": "nesterov_update",
    "solver": "solver",
    "solverOpts": "solver_opts",
    "numSubBatches": "num_sub_batches",
    "batchSize": "batch_size",
    "learningRate": "learning_rate",
    "errorFunction": "error_function",
}


# ----------------------------------------------------------------------------- options


def _real(value: Any, name: str) -> float:
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        v = np.asarray([np.nan])
    if v.size != 1 or not np.isfinite(v).all() or isinstance(value, bool):
        raise McnError(f"Expected {name} to be a finite real number. Received {name}={value!r}")
    return float(v.ravel()[0])


def _count(value: Any, name: str) -> int:
    v = _real(value, name)
    if v != round(v) or v < 1:
        raise McnError(f"Expected {name} to be a positive integer. Received {name}={value!r}")
    return int(v)


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    v = _real(value, name)
    if v not in (0.0, 1.0):
        raise McnError(f"Expected {name} to be a boolean (or 0/1). Received {name}={value!r}")
    return bool(v)


def _solver_name(value: Any) -> str | None:
    """``[]``/``''``/None mean cnn_train's built-in SGD; ``@solver.adam``, ``solver.adam``
    and ``adam`` all name examples/+solver/adam.m."""
    if value is None or (not isinstance(value, str) and is_empty(value)):
        return None
    if isinstance(value, str):
        name = value.strip()
        if not name:
            return None
        name = name.removeprefix("@").removeprefix("solver.")
        if name in SOLVERS:
            return name
    raise McnError(
        f"Expected solver to be None (SGD with momentum) or one of {list(SOLVERS)}. Received solver={value!r}"
    )


@dataclass
class TrainOpts:
    """cnn_train's options that shape the update (MatConvNet names in snake_case).

    ``momentum`` 0.9, ``weight_decay`` 0.0005, ``nesterov_update`` False: cnn_train's
    defaults. ``solver``: None (built-in SGD with momentum) or an examples/+solver name;
    ``solver_opts`` overrides that solver's options by MatConvNet's names (adam: beta1,
    beta2, eps; rmsprop/adagrad/adadelta: epsilon, rho), merged into its defaults as
    vl_argparse does. ``num_sub_batches``: each batch is processed in this many interleaved
    sub-batches whose gradients are summed. ``batch_size``: None = the images given to a
    step make one batch; otherwise a step refuses more images than that. ``learning_rate``:
    a scalar or a per-epoch schedule (cnn_train default 0.001), used when no explicit rate
    or schedule is passed. ``error_function``: 'multiclass' (top1err/top5err), 'binary'
    (binerr) or 'none'. ``dialect``: 'master' or 'beta25'.
    """

    momentum: float = 0.9
    weight_decay: float = 0.0005
    nesterov_update: bool = False
    solver: str | None = None
    solver_opts: dict[str, float] = field(default_factory=dict)
    num_sub_batches: int = 1
    dialect: str = "master"
    batch_size: int | None = None
    learning_rate: Any = 0.001
    error_function: str = "multiclass"

    def __post_init__(self) -> None:
        self.momentum = _real(self.momentum, "momentum")
        self.weight_decay = _real(self.weight_decay, "weight_decay")
        self.nesterov_update = _flag(self.nesterov_update, "nesterov_update")
        self.solver = _solver_name(self.solver)
        if not isinstance(self.solver_opts, dict):
            raise McnError(f"Expected solver_opts to be a dict. Received solver_opts={self.solver_opts!r}")
        if self.solver_opts:
            if self.solver is None:
                # cnn_train only declares solverOpts when a solver is given: vl_argparse then
                # rejects 'solverOpts' as an unknown parameter.
                raise McnError(
                    "Expected solver_opts to be empty when solver is None (SGD). "
                    f"Received solver_opts={self.solver_opts!r}"
                )
            known = SOLVER_DEFAULTS[self.solver]
            unknown = sorted(set(self.solver_opts) - set(known))
            if unknown:
                raise McnError(
                    f"Expected solver_opts keys among {list(known)} for solver={self.solver!r}. "
                    f"Received solver_opts={self.solver_opts!r}"
                )
            self.solver_opts = {k: _real(v, f"solver_opts[{k!r}]") for k, v in self.solver_opts.items()}
        self.num_sub_batches = _count(self.num_sub_batches, "num_sub_batches")
        if self.dialect not in DIALECTS:
            raise McnError(
                f"Expected dialect to be one of {list(DIALECTS)}. Received dialect={self.dialect!r}"
            )
        if self.batch_size is not None:
            self.batch_size = _count(self.batch_size, "batch_size")
        self.learning_rate = _schedule(self.learning_rate, "learning_rate")
        if self.error_function not in ERROR_FUNCTIONS:
            raise McnError(
                f"Expected error_function to be one of {list(ERROR_FUNCTIONS)}. "
                f"Received error_function={self.error_function!r}"
            )

    @property
    def solver_options(self) -> dict[str, float]:
        """The solver's options: its defaults overridden by ``solver_opts``."""
        if self.solver is None:
            return {}
        return {**SOLVER_DEFAULTS[self.solver], **self.solver_opts}

    @classmethod
    def from_matconvnet(cls, opts: dict[str, Any], *, dialect: str = "master") -> TrainOpts:
        """Build from cnn_train's name/value options (``batchSize``, ``numSubBatches``,
        ``learningRate``, ``weightDecay``, ``momentum``, ``nesterovUpdate``, ``solver``,
        ``solverOpts``, ``errorFunction``). Options that do not affect the update
        (``expDir``, ``numEpochs``, ``epochSize``, plotting ...) are ignored; more than one
        GPU, a finite ``backPropDepth`` or a ``postEpochFn`` are not reproduced and raise."""
        if not isinstance(opts, dict):
            raise McnError(f"Expected opts to be a dict of cnn_train options. Received opts={opts!r}")
        kwargs: dict[str, Any] = {"dialect": dialect}
        for key, value in opts.items():
            if key in _MAPPED_OPTIONS:
                if key == "solverOpts" and not isinstance(value, dict) and is_empty(value):
                    continue
                kwargs[_MAPPED_OPTIONS[key]] = value
            elif key == "gpus":
                if np.size(value) > 1:
                    raise McnError(
                        f"Expected gpus to list at most one GPU (one worker). Received gpus={value!r}"
                    )
            elif key == "backPropDepth":
                if np.isfinite(_real(value, "backPropDepth")):
                    raise McnError(f"Expected backPropDepth to be inf. Received backPropDepth={value!r}")
            elif key == "postEpochFn":
                if not is_empty(value):
                    raise McnError(f"Expected postEpochFn to be empty. Received postEpochFn={value!r}")
            elif key not in _IGNORED_OPTIONS:
                raise McnError(f"Expected a cnn_train option name. Received opts[{key!r}]={value!r}")
        return cls(**kwargs)


def _schedule(value: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        a = np.asarray([np.nan])
    if a.size == 0 or not np.isfinite(a).all():
        raise McnError(
            f"Expected {name} to be a finite number or a non-empty vector of them. Received {name}={value!r}"
        )
    return a


# ------------------------------------------------------------------------- preparation


def _multipliers(layer: Any, key: str) -> np.ndarray:
    value = layer.get(key)
    try:
        return np.asarray(value, dtype=np.float64).ravel(order="F")
    except (TypeError, ValueError):
        raise McnError(
            f"layer '{layer.name}' ({layer.type}): Expected field '{key}' to be numeric. "
            f"Received {key}={value!r}"
        ) from None


def prepare_net(net: Net, dtype: Any = None) -> Net:
    """cnn_train's initialisation (returns a new Net): ``vl_simplenn_tidy``, then every
    layer without ``learningRate``/``weightDecay`` gets ``ones(1, numel(weights))`` (biases
    and bnorm moments included), and ``net.layers{end-1}.precious = 1``. With ``dtype``
    the weights are cast to it (MatConvNet needs data and weights of one class)."""
    net = vl_simplenn_tidy(net)
    if len(net.layers) < 2:
        raise McnError(
            "Expected net to have at least 2 layers (predictions, then a loss). "
            f"Received {len(net.layers)} layer(s)"
        )
    for layer in net.layers:
        ones = np.ones((1, len(layer.weights)))
        if not layer.has("learning_rate"):
            layer.learning_rate = ones.copy()
        if not layer.has("weight_decay"):
            layer.weight_decay = ones.copy()
        if dtype is not None:
            layer.weights = [np.asarray(w).astype(dtype, copy=False) for w in layer.weights]
    net.layers[-2].precious = True
    return net


def _fresh_state(net: Net) -> dict[str, Any]:
    # processEpoch: state.solverState{i} = cell(1, numel(weights)) filled with 0.
    return {"solverState": [[0] * len(layer.weights) for layer in net.layers]}


def _copy_state(state: Any, net: Net) -> dict[str, Any]:
    if state is None:
        return _fresh_state(net)
    if not isinstance(state, dict):
        raise McnError(f"Expected state to be None or a dict with 'solverState'. Received state={state!r}")
    solver_state = state.get("solverState")
    if (
        solver_state is None
        or (not isinstance(solver_state, list) and is_empty(solver_state))
        or (isinstance(solver_state, list) and not solver_state)
    ):
        return {**state, "solverState": _fresh_state(net)["solverState"]}
    if not isinstance(solver_state, list) or len(solver_state) != len(net.layers):
        raise McnError(
            f"Expected state['solverState'] to be a list with one entry per layer ({len(net.layers)}). "
            f"Received solverState={solver_state!r}"
        )
    copied = []
    for i, (entry, layer) in enumerate(zip(solver_state, net.layers, strict=True)):
        entry = entry if isinstance(entry, list) else ([] if is_empty(entry) else [entry])
        if len(entry) != len(layer.weights):
            raise McnError(
                f"Expected state['solverState'][{i}] to have one entry per weight of layer '{layer.name}' "
                f"({len(layer.weights)}). Received {len(entry)}"
            )
        where = f"state['solverState'][{i}]"
        copied.append(
            [
                {k: _shaped(v, w, f"{where}[{j}][{k!r}]") for k, v in s.items()}
                if isinstance(s, dict)
                else _shaped(s, w, f"{where}[{j}]")
                for j, (s, w) in enumerate(zip(entry, layer.weights, strict=True))
            ]
        )
    return {**state, "solverState": copied}


def _shaped(s: Any, w: Any, name: str) -> Any:
    """A state array in its weight's shape. A checkpoint stores MATLAB's shapes (a 1 x K
    bias, a C x 2 moments array); the weights may carry the 4-D form of the same elements,
    and NumPy would broadcast the two into a wrong shape."""
    if np.ndim(s) == 0:
        return s
    a = np.asarray(s)
    if a.size != np.size(w):
        raise McnError(
            f"Expected {name} to have {np.size(w)} elements (its weight's). Received shape={a.shape}"
        )
    return a.reshape(np.shape(w))


# -------------------------------------------------------------------------- statistics


def error_multiclass(predictions: np.ndarray, labels: Any) -> np.ndarray:
    """cnn_train's ``error_multiclass``: ``[top-1 errors; top-5 errors]`` of a batch as a
    float32 2-vector (MatConvNet computes ``mass = single(labels > 0)``, so the sums are
    single). Classes are ranked by ``sort(predictions, 3, 'descend')`` (stable: ties keep
    channel order; NaN first); labels are one per image or ``H x W x 1 x N``, with an optional
    second channel of instance weights; label 0 counts nothing."""
    p = as_4d(predictions, "predictions")
    n = p.shape[3]
    lab = np.asarray(labels, dtype=np.float64)
    lab = lab.ravel(order="F").reshape(1, 1, 1, n) if lab.size == n else as_4d(lab, "labels")
    mass = (lab[:, :, :1, :] > 0).astype(np.float32)
    if lab.shape[2] == 2:
        mass = mass * lab[:, :, 1:2, :].astype(np.float32)
        lab = lab[:, :, :1, :]
    try:
        np.broadcast_shapes(p.shape, lab.shape)
    except ValueError:
        raise McnError(
            f"Expected labels broadcastable against predictions {p.shape}. Received labels.shape={lab.shape}"
        ) from None
    key = np.where(np.isnan(p), -np.inf, -p.astype(np.float64))
    ranked = np.argsort(key, axis=2, kind="stable") + 1.0
    m = min(5, p.shape[2])
    wrong = ranked[:, :, :m, :] != lab
    top1 = np.sum(mass * wrong[:, :, :1, :], dtype=np.float32)
    top5 = np.sum(mass * wrong.min(axis=2, keepdims=True), dtype=np.float32)
    return np.array([top1, top5], dtype=np.float32)


def _error_binary(predictions: np.ndarray, labels: Any) -> np.ndarray:
    # sum of a logical array: a double in MATLAB.
    return np.array([np.sum(np.asarray(predictions) * np.asarray(labels) < 0)], dtype=np.float64)


def _batch_errors(opts: TrainOpts, res: list, labels: Any, n: int) -> np.ndarray:
    """One sub-batch's column ``[objective; errors]`` as processEpoch builds it. The
    concatenation ``[double; single]`` is single, so with error_multiclass the objective
    is rounded to float32 here and all statistics accumulate in single."""
    loss = np.asarray(res[-1].x, dtype=np.float64)
    objective = np.sum(n * loss) if opts.dialect == "master" else np.sum(loss)
    if opts.error_function == "multiclass":
        return np.concatenate([[np.float32(objective)], error_multiclass(res[-2].x, labels)])
    if opts.error_function == "binary":
        return np.concatenate([[objective], _error_binary(res[-2].x, labels)])
    return np.array([objective])


# ------------------------------------------------------------------------------ update


def _taccum(alpha: float, a: Any, beta: float, b: Any, dt: np.dtype) -> Any:
    """vl_taccum: ``alpha * a + beta * b`` (scal then axpy in the data's precision)."""
    return dt.type(alpha) * a + dt.type(beta) * b


def _is_fresh(s: Any) -> bool:
    # MATLAB's isequal(state, 0).
    return not isinstance(s, dict) and np.ndim(s) == 0 and float(s) == 0.0


def _solver_step(
    name: str, w: np.ndarray, s: Any, g: np.ndarray, o: dict[str, float], lr: float, dt: np.dtype
) -> tuple[np.ndarray, Any]:
    """examples/+solver/<name>.m: ``[w, state] = solver(w, state, grad, opts, lr)``."""
    c = dt.type
    if name == "adam":
        if _is_fresh(s):
            s = {"m": 0, "v": 0, "t": 0}
        elif not isinstance(s, dict) or not {"m", "v", "t"} <= set(s):
            raise McnError(f"Expected the adam state to be 0 or a dict with m, v, t. Received state={s!r}")
        m = c(o["beta1"]) * s["m"] + c(1 - o["beta1"]) * g
        v = c(o["beta2"]) * s["v"] + c(1 - o["beta2"]) * g**2
        t = float(s["t"]) + 1
        lr_t = lr * (((1 - o["beta2"] ** t) ** 0.5) / (1 - o["beta1"] ** t))
        w = w - c(lr_t) * m / (np.sqrt(v) + c(o["eps"]))
        return w, {"m": m, "v": v, "t": t}
    if name in ("rmsprop", "adagrad"):
        if isinstance(s, dict):
            raise McnError(f"Expected the {name} state to be 0 or an array. Received state={s!r}")
        if name == "rmsprop":
            g_sqr = s * c(o["rho"]) + g**2 * c(1 - o["rho"])
        else:
            g_sqr = s * c(o["rho"]) + g**2
        w = w - c(lr) * g / (np.sqrt(g_sqr) + c(o["epsilon"]))
        return w, g_sqr
    # adadelta sets its own step: the learning rate is ignored.
    if _is_fresh(s):
        s = {"g_sqr": 0, "delta_sqr": 0}
    elif not isinstance(s, dict) or not {"g_sqr", "delta_sqr"} <= set(s):
        raise McnError(
            f"Expected the adadelta state to be 0 or a dict with g_sqr, delta_sqr. Received state={s!r}"
        )
    rho, eps = c(o["rho"]), c(o["epsilon"])
    g_sqr = s["g_sqr"] * rho + g**2 * c(1 - o["rho"])
    new_delta = -np.sqrt((s["delta_sqr"] + eps) / (g_sqr + eps)) * g
    delta_sqr = s["delta_sqr"] * rho + new_delta**2 * c(1 - o["rho"])
    return w + new_delta, {"g_sqr": g_sqr, "delta_sqr": delta_sqr}


def _check_multipliers(net: Net, num_params: list[int]) -> None:
    """Fail where accumulateGradients would index past learningRate/weightDecay, visiting
    layers and parameters in its order (last first), before anything is updated."""
    for i in range(len(net.layers) - 1, -1, -1):
        layer = net.layers[i]
        for j in range(num_params[i] - 1, -1, -1):
            keys = (
                ("learning_rate",) if j == 2 and layer.type == "bnorm" else ("weight_decay", "learning_rate")
            )
            for key in keys:
                values = _multipliers(layer, key)
                if values.size <= j:
                    raise McnError(
                        f"layer {i + 1} '{layer.name}' ({layer.type}): Expected field '{key}' to have at "
                        f"least {j + 1} entries (cnn_train reads {key}({j + 1})). "
                        f"Received {key}={values.tolist()}"
                    )


def _accumulate_gradients(
    net: Net, dzdw: list[list[Any]], state: dict, opts: TrainOpts, lr: float, batch_size: int, dt: np.dtype
) -> None:
    """cnn_train's accumulateGradients, in place on ``net`` and ``state``.

    For parameter j of layer l with ``thisDecay = weightDecay * wd(j)`` and
    ``thisLR = lr * lr(j)``, skipped unless ``thisLR > 0 || thisDecay > 0``:
    ``g = dzdw / d + thisDecay * w`` (d = numSubBatches in master, the batch size in
    beta25), then SGD ``mom = momentum * mom - g``, ``w = w + thisLR * (nesterov ?
    momentum * mom - g : mom)``, or a solver ``[w, s] = solver(w, s, g, opts, thisLR)``.
    bnorm moments (j = 3) instead take ``w = (1 - lr(3)) * w + lr(3) / d * dzdw``: the
    layer's own rate, not multiplied by the global one.
    """
    d = opts.num_sub_batches if opts.dialect == "master" else batch_size
    solver_state = state["solverState"]
    for i in range(len(net.layers) - 1, -1, -1):
        layer = net.layers[i]
        for j in range(len(dzdw[i]) - 1, -1, -1):
            w = layer.weights[j]
            der = dzdw[i][j]
            der = np.zeros((0, 0), dtype=dt) if der is None else np.asarray(der)
            if der.size != np.size(w):
                raise McnError(
                    f"layer {i + 1} '{layer.name}' ({layer.type}): Expected the derivative of "
                    f"weights[{j}] to have {np.size(w)} elements. Received {der.size}"
                )
            der = der.reshape(np.shape(w))
            lr_j = _multipliers(layer, "learning_rate")
            if j == 2 and layer.type == "bnorm":
                this_lr = lr_j[j]
                layer.weights[j] = _taccum(1 - this_lr, w, this_lr / d, der, dt)
                continue
            this_decay = opts.weight_decay * _multipliers(layer, "weight_decay")[j]
            this_lr = lr * lr_j[j]
            if not (this_lr > 0 or this_decay > 0):
                continue
            g = _taccum(1 / d, der, this_decay, w, dt)
            if opts.solver is None:
                mom = _taccum(opts.momentum, solver_state[i][j], -1, g, dt)
                solver_state[i][j] = mom
                delta = dt.type(opts.momentum) * mom - g if opts.nesterov_update else mom
                layer.weights[j] = _taccum(1, w, this_lr, delta, dt)
            else:
                layer.weights[j], solver_state[i][j] = _solver_step(
                    opts.solver, w, solver_state[i][j], g, opts.solver_options, this_lr, dt
                )


# -------------------------------------------------------------------------------- step


def _labels_of(labels: Any, n: int) -> tuple[np.ndarray, bool]:
    """Labels as given to the loss layer; True when they are one per image (a row)."""
    try:
        lab = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError):
        raise McnError(f"Expected labels to be a numeric array. Received labels={labels!r}") from None
    if lab.ndim <= 2 and lab.size == n:
        return lab.reshape(1, n), True
    lab = as_4d(lab, "labels")
    if lab.shape[3] != n:
        raise McnError(
            f"Expected labels with one entry per image (N={n}) or shape H x W x K x N. "
            f"Received labels.shape={np.shape(labels)}"
        )
    return lab, False


def _train_batch(
    net: Net,
    state: dict,
    x: np.ndarray,
    labels: Any,
    lr: float,
    opts: TrainOpts,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray | None, int, float]:
    """One iteration of processEpoch's batch loop in 'train' mode, in place on a prepared
    net and state. Returns the summed statistics column (None for no images), the number
    of images and the objective of the batch (float64, without the float32 rounding)."""
    dt = float_dtype(x, "x")
    x = as_4d(x, "x")
    n = x.shape[3]
    if n == 0:
        raise McnError(f"Expected x to hold at least one image. Received x.shape={x.shape}")
    if opts.batch_size is not None and n > opts.batch_size:
        raise McnError(
            f"Expected at most batch_size={opts.batch_size} images per step. Received x with N={n} images"
        )
    lab, per_image = _labels_of(labels, n)
    S = opts.num_sub_batches
    errors = None
    dzdw: list[list[Any]] | None = None
    total = 0.0
    num = 0
    for s in range(S):
        # batch = subset(batchStart : numSubBatches : batchEnd), batchStart = t + (s-1)
        idx = np.arange(s, n, S)
        num += idx.size
        if idx.size == 0:
            continue
        lab_s = lab[:, idx] if per_image else lab[..., idx]
        res = vl_simplenn(net, x[..., idx], 1.0, lab_s, mode="normal", dialect=opts.dialect, rng=rng)
        if dzdw is None:
            dzdw = [list(r.dzdw) for r in res[:-1]]
        else:
            # vl_simplenn 'accumulate': res(i).dzdw{j} = res(i).dzdw{j} + dzdw{j}
            dzdw = [
                [a + b for a, b in zip(acc, r.dzdw, strict=True)] for acc, r in zip(dzdw, res, strict=False)
            ]
        column = _batch_errors(opts, res, lab_s, idx.size)
        errors = column if errors is None else errors + column
        loss = np.asarray(res[-1].x, dtype=np.float64)
        total += float(np.sum(idx.size * loss) if opts.dialect == "master" else np.sum(loss))
    _check_multipliers(net, [len(d) for d in dzdw])
    _accumulate_gradients(net, dzdw, state, opts, lr, n, dt)
    return errors, num, total / num


def cnn_train_step(
    net: Net,
    state: dict | None,
    x: np.ndarray,
    labels: Any,
    *,
    learning_rate: float | None = None,
    opts: TrainOpts | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Net, dict, float]:
    """One SGD step of cnn_train on the batch ``x`` (``H x W x C x N``) with ``labels``.

    Mirrors examples/cnn_train.m (processEpoch's batch loop in 'train' mode, then
    accumulateGradients). The net is prepared as cnn_train does (``prepare_net``: tidy,
    missing learningRate/weightDecay multipliers filled with ones, weights cast to x's
    dtype); ``state`` None starts every solver state at 0. With ``num_sub_batches`` S,
    sub-batch s (1-based) takes images s, s+S, s+2S, ...; each runs vl_simplenn forward and
    backward (``dzdy = 1``, 'normal' mode) and the parameter derivatives are summed. The
    update is ``accumulateGradients`` (see ``_accumulate_gradients``). ``learning_rate``
    defaults to the first entry of ``opts.learning_rate``. Dropout masks come from ``rng``.

    Returns ``(net, state, objective)``, new objects (the inputs are not modified);
    ``objective`` is the batch's loss per image as cnn_train reports it (master: sum over
    sub-batches of N_s * loss_s, divided by N; beta25: the summed losses divided by N),
    in float64 (cnn_train's own statistics round it to float32, see ``cnn_train``).
    """
    opts = TrainOpts() if opts is None else opts
    if not isinstance(opts, TrainOpts):
        raise McnError(f"Expected opts to be a TrainOpts. Received opts={type(opts).__name__}")
    lr = float(opts.learning_rate[0]) if learning_rate is None else _real(learning_rate, "learning_rate")
    dt = float_dtype(x, "x")
    net = prepare_net(net, dt)
    state = _copy_state(state, net)
    _, _, objective = _train_batch(net, state, x, labels, lr, opts, rng)
    return net, state, objective


# ------------------------------------------------------------------------------- loop


def _epoch_batches(entry: Any, e: int, n_all: int) -> list[np.ndarray]:
    items = list(entry) if isinstance(entry, list | tuple) else [entry]
    if items and all(np.ndim(b) == 0 for b in items):
        items = [np.asarray(items)]  # one batch given as a flat list of indices
    out = []
    for k, b in enumerate(items):
        try:
            idx = np.asarray(b, dtype=np.float64).ravel(order="F")
        except (TypeError, ValueError):
            idx = np.asarray([np.nan])
        if idx.size == 0 or not np.isfinite(idx).all() or np.any(idx != np.round(idx)):
            raise McnError(
                f"Expected batches[{e}][{k}] to be non-empty 1-based image indices. Received {b!r}"
            )
        if idx.min() < 1 or idx.max() > n_all:
            raise McnError(
                f"Expected batches[{e}][{k}] to index images 1..{n_all} (1-based). "
                f"Received {idx.astype(int).tolist()}"
            )
        out.append(idx.astype(np.int64) - 1)
    return out


def cnn_train(
    net: Net,
    images: np.ndarray,
    labels: Any,
    opts: TrainOpts | None,
    schedule: Any,
    batches: list,
    *,
    state: dict | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Net, dict, dict[str, np.ndarray]]:
    """Replay a cnn_train run (examples/cnn_train.m, training set only).

    ``images`` is ``H x W x C x Nall``, ``labels`` ``1 x Nall`` (or ``H x W x K x Nall``);
    ``batches[e]`` lists the batches of epoch e+1, each an array of 1-based image indices
    (the order cnn_train's shuffling produced, e.g. a golden file's ``outputs.batches``),
    or is itself one index array. Epoch e uses ``schedule[min(e, end)]`` as learning rate
    (``schedule`` None: ``opts.learning_rate``). ``state`` resumes from a previous run or a
    checkpoint (``load_checkpoint(...).state``).

    Returns ``(net, state, stats)``; ``stats`` mirrors ``[stats.train.<field>]``:
    ``objective`` and, with error_function 'multiclass', ``top1err`` and ``top5err`` per
    epoch as float32 arrays, since cnn_train accumulates them in single precision (the
    objective of each sub-batch is rounded to float32 and the running sums are float32);
    'binary' gives ``binerr`` and, like 'none', float64 statistics; ``num`` the images
    per epoch.
    """
    opts = TrainOpts() if opts is None else opts
    if not isinstance(opts, TrainOpts):
        raise McnError(f"Expected opts to be a TrainOpts. Received opts={type(opts).__name__}")
    lrs = opts.learning_rate if schedule is None else _schedule(schedule, "schedule")
    dt = float_dtype(images, "images")
    images = as_4d(images, "images")
    n_all = images.shape[3]
    lab_all, per_image = _labels_of(labels, n_all)
    if not isinstance(batches, list | tuple):
        raise McnError(f"Expected batches to be a list (one entry per epoch). Received batches={batches!r}")
    net = prepare_net(net, dt)
    state = _copy_state(state, net)
    labels_names = {"multiclass": ["top1err", "top5err"], "binary": ["binerr"], "none": []}[
        opts.error_function
    ]
    history: dict[str, list] = {"objective": [], **{k: [] for k in labels_names}, "num": []}
    for e, entry in enumerate(batches):
        lr = float(lrs[min(e, lrs.size - 1)])
        errors = None
        num = 0
        for idx in _epoch_batches(entry, e, n_all):
            lab = lab_all[:, idx] if per_image else lab_all[..., idx]
            col, n, _ = _train_batch(net, state, images[..., idx], lab, lr, opts, rng)
            errors = col if errors is None else errors + col
            num += n
        if errors is None:
            raise McnError(f"Expected batches[{e}] to hold at least one batch. Received {entry!r}")
        averaged = errors / errors.dtype.type(num)
        for k, name in enumerate(["objective", *labels_names]):
            history[name].append(averaged[k])
        history["num"].append(num)
    stats_dtype = np.float32 if opts.error_function == "multiclass" else np.float64
    stats = {k: np.asarray(v, dtype=np.int64 if k == "num" else stats_dtype) for k, v in history.items()}
    return net, state, stats
