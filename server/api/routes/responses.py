"""Responses documented on the generation routes: errors (in the standard error shape) and SSE streams."""

from __future__ import annotations

from typing import Any

from server.api.schemas.common import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown adapter or model."},
    422: {"model": ErrorResponse, "description": "Invalid request: the message names the field."},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After."},
    503: {"model": ErrorResponse, "description": "Engine not ready or generation interrupted."},
    504: {"model": ErrorResponse, "description": "Past --request-timeout; the request was cancelled."},
}

# One Server-Sent Event, documented per event as FastAPI documents its own streams (``itemSchema``).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "One JSON chunk (or an in-stream error body)."},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}


def stream_responses(description: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that streams: ``text/event-stream`` beside (or instead of) its JSON answer."""
    return {200: {"description": description, "content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}}}}
