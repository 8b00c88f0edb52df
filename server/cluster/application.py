"""The Serve application: ``--replicas`` ``SpectraReplica``s, the ingress, with ``SpectraRouter`` beside them.

In Ray Serve's HAProxy mode (``launcher.py``) the replicas serve HTTP themselves and the router only answers
HAProxy's "which replica?" for each POST. Sizing, all derived from the settings so nothing is configured
twice:

* a replica takes ``max_ongoing_requests = --max-batch-size + --max-queue`` requests into its app at once, what
  its engine holds (rows decoding plus requests waiting for one); the routing policy passes over a replica at
  that count while another is below it, and further requests wait in Ray's queue of the replica;
* the router reserves no CPU, so the cores go to the replicas' torch threads; a choice takes it one queue-length
  probe per replica it looks at (``routing_policy.py``), and it takes as many at once as all replicas together
  hold requests;
* a replica reserves ``--cpus-per-replica`` CPUs (0: the machine's cores / replicas), and its torch pool has
  that many threads unless ``--torch-threads`` says otherwise.

``build`` is the import path ``serve deploy`` and ``serve run`` use (docs/deploy/ray-serve.yaml): its args are
``ServerSettings`` fields, as ``spectra serve`` options are.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from server.cluster.replica import SpectraReplica
from server.cluster.router import SpectraRouter
from server.main import served_model_name
from server.settings import ServerSettings

APP_NAME = "spectra"
# The app logs every request itself (server/api/access.py); Serve's own access log would say it twice, and
# every line is CPU in the replica and in Ray's log monitor.
SERVE_LOGGING = {"enable_access_log": False}
ROUTING_POLICY = "server.cluster.routing_policy:BoundedAffinityRouter"


def replica_cpus(settings: ServerSettings) -> float:
    return settings.cpus_per_replica or max(1, (os.cpu_count() or 1) // (settings.replicas or 1))


def replica_capacity(settings: ServerSettings) -> int:
    """Requests one replica's engine holds before it refuses: running rows plus its queue."""
    return settings.max_batch_size + settings.max_queue


def build_application(settings: ServerSettings) -> Application:
    replicas = settings.replicas or 1
    replica = SpectraReplica.options(
        num_replicas=replicas,
        max_ongoing_requests=replica_capacity(settings),
        ray_actor_options={"num_cpus": replica_cpus(settings)},
        logging_config=SERVE_LOGGING,
        request_router_config=RequestRouterConfig(request_router_class=ROUTING_POLICY),
    ).bind(settings)
    router = SpectraRouter.options(
        max_ongoing_requests=replicas * replica_capacity(settings), logging_config=SERVE_LOGGING
    ).bind(replica, served_model_name(settings))
    # Ray's hook for an ingress request router (the one Ray Serve LLM's direct streaming uses).
    return replica._with_ingress_request_router(router)


def build(args: dict[str, Any]) -> Application:
    """``serve deploy``'s application builder: ``args`` are settings fields (``store``, ``replicas``, ...)."""
    return build_application(ServerSettings(**args))
