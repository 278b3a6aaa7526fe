"""The differential engine: align layers, run both sides, compare, report."""

from .align import Alignment, Pair, align
from .probe import compare
from .report import Report, Row
from .tolerance import Tolerance, tolerance_for

__all__ = ["Alignment", "Pair", "Report", "Row", "Tolerance", "align", "compare", "tolerance_for"]
