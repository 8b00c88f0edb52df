"""``X-Request-Id`` on every HTTP response, and the id of the request being handled for logs and the engine.

A client's own id is kept when it is safe to echo and to write into logs (1 to 128 characters of
``[A-Za-z0-9._:-]``), so one id follows a request through a proxy, this server and its logs; any
other value is replaced by a fresh uuid4 hex rather than refused, because a tracing header must
never be the reason a request fails.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")

# A contextvar rather than request.state: log records are made far from any Request object (uvicorn's
# access log, the error middleware, thread-pool work), and each request's task has its own context.
_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request this code runs for, or None outside one (startup, the engine thread)."""
    return _current.get()


def _request_id(scope: Scope) -> str:
    supplied = next((value for key, value in scope["headers"] if key == _HEADER_KEY), None)
    if supplied is not None:
        text = supplied.decode("latin-1")
        if _CLIENT_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Outermost, so responses made by the error handlers, the catch-all and SSE streams all carry the id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
