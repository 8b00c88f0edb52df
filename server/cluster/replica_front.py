"""The ASGI app a replica's HTTP port serves: the service's app, plus what only a replica of many can say.

* ``/health`` answers 503 while not every replica of the deployment is running and healthy (the controller's
  view: ``serve.status()``), before the app adds its own engine check, so one probe through HAProxy speaks
  for the whole service;
* every response names the replica that answered (``x-spectra-replica``) and, for a request routed by
  adapter, whether that id was already in the replica's routing set (``x-spectra-affinity: hit|miss``);
* the app's ``X-Request-Id`` is left out, because Ray's HTTP server adds the same id (the client's, else the
  one HAProxy generated, which the app also logs under) and two copies would read as one joined value.

Everything else is the app's, byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ray import serve
from ray.serve.schema import DeploymentStatus
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response

REPLICA_HEADER = b"x-spectra-replica"
REQUEST_ID_HEADER = b"x-request-id"
AFFINITY_HEADER = b"x-spectra-affinity"


def replicas_not_ready(app_name: str, deployment_name: str) -> str | None:
    """Why not every replica is ready, or None; the controller's view, not a probe of each replica."""
    application = serve.status().applications.get(app_name)
    deployment = application.deployments.get(deployment_name) if application else None
    if deployment is None:
        return "the replicas are not deployed"
    states = {state: count for state, count in deployment.replica_states.items() if count}
    if deployment.status != DeploymentStatus.HEALTHY or set(states) - {"RUNNING"}:
        counts = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
        return f"not every replica is ready: {deployment.status.lower()} ({counts or 'none running'})"
    return None


class ReplicaFront:
    def __init__(self, app: ASGIApp, replica_id: str, affinity: Callable[[], Awaitable[bytes | None]]) -> None:
        self._app = app
        self._replica_id = replica_id.encode()
        self._affinity = affinity
        context = serve.get_replica_context()
        self._app_name, self._deployment_name = context.app_name, context.deployment

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if scope["path"] == "/health" and (
            reason := await asyncio.to_thread(replicas_not_ready, self._app_name, self._deployment_name)
        ):
            await error_response(reason, 503)(scope, receive, send)
            return
        extra = [(REPLICA_HEADER, self._replica_id)]
        if (affinity := await self._affinity()) is not None:
            extra.append((AFFINITY_HEADER, affinity))

        async def send_with_replica_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", []) if name != REQUEST_ID_HEADER]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        await self._app(scope, receive, send_with_replica_headers)
