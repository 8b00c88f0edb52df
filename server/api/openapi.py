"""The OpenAPI document as the server really answers: every error in the standard error shape.

FastAPI documents a 422 as its own ``HTTPValidationError`` and knows nothing of the errors that
middleware and handlers send (authentication, body limits, queue limits, a crash), while every
one of them is ``{"error": {...}}`` (:mod:`server.api.errors`). So after FastAPI builds the
document: each 4xx/5xx response is ``application/json`` ``ErrorResponse`` (also on routes whose
success is plain text or a file), and the errors any route can answer are added to every one.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.api.schemas.common import ErrorResponse

REF_TEMPLATE = "#/components/schemas/{model}"
ERROR_SCHEMA = {"$ref": REF_TEMPLATE.format(model=ErrorResponse.__name__)}

# Answers that any operation can get, whatever its own code does.
COMMON_ERRORS = {
    401: "Missing or unknown API key.",
    403: "The API key lacks the scope this route needs.",
    413: "The request body is over the server's limit.",
    429: "Too many requests: the queue or the key's concurrency limit is full; see Retry-After.",
    500: "Internal server error (logged with the request id).",
    503: "The engine is not ready or is shutting down.",
}
# Only where there is a body to parse: bytes that are not JSON in the declared encoding.
BODY_ERRORS = {400: "The body could not be parsed."}
VALIDATION_ERROR = "Invalid request: the message names the field."
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _is_error(status: str) -> bool:
    return status.isdigit() and int(status) >= 400


def with_standard_errors(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``document`` (an OpenAPI dict from FastAPI) in place and return it."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            extra = {**COMMON_ERRORS, **(BODY_ERRORS if "requestBody" in operation else {})}
            for status, description in extra.items():
                responses.setdefault(str(status), {"description": description})
            if "422" in responses and responses["422"].get("description") == "Validation Error":
                responses["422"]["description"] = VALIDATION_ERROR
            for status, response in responses.items():
                if _is_error(status):
                    response["content"] = {"application/json": {"schema": ERROR_SCHEMA}}
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template=REF_TEMPLATE)
    for name, schema in {**error_schema.pop("$defs", {}), ErrorResponse.__name__: error_schema}.items():
        schemas.setdefault(name, schema)
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    return document


def install_openapi(app: FastAPI) -> None:
    """Serve :func:`with_standard_errors` of FastAPI's document at ``/openapi.json`` (built once)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_standard_errors(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
