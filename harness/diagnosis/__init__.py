"""Why a port diverges: static findings (``diagnose``: layer configuration, optimizer,
initialisation) and cause probes that re-run a divergent layer with common porting
mistakes (``probe_causes``, each a ``Cause``).

Modules: ``findings`` (the ``Finding`` record and ``diagnose``), ``layer_rules``,
``setup_rules`` and ``optimizer_rules`` (the rules; the optimizer table is shared with
``harness.training.compare_training``), ``causes`` (``Cause`` and ``probe_causes``),
``dag_findings`` (``diagnose`` on a DagNN net, through the simplenn layer rules).
"""

from harness.diagnosis.causes import Cause, probe_causes
from harness.diagnosis.findings import Finding, diagnose

__all__ = ["Cause", "Finding", "diagnose", "probe_causes"]
