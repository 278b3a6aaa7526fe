"""The differential engine: align the net's layers with the model's (``align``), run
both sides on one batch (``reference_pass``, ``keras_pass``; chained by ``run``), turn
each pair of tensors into a row (``rows``) measured with one kernel (``metrics``)
against the error model (``tolerance``), and report (``report``)."""

from harness.equivalence.align import Alignment, Pair, align
from harness.equivalence.report import Report, Row
from harness.equivalence.run import compare
from harness.equivalence.tolerance import Tolerance, tolerance_for

__all__ = ["Alignment", "Pair", "Report", "Row", "Tolerance", "align", "compare", "tolerance_for"]
