"""The error model: when do two tensors count as equal?

Both sides run in float64 by default, where rounding noise of these networks stays
around 1e-12 of a tensor's largest element: any semantic difference (a missing group,
a padded pooling window, a flipped kernel) stands many orders of magnitude above it.
float32 mode reflects what a real run sees: single-precision rounding of long
reductions, growing with depth, so its tolerances are wider.

A tensor element counts as a mismatch when ``|keras - ref| > tol * max|ref|``
(normwise: the scale is the tensor's largest reference element, so tiny elements do
not produce meaningless relative errors). A bias derivative is a sum of dzdy over H, W
and N: its scale is at least the largest per-channel sum of |dzdy| (where it cancels to
~0, e.g. a bias followed by batch normalisation, both sides hold rounding noise).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tolerance", "tolerance_for"]


@dataclass(frozen=True)
class Tolerance:
    forward: float
    backward: float
    parameter: float

    def for_kind(self, kind: str) -> float:
        return {"x": self.forward, "y": self.forward, "loss": self.forward, "dzdx": self.backward}.get(
            kind, self.parameter
        )


TOLERANCES = {
    # float64: rounding noise ~1e-13..1e-12 relative after a dozen layers.
    "float64": Tolerance(forward=1e-9, backward=1e-9, parameter=1e-9),
    # float32: ~1e-7 per operation, long reductions (5x5x256 taps, batch sums) and a
    # dozen layers: measured worst ~2e-5 on the seed network; 1e-3 leaves margin while a
    # real translation bug (errors of order 1e-1 .. 1) still stands far above it.
    "float32": Tolerance(forward=1e-4, backward=1e-3, parameter=1e-3),
}


def tolerance_for(dtype: str) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"Expected dtype 'float64' or 'float32'. Received dtype={dtype!r}") from None
