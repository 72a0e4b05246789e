"""The JSON boundary of the explorer: numbers JSON can carry, and the error of a bad request.

Kept apart so the examples store, the analysis and the HTTP layer share them without
importing one another.
"""

from __future__ import annotations

import math

from starlette.exceptions import HTTPException


class ExplorerInputError(HTTPException):
    """A request parameter is out of range: 422, the message saying which and what is allowed
    (FastAPI's own handler answers it as {"detail": message})."""

    def __init__(self, message: str) -> None:
        super().__init__(422, message)


def finite(x: float) -> float | None:
    """JSON has no NaN/Inf: non-finite numbers become null."""
    x = float(x)
    return x if math.isfinite(x) else None
