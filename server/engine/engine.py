"""The generation loop: iteration-level continuous batching over mixed adapters.

One engine thread owns the model. Each iteration it (1) drops cancelled rows, (2) prefills
arrivals within a token budget, so a running batch waits for at most one budget of prefill
work, (3) runs one decode step for every running row, and (4) may run one fine-tuning
micro-step. Rows join and leave the batch KV cache between iterations (see docs/engine.md).

Training shares the model under a serving-first policy: while requests wait or run, a
micro-step of duration ``d`` is followed by at least ``d * (1 - share) / share`` of serving
before the next one, so training gets at most ``share`` of the engine's time and no request
waits more than one micro-step; with no requests, micro-steps run back to back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from typing import TypeVar, cast

import torch
from transformers import DynamicCache

from server import metrics
from server.engine import kv_cache
from server.engine.adapters import AdapterLease, AdapterRegistry
from server.engine.model_runner import ModelRunner, StepInputs
from server.engine.sampling import sample_row
from server.engine.types import (
    EngineStoppedError,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    TokenEvent,
)
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class _TrainingTask:
    work: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class RequestHandle:
    """The API side of one request: an event stream fed by the engine thread."""

    def __init__(self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent | FinishEvent] = asyncio.Queue()
        self.cancelled = threading.Event()

    def push(self, event: TokenEvent | FinishEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            # The submitting event loop is gone, so nobody can read this request any more.
            self.cancelled.set()

    async def events(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def result(self) -> FinishEvent:
        async for event in self.events():
            if isinstance(event, FinishEvent):
                return event
        raise RuntimeError("event stream ended without a finish event")

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    handle: RequestHandle
    leases: list[tuple[AdapterLease, float]]
    prompt: torch.Tensor
    generator: torch.Generator | None
    slots: list[int] = field(default_factory=list)
    prefilled: int = 0
    cache: DynamicCache | None = None
    generated: list[int] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def weights(self) -> list[float]:
        return [weight for _, weight in self.leases]

    @property
    def length(self) -> int:
        return self.prompt.numel() + len(self.generated)


class Engine:
    def __init__(self, runner: ModelRunner, registry: AdapterRegistry, settings: ServerSettings, model_name: str):
        self.runner = runner
        self.registry = registry
        self.settings = settings
        self.model_name = model_name
        self.tokenizer = runner.tokenizer
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._wakeup = threading.Condition()
        self._training: deque[_TrainingTask] = deque()
        self._training_due_at = 0.0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="spectra-engine", daemon=True)
        self._ready = False
        self._version = installed_version("spectra-serve")

    def start(self) -> None:
        self._thread.start()
        self._ready = True

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout=30)
        self._ready = False

    def run_training(self, work: Callable[[], T]) -> T:
        """Run ``work`` (one fine-tuning micro-step) on the engine thread under the serving-first policy.

        Blocks the calling (job) thread until it ran; re-raises what ``work`` raised.
        """
        task = _TrainingTask(work)
        with self._wakeup:
            if self._stopping:
                raise EngineStoppedError("the engine is stopping")
            self._training.append(task)
            self._wakeup.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return cast(T, task.result)

    def is_ready(self) -> bool:
        return self._ready and self._thread.is_alive()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running) + len(self._prefilling)

    def info(self) -> dict:
        return {
            "model_id": self.model_name,
            "model_path": self.runner.model_path,
            "architecture": self.runner.architecture,
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "device": str(self.runner.device),
            "limits": self.settings.limits(),
            "adapters": {
                "registered": self.registry.count(),
                "resident": self.registry.resident_count(),
                "resident_bytes": self.registry.resident_bytes,
                "memory_budget_bytes": self.registry.memory_budget_bytes,
            },
            "running_requests": self.running_count,
            "queued_requests": self.queue_length,
            "version": self._version,
        }

    # -- submission (event-loop thread) -------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        self._validate(request)
        leases: list[tuple[AdapterLease, float]] = []
        try:
            for adapter_id, weight in request.adapters.items():
                leases.append((self.registry.lease(adapter_id), weight))
        except Exception:
            for lease, _ in leases:
                lease.release()
            raise
        handle = RequestHandle(request.request_id, len(request.prompt_ids), asyncio.get_running_loop())
        generator = None
        if not request.params.greedy:
            generator = torch.Generator().manual_seed(request.params.seed if request.params.seed is not None else 0)
        sequence = Sequence(request, handle, leases, torch.tensor(request.prompt_ids, dtype=torch.long), generator)
        with self._wakeup:
            if len(self._waiting) >= self.settings.max_queue:
                self._drop_cancelled_waiting()
            if len(self._waiting) >= self.settings.max_queue:
                for lease, _ in leases:
                    lease.release()
                raise QueueFullError(f"the queue is full ({self.settings.max_queue} waiting, --max-queue); retry later")
            self._waiting.append(sequence)
            self._wakeup.notify()
        for adapter_id in request.adapters or [None]:
            metrics.ADAPTER_REQUESTS.labels(metrics.ADAPTER_LABELS.label(adapter_id)).inc()
        return handle

    def _validate(self, request: GenerationRequest) -> None:
        """The per-request limits. A message that starts with its ``param`` lets the API layer put the
        client's own field name there; each names the ``spectra serve`` flag that sets the limit."""
        limits = self.settings
        prompt_tokens = len(request.prompt_ids)
        if prompt_tokens == 0:
            raise InvalidRequestError("the prompt is empty", param="inputs")
        if prompt_tokens > limits.max_input_tokens:
            raise InvalidRequestError(
                f"the prompt has {prompt_tokens} tokens; the limit is {limits.max_input_tokens} (--max-input-tokens)",
                param="inputs",
            )
        max_new_tokens = request.params.max_new_tokens
        if max_new_tokens > limits.max_new_tokens:
            raise InvalidRequestError(
                f"max_new_tokens is {max_new_tokens}; the limit is {limits.max_new_tokens} (--max-new-tokens)",
                param="max_new_tokens",
            )
        allowed = limits.max_total_tokens - prompt_tokens
        if max_new_tokens > allowed:
            raise InvalidRequestError(
                f"max_new_tokens must be <= {allowed} for this prompt ({prompt_tokens} prompt tokens; "
                f"the limit on prompt + new tokens is {limits.max_total_tokens}, --max-total-tokens)",
                param="max_new_tokens",
            )
        stops = request.params.stop
        if len(stops) > limits.max_stop_sequences:
            raise InvalidRequestError(
                f"stop has {len(stops)} sequences; the limit is {limits.max_stop_sequences} (--max-stop-sequences)",
                param="stop",
            )
        longest = max((len(stop) for stop in stops), default=0)
        if longest > limits.max_stop_chars:
            raise InvalidRequestError(
                f"stop has a sequence of {longest} characters; the limit is {limits.max_stop_chars} (--max-stop-chars)",
                param="stop",
            )
        if any(not stop for stop in stops):
            raise InvalidRequestError("stop must not contain an empty sequence", param="stop")
        if len(request.adapters) > self.settings.max_blend_adapters:
            raise InvalidRequestError(
                f"a blend may name at most {self.settings.max_blend_adapters} adapters, got {len(request.adapters)}",
                param="adapters",
            )
        vocab = len(self.tokenizer)
        if any(not 0 <= token < vocab for token in request.prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab - 1}]", param="inputs")

    # -- the loop (engine thread) --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (self._stopping or self._serving_work() or self._training):
                    self._wakeup.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception:
                logger.exception("engine step failed; failing the batch")
                self._fail_all()
            self._train_if_due()
        self._fail_all()
        self._fail_training()

    def _serving_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        if self._running:
            self._decode()

    def _train_if_due(self) -> None:
        if not self._training:  # the common case, checked without taking the lock every iteration
            return
        with self._wakeup:
            if not self._training or (self._serving_work() and time.monotonic() < self._training_due_at):
                return
            task = self._training.popleft()
        started = time.monotonic()
        try:
            task.result = task.work()
        except BaseException as error:
            task.error = error
        finally:
            ended = time.monotonic()
            share = self.settings.training_share
            self._training_due_at = ended + (ended - started) * (1 - share) / share
            task.done.set()

    def _fail_training(self) -> None:
        with self._wakeup:
            tasks, self._training = list(self._training), deque()
        for task in tasks:
            task.error = EngineStoppedError("the engine stopped before this training step ran")
            task.done.set()

    def _admit(self) -> None:
        with self._wakeup:
            while self._waiting and len(self._running) + len(self._prefilling) < self.settings.max_batch_size:
                sequence = self._waiting.popleft()
                metrics.QUEUE_TIME.observe(time.monotonic() - sequence.submitted_at)
                sequence.slots = [lease.slot() for lease, _ in sequence.leases]
                self._prefilling.append(sequence)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._prefilling if s.handle.cancelled.is_set()]:
            self._prefilling.remove(sequence)
            self._finish(sequence, "cancelled")
        with self._wakeup:
            self._drop_cancelled_waiting()
        cancelled = [s for s in self._running if s.handle.cancelled.is_set()]
        if cancelled:
            self._keep_rows([i for i, s in enumerate(self._running) if not s.handle.cancelled.is_set()])
            for sequence in cancelled:
                self._finish(sequence, "cancelled")

    def _drop_cancelled_waiting(self) -> None:
        """Free the queue places of cancelled requests (caller holds ``_wakeup``)."""
        for sequence in [s for s in self._waiting if s.handle.cancelled.is_set()]:
            self._waiting.remove(sequence)
            self._finish(sequence, "cancelled")

    def _routing(self, sequences: list[Sequence], columns: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token slots (and blend weights) ``[rows, columns, K]`` for the routing layer."""
        width = max((len(s.slots) for s in sequences), default=1) or 1
        slots = torch.zeros(len(sequences), width, dtype=torch.long)
        weights = torch.zeros(len(sequences), width)
        for row, sequence in enumerate(sequences):
            slots[row, : len(sequence.slots)] = torch.tensor(sequence.slots, dtype=torch.long)
            weights[row, : len(sequence.slots)] = torch.tensor(sequence.weights)
        plain = width == 1 and bool(((weights == 1.0) | (slots == 0)).all())
        slots = slots[:, None, :].expand(-1, columns, -1)
        if plain:
            return slots[..., 0], None
        return slots, weights[:, None, :].expand(-1, columns, -1)

    def _prefill(self) -> None:
        budget = self.settings.prefill_token_budget
        group: list[Sequence] = []
        for sequence in list(self._prefilling):
            remaining = sequence.prompt.numel() - sequence.prefilled
            if sequence.prefilled == 0 and remaining <= budget:
                group.append(sequence)
                budget -= remaining
            elif not group and budget == self.settings.prefill_token_budget:
                self._prefill_chunk(sequence, budget)
                return
        if group:
            self._prefill_group(group)

    def _prefill_group(self, group: list[Sequence]) -> None:
        """Prefill whole prompts together, left-padded, then sample each row's first token."""
        length = max(s.prompt.numel() for s in group)
        device = self.runner.device
        input_ids = torch.full((len(group), length), self.runner.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for row, sequence in enumerate(group):
            input_ids[row, length - sequence.prompt.numel() :] = sequence.prompt
            mask[row, length - sequence.prompt.numel() :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        slots, weights = self._routing(group, length)
        cache = DynamicCache()
        logits = self.runner.forward(
            StepInputs(input_ids.to(device), mask.to(device), positions.to(device), slots, weights), cache
        )
        for sequence in group:
            self._prefilling.remove(sequence)
            sequence.prefilled = sequence.prompt.numel()
        self._join(group, cache, mask.to(device), logits)

    def _prefill_chunk(self, sequence: Sequence, budget: int) -> None:
        """A prompt longer than the budget is prefilled alone, one budget-sized chunk per iteration."""
        device = self.runner.device
        start, end = sequence.prefilled, min(sequence.prompt.numel(), sequence.prefilled + budget)
        if sequence.cache is None:
            sequence.cache = DynamicCache()
        chunk = sequence.prompt[start:end][None, :]
        mask = torch.ones(1, end, dtype=torch.long, device=device)
        positions = torch.arange(start, end)[None, :]
        slots, weights = self._routing([sequence], end - start)
        logits = self.runner.forward(
            StepInputs(chunk.to(device), mask, positions.to(device), slots, weights), sequence.cache
        )
        sequence.prefilled = end
        if end == sequence.prompt.numel():
            self._prefilling.remove(sequence)
            cache, sequence.cache = sequence.cache, None
            self._join([sequence], cache, mask, logits)

    def _join(self, sequences: list[Sequence], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
        else:
            self._cache, self._mask = kv_cache.concat(self._cache, self._mask, cache, mask)
        self._running.extend(sequences)
        metrics.PROMPT_TOKENS.inc(sum(sequence.prompt.numel() for sequence in sequences))
        self._emit(sequences, logits, first_row=len(self._running) - len(sequences))

    def _decode(self) -> None:
        assert self._cache is not None and self._mask is not None
        device = self.runner.device
        rows = len(self._running)
        input_ids = torch.tensor([[s.generated[-1]] for s in self._running], dtype=torch.long, device=device)
        positions = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones(rows, 1, dtype=self._mask.dtype, device=device)], dim=1)
        slots, weights = self._routing(self._running, 1)
        metrics.BATCH_SIZE.observe(rows)
        logits = self.runner.forward(StepInputs(input_ids, self._mask, positions, slots, weights), self._cache)
        self._emit(self._running, logits, first_row=0)

    def _emit(self, sequences: list[Sequence], logits: torch.Tensor, first_row: int) -> None:
        """Sample one token per sequence, stream it, and retire finished rows from the batch."""
        logits = logits.cpu()
        metrics.GENERATION_TOKENS.inc(len(sequences))
        finished: dict[int, tuple[Sequence, FinishReason]] = {}
        for offset, sequence in enumerate(sequences):
            seen = torch.cat([sequence.prompt, torch.tensor(sequence.generated, dtype=torch.long)])
            token, logprob = sample_row(logits[offset], sequence.request.params, seen, sequence.generator)
            reason = self._append_token(sequence, token, logprob)
            if reason is not None:
                finished[first_row + offset] = (sequence, reason)
        if finished:
            self._keep_rows([i for i in range(len(self._running)) if i not in finished])
            for sequence, reason in finished.values():
                self._finish(sequence, reason)

    def _append_token(self, sequence: Sequence, token: int, logprob: float) -> FinishReason | None:
        sequence.generated.append(token)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.monotonic()
            metrics.TIME_TO_FIRST_TOKEN.observe(sequence.first_token_at - sequence.submitted_at)
        special = token in self.tokenizer.all_special_ids
        if special:
            text = self.tokenizer.decode([token])
        else:
            decoded = self.tokenizer.decode(sequence.generated, skip_special_tokens=True)
            # Hold back a partial UTF-8 character until the bytes that complete it arrive.
            text = "" if decoded.endswith("\ufffd") else decoded[len(sequence.text) :]
            sequence.text += text
        event = TokenEvent(token, text, logprob, special)
        sequence.tokens.append(event)
        sequence.handle.push(event)
        params = sequence.request.params
        if token in self.runner.eos_token_ids:
            return "eos_token"
        for stop in params.stop:
            position = sequence.text.find(stop)
            if position >= 0:
                sequence.text = sequence.text[: position + len(stop)]
                return "stop_sequence"
        if len(sequence.generated) >= params.max_new_tokens:
            return "length"
        return None

    def _keep_rows(self, keep: list[int]) -> None:
        self._running = [self._running[i] for i in keep]
        if not self._running:
            self._cache, self._mask = None, None
            return
        assert self._cache is not None and self._mask is not None
        self._mask = kv_cache.select_rows(self._cache, self._mask, torch.tensor(keep, device=self._mask.device))

    def _finish(self, sequence: Sequence, reason: FinishReason) -> None:
        now = time.monotonic()
        metrics.REQUESTS_FINISHED.labels(reason).inc()
        metrics.E2E_LATENCY.observe(now - sequence.submitted_at)
        if sequence.first_token_at is not None and len(sequence.generated) > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((now - sequence.first_token_at) / (len(sequence.generated) - 1))
        if reason != "cancelled":
            final = self.tokenizer.decode(sequence.generated, skip_special_tokens=True)
            if reason != "stop_sequence":
                sequence.text = final
        for lease, _ in sequence.leases:
            lease.release()
        sequence.leases = []
        sequence.handle.push(
            FinishEvent(
                reason, sequence.text, sequence.prompt.numel(), tuple(sequence.tokens), sequence.request.params.seed
            )
        )

    def _fail_all(self) -> None:
        for sequence in [*self._running, *self._prefilling]:
            self._finish(sequence, "cancelled")
        self._running, self._prefilling = [], []
        self._cache, self._mask = None, None
