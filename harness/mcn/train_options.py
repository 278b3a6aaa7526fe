"""cnn_train's options: ``TrainOpts``, checked as vl_argparse and cnn_train check them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.mcn.options import McnError, is_empty
from harness.mcn.simplenn import DIALECTS
from harness.mcn.solvers import SOLVER_DEFAULTS, SOLVERS

__all__ = ["ERROR_FUNCTIONS", "ERROR_LABELS", "TrainOpts", "learning_rate_schedule", "real_part"]

ERROR_FUNCTIONS = ("multiclass", "binary", "none")
# cnn_train's default errorLabels per errorFunction: the statistics' names.
ERROR_LABELS = {"multiclass": ["top1err", "top5err"], "binary": ["binerr"], "none": []}

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


def real_part(value: Any, name: str) -> float:
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        v = np.asarray([np.nan])
    if v.size != 1 or not np.isfinite(v).all() or isinstance(value, bool):
        raise McnError(f"Expected {name} to be a finite real number. Received {name}={value!r}")
    return float(v.ravel()[0])


def _count(value: Any, name: str) -> int:
    v = real_part(value, name)
    if v != round(v) or v < 1:
        raise McnError(f"Expected {name} to be a positive integer. Received {name}={value!r}")
    return int(v)


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    v = real_part(value, name)
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
        self.momentum = real_part(self.momentum, "momentum")
        self.weight_decay = real_part(self.weight_decay, "weight_decay")
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
            self.solver_opts = {k: real_part(v, f"solver_opts[{k!r}]") for k, v in self.solver_opts.items()}
        self.num_sub_batches = _count(self.num_sub_batches, "num_sub_batches")
        if self.dialect not in DIALECTS:
            raise McnError(
                f"Expected dialect to be one of {list(DIALECTS)}. Received dialect={self.dialect!r}"
            )
        if self.batch_size is not None:
            self.batch_size = _count(self.batch_size, "batch_size")
        self.learning_rate = learning_rate_schedule(self.learning_rate, "learning_rate")
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
                if np.isfinite(real_part(value, "backPropDepth")):
                    raise McnError(f"Expected backPropDepth to be inf. Received backPropDepth={value!r}")
            elif key == "postEpochFn":
                if not is_empty(value):
                    raise McnError(f"Expected postEpochFn to be empty. Received postEpochFn={value!r}")
            elif key not in _IGNORED_OPTIONS:
                raise McnError(f"Expected a cnn_train option name. Received opts[{key!r}]={value!r}")
        return cls(**kwargs)


def learning_rate_schedule(value: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        a = np.asarray([np.nan])
    if a.size == 0 or not np.isfinite(a).all():
        raise McnError(
            f"Expected {name} to be a finite number or a non-empty vector of them. Received {name}={value!r}"
        )
    return a
