"""The JSON boundary of the explorer: numbers JSON can carry, and the error of a bad request.

Kept apart so the examples store, the analysis and the HTTP layer share them without
importing one another.
"""

from __future__ import annotations

import math


class ExplorerInputError(ValueError):
    """A request parameter is out of range; the message says which and what is allowed."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def finite(x: float) -> float | None:
    """JSON has no NaN/Inf: non-finite numbers become null."""
    x = float(x)
    return x if math.isfinite(x) else None


__all__ = ["ExplorerInputError", "finite"]
