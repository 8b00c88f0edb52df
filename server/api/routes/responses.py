"""Error responses documented on every generation route (all in the standard error shape)."""

from __future__ import annotations

from typing import Any

from server.api.schemas.common import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown adapter or model."},
    422: {"model": ErrorResponse, "description": "Invalid request: the message names the field."},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After."},
    503: {"model": ErrorResponse, "description": "Engine not ready or generation interrupted."},
}
