"""``X-Request-Id`` on every HTTP response, and the id of the request being handled for logs and the engine.

A client's own id is kept when it is safe to echo and to write into logs (1 to 128 characters of
``[A-Za-z0-9._:-]``), so one id follows a request through a proxy, this server and its logs; any
other value is replaced by a fresh uuid4 hex rather than refused, because a tracing header must
never be the reason a request fails.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.logging_setup import REQUEST_ID

REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")


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

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
