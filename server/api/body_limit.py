"""Request body size limits, enforced before the body is parsed (413 with the standard error body).

A declared ``Content-Length`` over the limit is refused without reading the body; a chunked body
is counted as it arrives and refused the moment it passes the limit, so an oversized upload never
reaches the multipart parser's spool files in full.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response


def _too_large(limit: int, path: str, flag: str | None) -> str:
    setting = f" (set by {flag})" if flag else ""
    return f"request body is larger than the limit of {limit} bytes for {path}{setting}"


class BodySizeLimitMiddleware:
    """``flags_by_path`` / ``default_flag`` name the ``spectra serve`` flag behind each limit in the 413."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        default_limit: int,
        limits_by_path: dict[str, int],
        default_flag: str | None = None,
        flags_by_path: dict[str, str] | None = None,
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limits_by_path = limits_by_path
        self.default_flag = default_flag
        self.flags_by_path = flags_by_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        key = path.rstrip("/") or "/"
        limit = self.limits_by_path.get(key, self.default_limit)
        flag = self.flags_by_path.get(key) if key in self.limits_by_path else self.default_flag
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(_too_large(limit, path, flag), 413)(scope, receive, send)
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
                    raise HTTPException(413, _too_large(limit, path, flag))
            return message

        await self.app(scope, counting_receive, send)
