"""``SpectraRouter``: picks the replica for each request from its body, once, before any byte is relayed.

Ray Serve's HAProxy front (``launcher.py``) asks this deployment where each POST goes: its Lua action sends
the request's body to ``POST /internal/route``, and forwards the client's connection to the replica named in
the answer. The answer names a replica Ray's own request router chose for the adapter the body asks for
(``affinity.adapter_key`` as the multiplexed model id: replicas already serving that id first, then the
least loaded), and sets the ``serve_multiplexed_model_id`` header on the forwarded request, so the replica
knows which id it was chosen for. Only the choice crosses a Ray call; the request and its answer (SSE token
by token) go straight between HAProxy and the replica's own HTTP port, one hop instead of two
(docs/scale-out.md, "Routing").

A body without an adapter (the base model, an upload, bad JSON) gets the least loaded replica; nothing here
validates, the replica's app answers any 4xx. GETs and DELETEs do not come here: HAProxy balances them.
"""

# No ``from __future__ import annotations``: FastAPI must see ``Request`` itself in the route's signature, and
# Ray rebuilds the class-based route where the module's names are not in reach of a string annotation.
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel
from ray import serve
from ray.serve._private.constants import SERVE_MULTIPLEXED_MODEL_ID
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from server.cluster.affinity import adapter_key

router_api = FastAPI()


class RouteAnswer(BaseModel):
    """The contract HAProxy's Lua action reads: a flat object whose ``replica_id`` is Ray's full replica id
    (the name of the HAProxy server for that replica) and whose ``request_headers`` it sets on the request."""

    host: str
    port: int
    replica_id: str
    request_headers: dict[str, str] = {}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(router_api)
class SpectraRouter:
    def __init__(self, replicas: DeploymentHandle, base_model: str) -> None:
        self._replicas = replicas
        self._base_model = base_model

    @router_api.post("/internal/route")
    async def route(self, request: Request) -> RouteAnswer:
        key = adapter_key(await request.body(), self._base_model)
        handle = self._replicas.options(multiplexed_model_id=key) if key else self._replicas
        try:
            # Without a reservation: the request itself goes through HAProxy, not through this handle.
            async with handle.choose_replica(_reserve=False) as selection:
                # The chosen replica's HTTP endpoint is only on Ray's replica object (Ray Serve LLM reads it so).
                replica = selection._replica
                endpoint = replica.backend_http_endpoint
                replica_id = replica.replica_id.to_full_id_str()
        except DeploymentUnavailableError as error:
            raise HTTPException(503, str(error)) from error
        if endpoint is None:
            raise HTTPException(503, f"replica {replica_id} has no HTTP port yet")
        host, port = endpoint
        return RouteAnswer(
            host=host, port=port, replica_id=replica_id,
            request_headers={SERVE_MULTIPLEXED_MODEL_ID: key} if key else {},
        )  # fmt: skip
