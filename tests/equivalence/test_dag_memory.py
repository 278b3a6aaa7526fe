"""A DagNN comparison that would not fit the memory budget: a random probe is reduced (fewer
images, then smaller sides the harness chose) with a note; inputs the caller gave are
refused up front with an McnError that names the budget and the largest var."""

from __future__ import annotations

import numpy as np
import pytest

import harness
from harness.equivalence.dag_feed import ACTIVATION_COPIES, activation_bytes
from harness.equivalence.dag_run import compare_dag
from harness.mcn import McnError
from harness.mcn.dagnn import DagLayer, DagNet, Param


def small_net() -> DagNet:
    r = np.random.RandomState(0)
    layers = [
        DagLayer("conv", "dagnn.Conv", ["x"], ["c"], ["f", "b"], {"pad": 1}),
        DagLayer("relu", "dagnn.ReLU", ["c"], ["y"], []),
    ]
    return DagNet(layers, params=[Param("f", 0.3 * r.randn(3, 3, 1, 4)), Param("b", 0.1 * r.randn(4, 1))])


def test_activation_bytes_counts_every_var_of_one_image():
    per_image, largest = activation_bytes(small_net(), {"x": (32, 32, 1)})
    assert per_image == 8 * 32 * 32 * (1 + 4 + 4)  # x, c and y in float64
    assert largest.startswith("'c' (32 x 32 x 4)") or largest.startswith("'y' (32 x 32 x 4)")


@pytest.mark.parametrize(
    ("budget", "batch", "side"),
    [
        (10**9, 4, 32),  # fits: nothing reduced, no note
        (10**6, 1, 32),  # 4 images do not fit, 1 does
        (10**5, 2, 8),  # 1 image of 32 x 32 does not fit: sides halved to 8, then 2 images fit
    ],
)
def test_a_random_probe_is_reduced_to_fit_the_budget_with_a_note(monkeypatch, budget, batch, side):
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", str(budget))
    net = small_net()
    result = harness.check(net, harness.to_keras(net), batch=4)
    assert result.ok, str(result.report)
    notes = [n for n in result.report.notes if "memory budget" in n]
    if (batch, side) == (4, 32):
        assert not notes
    else:
        assert notes == [
            f"probe reduced to {batch} image(s) (x {side} x {side} x 1) to fit the memory budget of "
            f"{harness.mcn.options.format_bytes(budget)} (MCN_HARNESS_MEMORY_BUDGET; --batch and "
            "--input-size choose)"
        ]
        assert ACTIVATION_COPIES * activation_bytes(net, {"x": (side, side, 1)})[0] * batch <= budget


def test_inputs_the_caller_gave_are_refused_up_front(monkeypatch):
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "100000")
    net = small_net()
    x = np.random.RandomState(1).randn(32, 32, 1, 4)
    with pytest.raises(McnError, match=r"batch of 4 images .*'[cy]' \(32 x 32 x 4\).*memory budget"):
        compare_dag(net, harness.to_keras(net), {"x": x})
