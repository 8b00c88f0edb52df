"""The Serve application: one ``SpectraIngress`` in front of ``--replicas`` ``SpectraReplica``s.

Sizing, all derived from the settings so nothing is configured twice:

* a replica takes ``max_ongoing_requests = --max-batch-size + --max-queue`` requests, what its engine holds
  (rows decoding plus requests waiting for one) before it answers 429 itself; more would only queue inside
  the replica where Ray cannot move them to a less busy one, fewer would leave batch rows idle;
* the ingress takes the sum over replicas: it only relays, and reserves no CPU, so the cores go to the
  replicas' torch threads;
* a replica reserves ``--cpus-per-replica`` CPUs (0: the machine's cores / replicas), and its torch pool has
  that many threads unless ``--torch-threads`` says otherwise.

``build`` is the import path ``serve deploy`` and ``serve run`` use (docs/deploy/ray-serve.yaml): its args are
``ServerSettings`` fields, as ``spectra serve`` options are.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from server.cluster.ingress import SpectraIngress
from server.cluster.replica import SpectraReplica
from server.main import served_model_name
from server.settings import ServerSettings

APP_NAME = "spectra"


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
    ).bind(settings)
    return SpectraIngress.options(
        max_ongoing_requests=replicas * replica_capacity(settings), ray_actor_options={"num_cpus": 0}
    ).bind(replica, served_model_name(settings))


def build(args: dict[str, Any]) -> Application:
    """``serve deploy``'s application builder: ``args`` are settings fields (``store``, ``replicas``, ...)."""
    return build_application(ServerSettings(**args))
