"""The differential engine: align the net's layers with the model's, run both sides on
one batch (``run``), measure every tensor with one kernel (``metrics``) against the
error model (``tolerance``), and report (``report``)."""

from harness.equivalence.align import Alignment, Pair, align
from harness.equivalence.report import Report, Row
from harness.equivalence.run import compare
from harness.equivalence.tolerance import Tolerance, tolerance_for

__all__ = ["Alignment", "Pair", "Report", "Row", "Tolerance", "align", "compare", "tolerance_for"]
