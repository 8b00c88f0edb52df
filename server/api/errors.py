"""One error body everywhere: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape).

Both client families raise on it: the OpenAI SDK reads ``error.message``; huggingface_hub raises
its HTTP error carrying the body (in-stream, any ``error`` key ends the stream with an exception).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_store.errors import FileBrokenError, StoreUnavailableError
from adapters_store.ids import InvalidAdapterIdError
from server.api.schemas.common import ErrorBody, ErrorResponse
from server.engine.types import EngineError
from server.finetune.data import TrainingFileError
from server.spectral.formats.errors import AdapterFormatError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "overloaded_error",
    500: "internal_error",
    503: "unavailable_error",
}


def error_type_for(status_code: int) -> str:
    return _TYPE_BY_STATUS.get(status_code, "invalid_request_error" if status_code < 500 else "internal_error")


def error_body(message: str, status_code: int, *, error_type: str | None = None, param: str | None = None) -> dict:
    body = ErrorBody(message=message, type=error_type or error_type_for(status_code), param=param, code=status_code)
    return ErrorResponse(error=body).model_dump()


def error_response(
    message: str,
    status_code: int,
    *,
    error_type: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, status_code, error_type=error_type, param=param), status_code=status_code, headers=headers
    )


def engine_error_response(exc: EngineError) -> JSONResponse:
    retry_after = getattr(exc, "retry_after_seconds", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return error_response(exc.message, exc.status_code, error_type=exc.error_type, param=exc.param, headers=headers)


def _field_path(loc: Sequence[str | int]) -> str:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content`` (the body prefix says nothing)."""
    parts = list(loc[1:] if loc and loc[0] == "body" and len(loc) > 1 else loc)
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """All of pydantic's complaints as ``field.path: constraint`` joined by ``; `` and the first field path."""
    messages = []
    for error in errors:
        text = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        path = _field_path(error.get("loc", ()))
        messages.append(f"{path}: {text}" if path else text)
    first = _field_path(errors[0].get("loc", ())) if errors else None
    return "; ".join(messages) or "invalid request", first or None


async def _engine_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return engine_error_response(exc)


async def _adapter_file_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AdapterFormatError)
    return error_response(exc.message, exc.status_code, param="file")


async def _training_file_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TrainingFileError)
    return error_response(exc.message, exc.status_code, param="file")


async def _file_broken_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(str(exc), 409, param="file_id")


async def _store_unavailable_error(_: Request, exc: Exception) -> JSONResponse:
    logger.warning("store unavailable: %s", exc)
    return error_response(f"{exc}; retry", 503, headers={"Retry-After": "1"})


async def _adapter_id_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(str(exc), 422, param="adapter_id")


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(exc.errors())
    return error_response(message, 422, param=param)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(str(exc.detail), exc.status_code, headers=exc.headers)


class CatchAllMiddleware:
    """Turns an unhandled exception into a logged 500 in the standard shape.

    Starlette's own ``Exception`` handler re-raises after responding, so the server would log the
    traceback a second time; catching here logs it once and leaks nothing to the client.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                # Headers are out; the only honest signal left is closing the connection.
                return
            await error_response("internal server error", 500)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(AdapterFormatError, _adapter_file_error)
    app.add_exception_handler(InvalidAdapterIdError, _adapter_id_error)
    app.add_exception_handler(TrainingFileError, _training_file_error)
    app.add_exception_handler(FileBrokenError, _file_broken_error)
    app.add_exception_handler(StoreUnavailableError, _store_unavailable_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(CatchAllMiddleware)
