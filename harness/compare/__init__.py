"""The differential engine: align layers, run both sides, compare, report."""

from .align import Alignment, Pair, align
from .probe import compare
from .report import Report, Row
from .tolerance import Tolerance, tolerance_for
from .training import TrainingReport, TrainingRow, compare_training

__all__ = [
    "Alignment",
    "Pair",
    "Report",
    "Row",
    "Tolerance",
    "TrainingReport",
    "TrainingRow",
    "align",
    "compare",
    "compare_training",
    "tolerance_for",
]
