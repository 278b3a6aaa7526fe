"""pytest-friendly checks: ``assert_equivalent`` raises with the report table."""

from __future__ import annotations

from typing import Any

from .compare.probe import compare
from .compare.report import Report

__all__ = ["assert_equivalent"]


def assert_equivalent(net, model, x, labels, **kwargs: Any) -> Report:
    """Compare ``net`` and ``model`` (see ``harness.compare``) and raise AssertionError
    whose message is the report table when they diverge. Returns the report."""
    __tracebackhide__ = True
    report = compare(net, model, x, labels, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
