"""Request body size limits, enforced before the body is parsed (413 with the standard error body).

A declared ``Content-Length`` over the limit is refused without reading the body; a chunked body
is counted as it arrives and refused the moment it passes the limit, so an oversized upload never
reaches the multipart parser's spool files in full.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response


def _too_large(limit: int, path: str) -> str:
    return f"request body is larger than the limit of {limit} bytes for {path}"


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, *, default_limit: int, limits_by_path: dict[str, int]) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limits_by_path = limits_by_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.limits_by_path.get(path.rstrip("/") or "/", self.default_limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(_too_large(limit, path), 413)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException passes through FastAPI's body parsing untouched and reaches
                    # the standard error handler.
                    raise HTTPException(413, _too_large(limit, path))
            return message

        await self.app(scope, counting_receive, send)
