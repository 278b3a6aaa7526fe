"""What cnn_train and cnn_train_dag both check in what they are handed: the solver state a
run resumes from (``state['solverState']``, one entry per layer or per param) and the
batches of an epoch (1-based image indices, as MatConvNet logs them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from harness.mcn.options import McnError, is_empty

__all__ = ["batch_indices", "resumed_state"]


def resumed_state(
    state: Any, fresh: list, copy_entries: Callable[[list], list], *, per: str
) -> dict[str, Any]:
    """A copy of the ``state`` a run resumes from. Its ``solverState`` must be a list with
    one entry per ``per`` (a layer, a param: as many as ``fresh`` holds), copied by
    ``copy_entries``; without a state, or with no or an empty ``solverState``, the run
    starts from ``fresh`` (processEpoch's cell of 0). Other keys are kept."""
    if state is None:
        return {"solverState": fresh}
    if not isinstance(state, dict):
        raise McnError(f"Expected state to be None or a dict with 'solverState'. Received state={state!r}")
    solver_state = state.get("solverState")
    if (
        solver_state is None
        or (isinstance(solver_state, list) and not solver_state)
        or (not isinstance(solver_state, list) and is_empty(solver_state))
    ):
        return {**state, "solverState": fresh}
    if not isinstance(solver_state, list) or len(solver_state) != len(fresh):
        count = len(solver_state) if isinstance(solver_state, list) else "?"
        raise McnError(
            f"Expected state['solverState'] to be a list with one entry per {per} ({len(fresh)}). "
            f"Received {type(solver_state).__name__} of {count}"
        )
    return {**state, "solverState": copy_entries(solver_state)}


def batch_indices(entry: Any, what: str, *, n_all: int | None = None) -> list[np.ndarray]:
    """The batches of one epoch as int64 arrays of 1-based image indices: ``entry`` lists
    index arrays, or is one batch (an array, or a flat list of indices). Each batch must be
    non-empty whole numbers of at least 1 and, with ``n_all``, at most ``n_all``; McnError
    names ``what[k]`` otherwise."""
    items = list(entry) if isinstance(entry, list | tuple) else [entry]
    if items and all(np.ndim(b) == 0 for b in items):
        items = [np.asarray(items)]  # one batch given as a flat list of indices
    out = []
    for k, b in enumerate(items):
        try:
            idx = np.asarray(b, dtype=np.float64).ravel(order="F")
        except (TypeError, ValueError):
            idx = np.asarray([np.nan])
        if (
            idx.size == 0
            or not np.isfinite(idx).all()
            or np.any(idx != np.round(idx))
            or (n_all is None and idx.min() < 1)
        ):
            raise McnError(f"Expected {what}[{k}] to be non-empty 1-based image indices. Received {b!r}")
        if n_all is not None and (idx.min() < 1 or idx.max() > n_all):
            raise McnError(
                f"Expected {what}[{k}] to index images 1..{n_all} (1-based). "
                f"Received {idx.astype(int).tolist()}"
            )
        out.append(idx.astype(np.int64))
    return out
