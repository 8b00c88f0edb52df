"""One HTTP request carried across a Ray call, and run through an ASGI app in the replica's event loop.

The ingress sends a ``ForwardedRequest`` (method, path, query, headers, the whole body) and gets back a
stream: one ``ResponseStart`` (status and headers), then the body's chunks as they are sent. Running the
real app, rather than calling engine methods, keeps every route (uploads, downloads, SSE, auth, request ids,
metrics, error bodies) identical with and without Ray. When the caller stops reading (the client went away,
Ray cancelled the call), the app sees ``http.disconnect``, so a stream cancels its engine request as it
does behind uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Message = MutableMapping[str, Any]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]
# Chunks the app may send ahead of the Ray stream: enough to keep tokens flowing, small enough that a client
# that stops reading blocks the app's writes (and so its --stream-write-timeout applies).
SEND_AHEAD = 64
# How long a cancelled app gets to observe the disconnect and release its engine request.
CANCEL_GRACE_S = 5.0


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None
    http_version: str = "1.1"
    scheme: str = "http"

    def scope(self) -> Message:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": self.headers,
            "client": self.client,
            "server": None,
        }


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


class AppFailedError(RuntimeError):
    """The app raised before it sent a response (its own error handlers normally answer a 500 instead)."""


async def run_asgi(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``request`` through ``app``: its ``ResponseStart``, then the non-empty body chunks."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue(SEND_AHEAD)
    disconnected = asyncio.Event()
    body_pending = True

    async def receive() -> Message:
        nonlocal body_pending
        if body_pending:
            body_pending = False
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if disconnected.is_set():
            raise OSError("the client disconnected")  # what uvicorn raises into an app writing to a closed socket
        await sent.put(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if task.done() and task.exception() is not None:
            raise AppFailedError("the app failed without answering") from task.exception()
    finally:
        disconnected.set()
        # Drain, so an app blocked on a full queue sees the disconnect, then give it time to clean up.
        while not sent.empty():
            sent.get_nowait()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), CANCEL_GRACE_S)
        if not task.done():
            task.cancel()
