"""The differential engine: observe the user's model call (``observe``, ``precision``),
run the reference (``reference_pass``), find each layer's output among the observed
tensors (``match``, with ``align`` as the structural hint), turn each pair of tensors into
a row (``rows``, ``keras_pass.KerasSide``) measured with one kernel (``metrics``) against
the error model (``tolerance``), blame the first divergence (``blame``) and report
(``report``); ``run.compare`` chains them."""

from harness.equivalence.align import Alignment, Pair, align
from harness.equivalence.dag_run import compare_dag
from harness.equivalence.report import Report, Row
from harness.equivalence.run import compare
from harness.equivalence.tolerance import Tolerance, tolerance_for

__all__ = [
    "Alignment",
    "Pair",
    "Report",
    "Row",
    "Tolerance",
    "align",
    "compare",
    "compare_dag",
    "tolerance_for",
]
