"""Detection power: the planted-bug catalogue on generated nets, and the smallest weight
perturbation each mode detects.

1. For every net drawn from harness.strategies (derandomised, so every run sees the same
   nets) and every catalogue bug with a site in it: plant it, compare, and count
   - detection rate: reports flagged / plantings the batch can show (``bug.observable``);
   - localisation rate: flagged reports blaming the planted layer / flagged reports;
   - false-positive rate (the baseline): unmodified translations flagged / nets.
0. The catalogue of user-style ports (tests/catalogue): faithful ok, detected, localised,
   crashes.
2. On the seed network, the smallest relative perturbation ``w * (1 + eps * s)``
   (``s`` = random signs) of one layer's filters that compare(weights="model") flags, in
   float64 and in float32 mode (bisection over log10 eps).

    python benchmarks/bench_detection.py [--nets 40] [--layer conv3]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import harness  # noqa: E402
from harness.testing.bugs import BUGS, reference  # noqa: E402
from harness.testing.strategies import net_inputs, simplenn_nets  # noqa: E402


def draw_cases(n: int) -> list:
    cases = []

    @st.composite
    def case(draw):
        net = draw(simplenn_nets())
        x, labels = draw(net_inputs(net))
        return net, x, labels

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case())
    def collect(c):
        cases.append(c)

    collect()
    return cases[:n]


def catalogue(cases: list) -> None:
    from harness.translate import to_keras

    planted, observable, detected, localised, blamed_elsewhere = (
        Counter(),
        Counter(),
        Counter(),
        Counter(),
        Counter(),
    )
    false_pos = 0
    t0 = time.perf_counter()
    for k, (net, x, labels) in enumerate(cases):
        model = to_keras(net)
        if not harness.compare(net, model, x, labels).ok:
            false_pos += 1
        res = reference(net, x, labels)
        for bug in BUGS:
            for index in bug.sites(net)[:1]:
                buggy, culprit = bug.plant(net, model, index)
                report = harness.compare(net, buggy, x, labels, weights=bug.weights)
                planted[bug.name] += 1
                seen = bug.observable(net, res, index, labels, mode="normal")
                fd = report.first_divergence
                if seen:
                    observable[bug.name] += 1
                    if not report.ok:
                        detected[bug.name] += 1
                        localised[bug.name] += fd is not None and fd["culprit"] == culprit
                if fd is not None and fd["culprit"] != culprit:
                    blamed_elsewhere[bug.name] += 1
        if (k + 1) % 10 == 0:
            print(f"  {k + 1}/{len(cases)} nets, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nplanted bugs on {len(cases)} generated nets ({time.perf_counter() - t0:.0f} s)")
    header = ("bug", "planted", "showable", "detected", "localised", "blamed elsewhere")
    print(f"{header[0]:<22} {header[1]:>7} {header[2]:>8} {header[3]:>9} {header[4]:>9} {header[5]:>16}")
    for bug in BUGS:
        o, d = observable[bug.name], detected[bug.name]
        print(
            f"{bug.name:<22} {planted[bug.name]:>7} {o:>8} {d:>9} {localised[bug.name]:>9} "
            f"{blamed_elsewhere[bug.name]:>16}"
        )
    o, d, loc = sum(observable.values()), sum(detected.values()), sum(localised.values())
    print(f"detection rate: {d}/{o} = {d / max(o, 1):.3f}")
    print(f"localisation rate: {loc}/{d} = {loc / max(d, 1):.3f}")
    print(
        f"false-positive rate on unmodified translations (baseline): {false_pos}/{len(cases)} "
        f"= {false_pos / max(len(cases), 1):.3f}"
    )


def smallest_perturbation(layer: str, dtype: str, model_dtype: str | None = None) -> float:
    """``dtype``: the comparison's (float64 is the default mode); ``model_dtype``: the
    Keras model's own (default: the comparison's; "float32" with dtype float64 is what a
    user's float32 port meets in the default mode, through the float64 copy)."""
    from harness.translate import to_keras

    net = harness.seed_net(seed=0)
    rng = np.random.RandomState(1)
    x, labels = rng.randn(28, 28, 1, 4), np.array([[1.0, 2.0, 2.0, 1.0]])
    model = to_keras(net, dtype=model_dtype or dtype)
    kl = model.get_layer(layer)
    w0, b0 = [np.asarray(v) for v in kl.get_weights()]
    signs = np.where(rng.rand(*w0.shape) < 0.5, -1.0, 1.0)

    def flagged(log_eps: float) -> bool:
        kl.set_weights([(w0 * (1 + 10.0**log_eps * signs)).astype(w0.dtype), b0])
        return not harness.compare(net, model, x, labels, dtype=dtype, weights="model").ok

    lo, hi = -17.0, 0.0  # not flagged at 1e-17 (a no-op), flagged at 1
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if flagged(mid) else (mid, hi)
    return 10.0**hi


def user_ports() -> None:
    """The catalogue of Keras ports written the way users write them (tests/catalogue):
    faithful ports called equivalent, planted bugs detected and blamed on the right layer,
    crashes (a comparison that raised instead of giving a verdict)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.catalogue.ports import CATALOGUE, SUBTLE
    from tests.catalogue.test_harness_on_catalogue import BACKWARD_DIVERGENT, EXPECTED_VERDICT
    from tests.golden import case_net, load_case

    counts = Counter()
    t0 = time.perf_counter()
    for port in CATALOGUE + SUBTLE:
        case = load_case(port.case)
        net = case_net(case)
        x = np.asarray(case.inputs["x"], dtype=np.float64)
        labels = np.asarray(case.inputs["labels"], dtype=np.float64)
        mode = str(case.opts.get("mode", "normal"))
        try:
            report = harness.compare(net, port.build(), x, labels, mode=mode, weights="model")
        except Exception as err:  # counted: a crash is never a verdict
            counts["crashes"] += 1
            print(f"  crash: {port.name}: {type(err).__name__}: {err}")
            continue
        fd = report.first_divergence
        if port.faithful and port.name not in BACKWARD_DIVERGENT:
            counts["faithful"] += 1
            counts["faithful ok"] += report.ok
        elif port.faithful:  # forward-exact ports whose backward pass is not MatConvNet's
            counts["backward-divergent"] += 1
            right = fd is not None and fd.culprit == BACKWARD_DIVERGENT[port.name]
            counts["backward-divergent blamed right"] += right
        elif EXPECTED_VERDICT.get(port.name) is True:
            counts["not a divergence"] += 1
        else:
            counts["bugs"] += 1
            counts["detected"] += not report.ok
            counts["localised"] += fd is not None and fd.culprit == port.culprit
    print(f"\nuser-style ports (tests/catalogue, {time.perf_counter() - t0:.0f} s):")
    print(f"  faithful ok: {counts['faithful ok']}/{counts['faithful']}")
    print(
        f"  forward-exact, backward not MatConvNet's, blamed right: "
        f"{counts['backward-divergent blamed right']}/{counts['backward-divergent']}"
    )
    print(f"  planted bugs detected: {counts['detected']}/{counts['bugs']}")
    print(f"  planted bugs localised: {counts['localised']}/{counts['bugs']}")
    print(f"  crashes: {counts['crashes']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=40)
    parser.add_argument("--layer", default="conv3")
    args = parser.parse_args()
    user_ports()
    cases = draw_cases(args.nets)
    catalogue(cases)
    print(f"\nsmallest relative perturbation of {args.layer}'s filters that compare() flags (seed net):")
    print(
        "  default mode (float64 comparison of a float32 model, through its float64 copy): "
        f"{smallest_perturbation(args.layer, 'float64', 'float32'):.2e}"
    )
    for dtype in ("float64", "float32"):
        print(f"  {dtype} model, {dtype} comparison: {smallest_perturbation(args.layer, dtype):.2e}")


if __name__ == "__main__":
    main()
