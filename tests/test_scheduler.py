"""The scheduler and the KV-cache manager alone: plans, budgets, rows and moves, with no model."""

from __future__ import annotations

import asyncio
import random

import pytest

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.handle import RequestHandle
from server.engine.kv_cache_manager import RowMove
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.types import GenerationRequest, SamplingParams
from server.models.tokenizer import build_byte_tokenizer

TOKENIZER = build_byte_tokenizer()
LOOP = asyncio.new_event_loop()


def sequence(prompt_tokens: int, name: str = "") -> Sequence:
    request = GenerationRequest([65] * prompt_tokens, SamplingParams(max_new_tokens=8), request_id=name)
    return Sequence(request, RequestHandle(name, prompt_tokens, LOOP), [], IncrementalDetokenizer(TOKENIZER))


def run_plan(scheduler: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule one step and record it as executed (KV written, one token decoded per running row)."""
    plan = scheduler.schedule()
    for segment in plan.prefill:
        scheduler.prefilled(segment)
    for running in plan.decode:
        running.generated.append(66)
        scheduler.decoded(running)
    return [(s.sequence.request.request_id, s.start, s.end) for s in plan.prefill]


def test_whole_prompts_fill_the_budget_and_the_next_one_starts_a_chunk() -> None:
    scheduler = Scheduler(max_batch_size=8, prefill_token_budget=10)
    a, b, c = sequence(4, "a"), sequence(4, "b"), sequence(7, "c")
    for s in (a, b, c):
        scheduler.add(s)
    assert run_plan(scheduler) == [("a", 0, 4), ("b", 0, 4), ("c", 0, 2)]
    assert (a.kv_row, b.kv_row, c.kv_row) == (0, 1, scheduler.kv.staging_row)
    assert c.status is SequenceStatus.PREFILLING and a.status is SequenceStatus.RUNNING
    assert run_plan(scheduler) == [("c", 2, 7)]
    assert c.kv_row == 2 and c.status is SequenceStatus.RUNNING
    assert scheduler.schedule().kv_moves == [RowMove(scheduler.kv.staging_row, 2, 7)]


def test_only_one_prompt_is_chunked_at_a_time_and_arrival_order_is_kept() -> None:
    scheduler = Scheduler(max_batch_size=8, prefill_token_budget=5)
    long_a, long_b, short = sequence(12, "a"), sequence(12, "b"), sequence(1, "s")
    for s in (long_a, long_b, short):
        scheduler.add(s)
    assert run_plan(scheduler) == [("a", 0, 5)]
    assert run_plan(scheduler) == [("a", 5, 10)]
    assert run_plan(scheduler) == [("a", 10, 12)]
    assert list(scheduler.waiting) == [long_b, short], "b waits for a's chunks; s waits behind b"
    assert run_plan(scheduler) == [("b", 0, 5)]


def test_admission_stops_at_max_batch_size_and_resumes_when_a_row_frees() -> None:
    scheduler = Scheduler(max_batch_size=2, prefill_token_budget=100)
    sequences = [sequence(3, str(i)) for i in range(3)]
    for s in sequences:
        scheduler.add(s)
    assert [name for name, _, _ in run_plan(scheduler)] == ["0", "1"]
    assert run_plan(scheduler) == []
    scheduler.finish(sequences[0])
    assert [name for name, _, _ in run_plan(scheduler)] == ["2"]
    assert sequences[2].kv_row == 1 and sequences[1].kv_row == 0


def test_a_leaving_row_is_filled_by_the_last_one_so_running_rows_stay_a_prefix() -> None:
    scheduler = Scheduler(max_batch_size=4, prefill_token_budget=100)
    sequences = [sequence(3 + i, str(i)) for i in range(4)]
    for s in sequences:
        scheduler.add(s)
    run_plan(scheduler)
    run_plan(scheduler)
    scheduler.finish(sequences[1])
    plan = scheduler.schedule()
    assert plan.kv_moves == [RowMove(3, 1, sequences[3].cached_tokens)]
    assert plan.decode == [sequences[0], sequences[3], sequences[2]]
    assert [s.kv_row for s in plan.decode] == [0, 1, 2]


def test_cancelled_requests_leave_from_any_state() -> None:
    scheduler = Scheduler(max_batch_size=4, prefill_token_budget=4)
    running, chunked, waiting = sequence(2, "r"), sequence(9, "c"), sequence(2, "w")
    for s in (running, chunked, waiting):
        scheduler.add(s)
    run_plan(scheduler)
    for s in (running, chunked, waiting):
        s.handle.cancel()
    assert set(scheduler.cancelled()) == {running, chunked, waiting}
    assert not scheduler.has_work()
    assert all(s.status is SequenceStatus.FINISHED and s.kv_row is None for s in (running, chunked, waiting))


@pytest.mark.parametrize("seed", range(20))
def test_moves_keep_every_sequences_kv_in_its_own_row(seed: int) -> None:
    """Simulate the KV cache as row -> (owner, length): after every step each owner's data is in its row."""
    rng = random.Random(seed)
    scheduler = Scheduler(max_batch_size=5, prefill_token_budget=rng.choice([3, 8, 40]))
    kv: dict[int, tuple[str, int]] = {}
    names = iter(range(10_000))
    for _ in range(200):
        for _ in range(rng.randint(0, 2)):
            scheduler.add(sequence(rng.randint(1, 20), str(next(names))))
        for victim in [s for s in scheduler.running if rng.random() < 0.15]:
            scheduler.finish(victim)
        plan = scheduler.schedule()
        for move in plan.kv_moves:
            owner, length = kv[move.source]
            assert length >= move.length
            kv[move.target] = (owner, move.length)
        for running in scheduler.running:
            if running.cached_tokens:
                assert kv[running.kv_row] == (running.request.request_id, running.cached_tokens)
        for segment in plan.prefill:
            kv[segment.sequence.kv_row] = (segment.sequence.request.request_id, segment.end)
            scheduler.prefilled(segment)
        for running in plan.decode:
            owner, length = kv[running.kv_row]
            kv[running.kv_row] = (owner, length + 1)
            scheduler.decoded(running)
        rows = [s.kv_row for s in scheduler.running]
        assert rows == list(range(len(rows)))
