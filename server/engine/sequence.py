"""One request inside the engine: its tokens, its place in the KV cache, its adapters.

A sequence goes WAITING -> PREFILLING (one step for a prompt within the prefill budget,
several for a longer one) -> RUNNING (one token per step) -> finished. The scheduler and the
KV-cache manager move it between states and rows; the model runner reads its tokens,
``cached_tokens`` and ``adapter_slots``; postprocessing appends what the sampler chose (and
feeds it to the grammar's ``matcher``, for constrained requests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from llguidance import LLMatcher

from server.engine.adapters import AdapterLease
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.handle import RequestHandle
from server.engine.types import GenerationRequest, PromptToken, TokenEvent


class SequenceStatus(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    handle: RequestHandle
    leases: list[tuple[AdapterLease, float]]
    detokenizer: IncrementalDetokenizer
    status: SequenceStatus = SequenceStatus.WAITING
    adapter_slots: list[int] = field(default_factory=list)
    kv_row: int | None = None
    cached_tokens: int = 0  # positions whose keys and values are in the KV cache
    generated: list[int] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    matcher: LLMatcher | None = None  # the grammar's parser state, for constrained requests
    prompt_tokens: list[PromptToken] = field(default_factory=list)  # scored in the prefill, on request

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def adapter_weights(self) -> list[float]:
        return [weight for _, weight in self.leases]

    @property
    def last_token(self) -> int:
        return self.generated[-1] if self.generated else self.request.prompt_ids[-1]

    def token_ids(self) -> list[int]:
        return [*self.request.prompt_ids, *self.generated]
