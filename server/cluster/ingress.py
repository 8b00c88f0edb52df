"""``SpectraIngress``: reads each request's body, picks its adapter key, forwards it to a replica, streams back.

Ray Serve's HTTP proxy hands every request to this deployment (route prefix ``/``). It forwards the request
whole (``asgi_bridge.ForwardedRequest``) to ``SpectraReplica.handle`` through a streaming handle whose
``multiplexed_model_id`` is the adapter the body asks for (``affinity.adapter_key``), and relays the replica's
status, headers and chunks as they come, so SSE streams pass through token by token.

``/health`` is 200 only when every replica is running and healthy (``serve.status()``: the deployment is
HEALTHY with no replica starting, stopping or recovering) and a replica's own ``/health`` says its engine is
ready; otherwise 503, so a load balancer in front of the proxy waits out a replacement.

Failures: a replica that dies before answering (``RayActorError``: killed, out of memory, health check
failed) costs a generation nothing: generations have no side effects, so they are retried on another replica
(up to ``GENERATION_ATTEMPTS``). Other requests may have had effects (an upload stored, a job created) and get
a 503 JSON error instead of a blind retry. A replica dying mid-response cannot be retried (the client has
tokens already): an SSE stream ends with an error event in the API's error shape, any other body is cut off,
so a client never takes a truncated answer for a whole one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import DeploymentStatus
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.api.errors import error_body, error_response
from server.cluster.affinity import GENERATION_PATHS, adapter_key
from server.cluster.asgi_bridge import ForwardedRequest, ResponseStart

logger = logging.getLogger(__name__)

GENERATION_ATTEMPTS = 3
REPLICA_DEPLOYMENT = "SpectraReplica"
# "The replica went away": its actor died or is unreachable (ActorUnavailableError is a RayActorError), or
# the router picked a replica the controller has since removed.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)


class ReplicaLostError(RuntimeError):
    pass


@serve.deployment
class SpectraIngress:
    def __init__(self, replica: DeploymentHandle, base_model: str) -> None:
        self._replica = replica
        self._base_model = base_model
        self._app_name = serve.get_replica_context().app_name

    async def __call__(self, request: Request) -> Response:
        forwarded = ForwardedRequest(
            method=request.method,
            path=request.url.path,
            query_string=request.scope.get("query_string", b""),
            headers=list(request.scope["headers"]),
            body=await request.body(),
            client=tuple(request.client) if request.client else None,
            http_version=request.scope.get("http_version", "1.1"),
        )
        if forwarded.path == "/health" and (reason := await self._replicas_not_ready()):
            return error_response(reason, 503)
        key = adapter_key(forwarded.path, forwarded.body, self._base_model)
        attempts = GENERATION_ATTEMPTS if forwarded.path in GENERATION_PATHS else 1
        for attempt in range(1, attempts + 1):
            stream = self._replica.options(stream=True, multiplexed_model_id=key or "").handle.remote(forwarded)
            try:
                start = await stream.__anext__()
            except REPLICA_LOST as error:
                logger.warning("replica lost before answering %s %s (attempt %d): %s",
                               forwarded.method, forwarded.path, attempt, error)  # fmt: skip
                continue
            except StopAsyncIteration:
                logger.error("a replica closed %s %s without a response", forwarded.method, forwarded.path)
                return error_response("the replica answered nothing", 502)
            assert isinstance(start, ResponseStart)
            response = StreamingResponse(self._relay(stream, start), status_code=start.status)
            response.raw_headers = start.headers
            return response
        return error_response("the replica serving this request stopped; retry", 503, headers={"Retry-After": "1"})

    async def _relay(self, stream: DeploymentResponseGenerator, start: ResponseStart) -> AsyncIterator[bytes]:
        try:
            async for chunk in _coalesced(stream):
                yield chunk
        except REPLICA_LOST as error:
            logger.warning("replica lost mid-response: %s", error)
            content_type = dict(start.headers).get(b"content-type", b"")
            if not content_type.startswith(b"text/event-stream"):
                raise ReplicaLostError("the replica stopped mid-response") from error
            message = error_body("the replica serving this stream stopped; retry the request", 503)
            yield b"data: " + json.dumps(message).encode() + b"\n\n"

    async def _replicas_not_ready(self) -> str | None:
        """Why not every replica is ready, or None; the controller's view, not a probe of each replica."""
        status = await asyncio.to_thread(serve.status)
        application = status.applications.get(self._app_name)
        deployment = application.deployments.get(REPLICA_DEPLOYMENT) if application else None
        if deployment is None:
            return "the replicas are not deployed"
        states = {state: count for state, count in deployment.replica_states.items() if count}
        if deployment.status != DeploymentStatus.HEALTHY or set(states) - {"RUNNING"}:
            counts = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
            return f"not every replica is ready: {deployment.status.lower()} ({counts or 'none running'})"
        return None


async def _coalesced(stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The replica's chunks, with those that arrived while the previous one was being sent joined into one.

    Each chunk handed to the proxy is a Ray message (about a millisecond of CPU on each side); when the
    machine is busy, several token events of a stream wait here at once and go out as one, at no cost in
    latency. A stream that keeps up is relayed chunk by chunk, as it came.
    """
    arrived: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in stream:
                arrived.put_nowait(chunk)
            arrived.put_nowait(None)
        except Exception as error:  # handed to the reader, which raises it in the response's task
            arrived.put_nowait(error)

    pumping = asyncio.create_task(pump())
    try:
        while True:
            parts: list[bytes] = []
            item = await arrived.get()
            while True:
                if item is None or isinstance(item, Exception):
                    if parts:
                        yield b"".join(parts)
                    if item is None:
                        return
                    raise item
                parts.append(item)
                if arrived.empty():
                    break
                item = arrived.get_nowait()
            yield b"".join(parts)
    finally:
        pumping.cancel()
