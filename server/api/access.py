"""Access middleware: authenticate the bearer key and bound each key's requests in flight.

It runs before the body is read, so a caller without a valid key never gets a body parsed or an
upload spooled. The principal it finds is put in the request state for the routes' scope and
namespace checks (:mod:`server.api.deps`). A request counts against its key's concurrency limit
until its response has been sent in full, streams included.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.auth import ANONYMOUS, UNAUTHENTICATED, KeyRing, Principal, bearer_token
from server.api.errors import error_response

logger = logging.getLogger(__name__)

# OpenAPI and its viewers describe the API only; they stay open so clients can be generated.
ALWAYS_OPEN_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
CONCURRENCY_RETRY_AFTER_SECONDS = 1


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"


class InFlightCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def try_acquire(self, name: str, limit: int | None) -> bool:
        with self._lock:
            if limit is not None and self._counts[name] >= limit:
                return False
            self._counts[name] += 1
            return True

    def release(self, name: str) -> None:
        with self._lock:
            self._counts[name] -= 1
            if self._counts[name] <= 0:
                del self._counts[name]


class AccessMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyRing, open_paths: frozenset[str]) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = ALWAYS_OPEN_PATHS | open_paths
        self.in_flight = InFlightCounter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not self.keys.enabled or path in self.open_paths:
            scope.setdefault("state", {})["principal"] = ANONYMOUS if not self.keys.enabled else UNAUTHENTICATED
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        token = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        principal = self.keys.authenticate(token) if token else None
        if principal is None:
            reason = "no API key" if token is None else "an unknown API key"
            logger.info("unauthenticated request path=%s client=%s reason=%s", path, _client(scope), reason)
            message = (
                "this server requires an API key: send 'Authorization: Bearer KEY'"
                if token is None
                else "the API key is not valid"
            )
            response = error_response(message, 401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self._call_counted(principal, scope, receive, send)

    async def _call_counted(self, principal: Principal, scope: Scope, receive: Receive, send: Send) -> None:
        limit = principal.max_concurrent_requests
        if not self.in_flight.try_acquire(principal.name, limit):
            logger.info("key over its concurrency limit key=%s limit=%s", principal.name, limit)
            response = error_response(
                f"the key {principal.name!r} already has {limit} requests in flight, its limit "
                "(max_concurrent_requests in the keys file, else --max-concurrent-requests-per-key); "
                "retry after one finishes",
                429,
                headers={"Retry-After": str(CONCURRENCY_RETRY_AFTER_SECONDS)},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.release(principal.name)
