"""The parameter update of cnn_train: ``accumulateGradients`` and examples/+solver.

``accumulate_gradients`` updates a net's weights and the solver state in place, as
examples/cnn_train.m's accumulateGradients does: SGD with momentum (optionally the
Nesterov step), weight decay, the bnorm moments' running average, or one of the
examples/+solver functions (adam, rmsprop, adagrad, adadelta: ``solver_step``), in the
data's precision and in MatConvNet's order (last layer and last parameter first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.net import Net
from harness.mcn.options import McnError

if TYPE_CHECKING:
    from harness.mcn.train_options import TrainOpts

__all__ = ["SOLVERS", "SOLVER_DEFAULTS", "accumulate_gradients", "check_multipliers", "solver_step"]

# examples/+solver/<name>.m called without arguments returns these default options.
SOLVER_DEFAULTS: dict[str, dict[str, float]] = {
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    "rmsprop": {"epsilon": 1e-8, "rho": 0.99},
    "adagrad": {"epsilon": 1e-10, "rho": 1.0},
    "adadelta": {"epsilon": 1e-6, "rho": 0.9},
}
SOLVERS = tuple(SOLVER_DEFAULTS)


def _multipliers(layer: Any, key: str) -> np.ndarray:
    value = layer.get(key)
    try:
        return np.asarray(value, dtype=np.float64).ravel(order="F")
    except (TypeError, ValueError):
        raise McnError(
            f"layer '{layer.name}' ({layer.type}): Expected field '{key}' to be numeric. "
            f"Received {key}={value!r}"
        ) from None


def _taccum(alpha: float, a: Any, beta: float, b: Any, dt: np.dtype) -> Any:
    """vl_taccum: ``alpha * a + beta * b`` (scal then axpy in the data's precision)."""
    return dt.type(alpha) * a + dt.type(beta) * b


def _is_fresh(s: Any) -> bool:
    # MATLAB's isequal(state, 0).
    return not isinstance(s, dict) and np.ndim(s) == 0 and float(s) == 0.0


def solver_step(
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


def check_multipliers(net: Net, num_params: list[int]) -> None:
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


def accumulate_gradients(
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
                layer.weights[j], solver_state[i][j] = solver_step(
                    opts.solver, w, solver_state[i][j], g, opts.solver_options, this_lr, dt
                )
