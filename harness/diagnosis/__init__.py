"""Why a port diverges: static findings (``diagnose``: layer configuration, optimizer,
initialisation) and cause probes that re-run a divergent layer with common porting
mistakes (``probe_causes``)."""

from harness.diagnosis.findings import Finding, diagnose, probe_causes

__all__ = ["Finding", "diagnose", "probe_causes"]
