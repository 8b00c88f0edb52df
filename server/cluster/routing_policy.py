"""``BoundedAffinityRouter``: Ray's request-router policy for the replicas, affinity within a load bound.

``SpectraRouter`` asks Ray for a replica without reserving one (the request itself goes through HAProxy), and
in that mode Ray takes the first replica of the policy's first rank as it comes: no queue lengths are probed
and no capacity is checked. Ray's default policy ranks two random replicas (or the replicas holding the
request's multiplexed id), so the choice would be random. This policy decides itself, from fresh queue
lengths (``get_queue_len``, one small RPC per replica it looks at):

* a request for an adapter goes to the least loaded replica that already serves it, as long as that replica
  has no more than ``AFFINITY_SLACK`` requests more than the least loaded replica seen; past that, to the
  least loaded replica, which then serves the adapter too. A few queued requests cost more than one adapter
  load (milliseconds), and an unbounded preference would pile a hot adapter's traffic on one replica;
* any other request goes to the less loaded of two random replicas (power of two choices);
* a replica at ``max_ongoing_requests`` is passed over while another is not; when every replica is, the least
  loaded takes the request and it waits there.

Ties are broken at random, so equal replicas share the load. A replica that does not answer the probe within
``PROBE_DEADLINE_S`` is ranked last. Configured on the replica deployment (``application.py``); it runs in
each ``SpectraRouter`` replica.
"""

from __future__ import annotations

import asyncio
import logging
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

logger = logging.getLogger(__name__)

AFFINITY_SLACK = 4
PROBE_DEADLINE_S = 0.1
# Replicas without the adapter probed per request, besides every replica holding it.
SAMPLED_REPLICAS = 2


class BoundedAffinityRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        holders, others = [], []
        for replica in candidate_replicas:
            (holders if adapter and adapter in replica.multiplexed_model_ids else others).append(replica)
        loads = await self._queue_lengths(holders + random.sample(others, min(SAMPLED_REPLICAS, len(others))))
        if not loads:
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        full = {replica for replica, load in loads.items() if load >= replica.max_ongoing_requests}
        if len(full) == len(loads):
            full = set()
        ranked = sorted(loads.keys() - full, key=lambda replica: (loads[replica], random.random()))
        least = loads[ranked[0]]
        held = set(holders)
        holder = next((replica for replica in ranked if replica in held), None)
        if holder is not None and loads[holder] <= least + AFFINITY_SLACK:
            ranked.remove(holder)
            ranked.insert(0, holder)
        unprobed = [replica for replica in candidate_replicas if replica not in loads]
        return [ranked, list(full), unprobed]

    @staticmethod
    async def _queue_lengths(replicas: list[RunningReplica]) -> dict[RunningReplica, int]:
        """Each replica's requests in flight, for those that answered within the deadline."""
        answers = await asyncio.gather(
            *(
                asyncio.wait_for(replica.get_queue_len(deadline_s=PROBE_DEADLINE_S), PROBE_DEADLINE_S)
                for replica in replicas
            ),
            return_exceptions=True,
        )
        loads = {}
        for replica, answer in zip(replicas, answers, strict=True):
            if isinstance(answer, BaseException):
                logger.debug("queue length of %s unknown: %r", replica.replica_id, answer)
            else:
                loads[replica] = answer
        return loads
