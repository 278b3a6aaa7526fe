"""For test suites: ``assert_equivalent`` and ``EquivalenceError`` (``asserts``),
Hypothesis strategies for simplenn nets (``strategies``), the planted-bug catalogue
(``bugs``) and the pytest plugin (``pytest_plugin``, entry point ``mcn_harness``)."""

from harness.testing.asserts import EquivalenceError, assert_equivalent

__all__ = ["EquivalenceError", "assert_equivalent"]
