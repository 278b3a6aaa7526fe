"""pytest-friendly checks: ``assert_equivalent``, the ``EquivalenceFixture`` behind the
plugin's ``harness_equivalence`` fixture, and ``EquivalenceError``, which carries the
whole result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.equivalence.report import Report
from harness.equivalence.run import compare
from harness.io.text import safe_text, write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from harness.pipeline import CheckResult

__all__ = ["EquivalenceError", "EquivalenceFixture", "assert_equivalent"]


def assert_equivalent(net, model, x, labels, **kwargs: Any) -> Report:
    """Compare ``net`` and ``model`` (see ``harness.compare``) and raise
    ``EquivalenceError`` (an AssertionError whose message is the report table) when they
    diverge. Returns the report."""
    __tracebackhide__ = True
    report = compare(net, model, x, labels, **kwargs)
    if not report.ok:
        raise EquivalenceError(report)
    return report


class EquivalenceError(AssertionError):
    """A completed comparison that diverged. ``.report`` holds the Report; ``.result``
    the whole ``CheckResult`` (findings and causes too) when it came from
    ``harness.check``, else None."""

    def __init__(self, result: CheckResult | Report):
        report = result if isinstance(result, Report) else result.report
        fd = report.first_divergence
        if fd:
            head = (
                f"MatConvNet and Keras diverge first at layer '{safe_text(fd.culprit)}' "
                f"({safe_text(fd.tensor)})"
            )
        elif report.problems:
            head = f"MatConvNet and Keras cannot be called equivalent: {safe_text(report.problems[0])}"
        else:
            head = "MatConvNet and Keras layers could not be aligned"
        body = str(report) if isinstance(result, Report) else str(result)
        super().__init__(f"{head}\n{body}")
        self.report = report
        self.result = None if isinstance(result, Report) else result


class EquivalenceFixture:
    """``fixture(net=None, model=None, x=None, labels=None, **options) -> CheckResult``:
    ``harness.check`` with defaults for everything (the net, the model, the probe batch
    and the options of the run); raises ``EquivalenceError`` carrying the result when the
    two diverge. With ``report_path``, each call first writes its JSON report to the path
    it returns, pass or fail."""

    def __init__(
        self,
        *,
        net: Callable[[], Any],
        model: Callable[[], Any],
        batch: int = 4,
        options: dict[str, Any] | None = None,
        report_path: Callable[[], Path] | None = None,
    ):
        self._net = net
        self._model = model
        self.batch = batch
        self.options = dict(options or {})
        self._report_path = report_path

    def __call__(self, net=None, model=None, x=None, labels=None, **options: Any) -> CheckResult:
        __tracebackhide__ = True
        from harness.pipeline import check

        net = self._net() if net is None else net
        model = self._model() if model is None else model
        result = check(net, model, x, labels, batch=self.batch, **{**self.options, **options})
        if self._report_path is not None:
            path = self._report_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, result.to_json() + "\n")
        if not result.ok:
            raise EquivalenceError(result)
        return result
