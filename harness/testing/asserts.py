"""pytest-friendly checks: ``assert_equivalent`` raises with the report table."""

from __future__ import annotations

from typing import Any

from harness.equivalence.report import Report
from harness.equivalence.run import compare
from harness.io.text import safe_text

__all__ = ["EquivalenceError", "assert_equivalent"]


def assert_equivalent(net, model, x, labels, **kwargs: Any) -> Report:
    """Compare ``net`` and ``model`` (see ``harness.compare``) and raise AssertionError
    whose message is the report table when they diverge. Returns the report."""
    __tracebackhide__ = True
    report = compare(net, model, x, labels, **kwargs)
    if not report.ok:
        raise EquivalenceError(report)
    return report


class EquivalenceError(AssertionError):
    """Raised by assert_equivalent; ``.report`` holds the Report."""

    def __init__(self, report: Report):
        fd = report.first_divergence
        if fd:
            head = (
                f"MatConvNet and Keras diverge first at layer '{safe_text(fd['culprit'])}' "
                f"({safe_text(fd['tensor'])})"
            )
        elif report.problems:
            head = f"MatConvNet and Keras cannot be called equivalent: {safe_text(report.problems[0])}"
        else:
            head = "MatConvNet and Keras layers could not be aligned"
        super().__init__(f"{head}\n{report}")
        self.report = report
