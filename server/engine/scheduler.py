"""What the next step runs: admission, the prefill token budget, chunked prefill (pure Python).

Each step the scheduler returns a :class:`StepPlan` and never touches a tensor:

- ``decode``: every running sequence, one token each, in KV-row order;
- ``prefill``: prompt segments within ``prefill_token_budget`` tokens. The prompt being
  prefilled in chunks (at most one, in the staging row) continues first; then waiting
  requests are admitted in arrival order while rows are free, each whole prompt that fits
  the budget left; the first prompt that does not fit starts a chunk with what is left.
  Running decodes therefore wait for at most one budget of prefill work per step;
- ``admitted``: sequences that entered this step (their adapters must be made resident).

Rows come from the :class:`KVCacheManager`; a whole request always fits its row, so no
running sequence is ever preempted (see docs/engine.md).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.kv_cache_manager import KVCacheManager, RowMove
from server.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class PrefillSegment:
    """Prompt positions ``start .. end - 1`` of ``sequence``; ``completes`` when ``end`` is the prompt's end."""

    sequence: Sequence
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def completes(self) -> bool:
        return self.end == self.sequence.prompt_length


@dataclass
class StepPlan:
    kv_moves: list[RowMove] = field(default_factory=list)
    prefill: list[PrefillSegment] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    def __init__(self, max_batch_size: int, prefill_token_budget: int):
        self.prefill_token_budget = prefill_token_budget
        self.kv = KVCacheManager(max_batch_size)
        self.waiting: deque[Sequence] = deque()
        self.chunked: Sequence | None = None

    @property
    def running(self) -> list[Sequence]:
        return self.kv.owners()

    @property
    def active_count(self) -> int:
        """Sequences holding a row (prefilling or running)."""
        return self.kv.used_rows + (self.chunked is not None)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active_count > 0

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def schedule(self) -> StepPlan:
        plan = StepPlan(decode=self.kv.owners())
        budget = self.prefill_token_budget
        if self.chunked is not None:
            sequence = self.chunked
            end = min(sequence.prompt_length, sequence.cached_tokens + budget)
            plan.prefill.append(PrefillSegment(sequence, sequence.cached_tokens, end))
            budget -= end - sequence.cached_tokens
        while self.waiting and budget > 0 and self.active_count < self.kv.rows:
            sequence = self.waiting[0]
            if sequence.prompt_length <= budget:
                self.kv.allocate(sequence)
            elif self.chunked is None:
                self.kv.stage(sequence)
                self.chunked = sequence
            else:
                break
            self.waiting.popleft()
            sequence.status = SequenceStatus.PREFILLING
            end = min(sequence.prompt_length, budget)
            plan.prefill.append(PrefillSegment(sequence, 0, end))
            plan.admitted.append(sequence)
            budget -= end
        plan.kv_moves = self.kv.take_moves()
        return plan

    def prefilled(self, segment: PrefillSegment) -> None:
        """Record a segment's KV as written; a completed prompt's sequence starts running."""
        sequence = segment.sequence
        sequence.cached_tokens = segment.end
        if not segment.completes:
            return
        if sequence is self.chunked:
            self.chunked = None
            self.kv.promote_staged(sequence)
        sequence.status = SequenceStatus.RUNNING

    def decoded(self, sequence: Sequence) -> None:
        sequence.cached_tokens += 1

    def finish(self, sequence: Sequence) -> None:
        """Take ``sequence`` out of whatever state it is in and free its row."""
        if sequence.status is SequenceStatus.WAITING:
            self.waiting.remove(sequence)
        elif sequence is self.chunked:
            self.chunked = None
        self.kv.free(sequence)
        sequence.status = SequenceStatus.FINISHED

    def cancelled(self) -> list[Sequence]:
        """Sequences whose client cancelled, in any state, taken out of the schedule."""
        found = [s for s in (*self.waiting, *self.kv.owners(), self.chunked) if s and s.handle.cancelled.is_set()]
        for sequence in found:
            self.finish(sequence)
        return found
