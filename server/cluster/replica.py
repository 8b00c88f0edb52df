"""``SpectraReplica``: one engine and its app inside a Ray Serve replica, serving HTTP on a port of its own.

It builds exactly what ``spectra serve`` builds (``server.main.build_service``), with two differences:
torch's thread pool follows the CPUs Ray assigned the replica (``--cpus-per-replica``) rather than the
machine's cores, since several replicas share a machine; and its ``--data-dir`` is a subdirectory per replica
rank, because training files and jobs are per process (docs/store.md) while adapters live in the shared
``--store``. A replica replacing a dead one gets the dead one's rank, hence its files and jobs.

It is the application's ingress in Ray Serve's direct-ingress mode: Ray starts an HTTP server in the replica
for the app ``__serve_build_asgi_app__`` returns, and HAProxy (``launcher.py``) forwards clients' connections
to it, to the replica ``SpectraRouter`` picked for a POST, balanced for anything else. So every route
(uploads, SSE, auth, errors) is the one ``spectra serve`` runs, and a streamed token leaves the replica once.

Ray calls ``check_health`` every ``HEALTH_CHECK_PERIOD_S``; when the engine thread has died it raises, and
Ray stops the replica and starts a new one. ``/health`` is 200 only when every replica is running and healthy
(``serve.status()``: the deployment is HEALTHY with no replica starting, stopping or recovering) and this
replica's engine is ready, so a load balancer in front waits out a replacement.

Affinity: a request the router sent here for an adapter carries that id as the multiplexed model id.
``_route_adapter``, Ray's ``@serve.multiplexed`` loader, records it in the replica's multiplexed set, which
Ray reports to the routers; requests for ids in the set come to this replica first. The set is a routing
hint only: the engine's own bank (``--adapter-memory``, LRU) decides residency, and an id Ray still lists after
the bank evicted it costs one reload from the store. Responses say which replica answered and whether the id
was already in its set (``x-spectra-replica``, ``x-spectra-affinity: hit|miss``), so a benchmark can measure
the hit rate.
"""

from __future__ import annotations

import logging

import ray
import torch
from ray import serve

from server.cluster.affinity import record_miss, start_probe
from server.cluster.replica_front import ReplicaFront
from server.logging_setup import configure_logging
from server.main import Service, build_service, checked_keys
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

# Adapter ids one replica advertises to the routers (an LRU like the bank's, counted in ids, not bytes).
ROUTED_ADAPTERS_PER_REPLICA = 1024
# Ray's health probe: a dead engine is noticed within about period + timeout.
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 10.0
# In-flight requests a stopping replica finishes before Ray kills it; short, so SIGTERM stops the server quickly.
GRACEFUL_SHUTDOWN_S = 10.0


class EngineNotReadyError(RuntimeError):
    pass


def assigned_cpus() -> int:
    """The CPUs Ray reserved for this replica, at least one (a fractional reservation still computes)."""
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


@serve.deployment(
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
)
@serve.ingress()
class SpectraReplica:
    def __init__(self, settings: ServerSettings) -> None:
        configure_logging(settings.log_level, settings.log_format)
        context = serve.get_replica_context()
        self._replica_id = context.replica_id.unique_id
        torch.set_num_threads(settings.torch_threads or assigned_cpus())
        settings = settings.model_copy(update={"data_dir": settings.data_dir / f"replica-{context.rank.rank}"})
        self._service: Service = build_service(settings, checked_keys(settings))
        logger.info(
            "replica %s rank=%d ready: model=%s torch intra-op threads=%d",
            self._replica_id, context.rank.rank, self._service.engine.model_name, torch.get_num_threads(),
        )  # fmt: skip

    @serve.multiplexed(max_num_models_per_replica=ROUTED_ADAPTERS_PER_REPLICA)
    async def _route_adapter(self, adapter_id: str) -> str:
        """Called by Ray only for ids not yet in this replica's set (a miss); the engine loads the adapter
        itself when the request is submitted, so there is nothing to return but the id."""
        record_miss()
        return adapter_id

    async def _affinity(self) -> bytes | None:
        adapter_id = serve.get_multiplexed_model_id()
        if not adapter_id:
            return None
        probe = start_probe()
        await self._route_adapter(adapter_id)
        return b"hit" if probe.hit else b"miss"

    async def __serve_build_asgi_app__(self) -> ReplicaFront:
        """The app Ray's direct-ingress HTTP server runs, called once after ``__init__``."""
        return ReplicaFront(self._service.app, self._replica_id, self._affinity)

    def check_health(self) -> None:
        if not self._service.engine.is_ready():
            raise EngineNotReadyError(f"replica {self._replica_id}: the engine is not running")

    def __del__(self) -> None:
        # Ray calls no shutdown hook on a deployment class; __del__ runs when Serve stops the replica.
        service = getattr(self, "_service", None)
        if service is not None:
            service.stop()
