"""``BoundedAffinityRouter``'s ranking, on stand-ins for Ray's ``RunningReplica``.

The policy reads three things from a replica (its multiplexed ids, ``max_ongoing_requests`` and its queue
length by RPC), so each stand-in has exactly those; the queue length is the stand-in's own number, or a
probe that never answers. Through a real Ray cluster the policy is exercised by tests/test_ray_serve.py
(an adapter's requests stay on one replica, the base model reaches both).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from server.cluster.routing_policy import AFFINITY_SLACK, PROBE_DEADLINE_S, BoundedAffinityRouter


@dataclass(eq=False)
class StandInReplica:
    replica_id: str
    load: int | None  # None: the probe never answers
    multiplexed_model_ids: set[str] = field(default_factory=set)
    max_ongoing_requests: int = 32

    async def get_queue_len(self, *, deadline_s: float) -> int:
        if self.load is None:
            await asyncio.sleep(10 * deadline_s)
        return self.load


def choose(replicas: list[StandInReplica], adapter: str = "") -> StandInReplica:
    """The replica Ray takes when nothing is reserved: the first of the first non-empty rank."""
    router = object.__new__(BoundedAffinityRouter)  # choose_replicas uses no router state
    request = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=adapter))
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    assert sorted(replica.replica_id for rank in ranks for replica in rank) == sorted(r.replica_id for r in replicas)
    return next(rank for rank in ranks if rank)[0]


def test_an_adapter_stays_on_its_replica_within_the_slack() -> None:
    holder = StandInReplica("holder", load=5 + AFFINITY_SLACK, multiplexed_model_ids={"team/a"})
    idle = StandInReplica("idle", load=5)
    assert all(choose([holder, idle], "team/a") is holder for _ in range(20))


def test_an_adapter_spills_to_the_least_loaded_replica_past_the_slack() -> None:
    holder = StandInReplica("holder", load=6 + AFFINITY_SLACK, multiplexed_model_ids={"team/a"})
    idle = StandInReplica("idle", load=5)
    assert all(choose([holder, idle], "team/a") is idle for _ in range(20))


def test_the_least_loaded_of_several_holders_is_chosen() -> None:
    busy = StandInReplica("busy", load=9, multiplexed_model_ids={"team/a"})
    light = StandInReplica("light", load=3, multiplexed_model_ids={"team/a"})
    other = StandInReplica("other", load=1)
    assert all(choose([busy, light, other], "team/a") is light for _ in range(20))


def test_the_base_model_goes_to_the_less_loaded_replica_and_ties_are_shared() -> None:
    assert all(choose([StandInReplica("a", 7), StandInReplica("b", 2)]).replica_id == "b" for _ in range(20))
    chosen = {choose([StandInReplica("a", 4), StandInReplica("b", 4)]).replica_id for _ in range(40)}
    assert chosen == {"a", "b"}


def test_a_full_replica_is_passed_over_even_holding_the_adapter() -> None:
    full = StandInReplica("full", load=16, multiplexed_model_ids={"team/a"}, max_ongoing_requests=16)
    open_ = StandInReplica("open", load=15, max_ongoing_requests=16)
    assert choose([full, open_], "team/a") is open_
    both_full = [full, StandInReplica("fuller", load=20, max_ongoing_requests=16)]
    assert choose(both_full, "team/a") is full


def test_a_replica_that_does_not_answer_the_probe_is_ranked_last() -> None:
    silent = StandInReplica("silent", load=None, multiplexed_model_ids={"team/a"})
    answering = StandInReplica("answering", load=30)
    started = time.monotonic()
    assert choose([silent, answering], "team/a") is answering
    assert time.monotonic() - started < 5 * PROBE_DEADLINE_S


@pytest.mark.parametrize("replicas", [1, 2])
def test_when_no_probe_answers_every_replica_is_still_a_candidate(replicas: int) -> None:
    silent = [StandInReplica(f"s{index}", load=None) for index in range(replicas)]
    assert choose(silent) in silent
