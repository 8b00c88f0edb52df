"""The engine loop: schedule -> run -> postprocess, one step at a time, on one thread.

What happens to one request, file by file:

1. ``Engine.submit`` (this file, event-loop thread) checks the limits, leases the adapter
   versions it names (``adapters.py``) and queues a :class:`~server.engine.sequence.Sequence`
   with a :class:`~server.engine.handle.RequestHandle` the API layer reads events from.
2. Each step the :class:`~server.engine.scheduler.Scheduler` (``scheduler.py``) plans: the
   running rows decode one token, waiting requests are admitted into free KV rows
   (``kv_cache_manager.py``) and prefilled within the token budget, long prompts in chunks.
3. The :class:`~server.engine.model_runner.ModelRunner` (``model_runner.py``) turns the plan
   into tensors and runs the routed forwards over the preallocated KV cache (``kv_cache.py``).
4. The sampler (``sampler.py``) chooses every row's token on the device in one batch; the
   step's only device->host transfer brings the chosen ids and logprobs back.
5. Postprocessing (this file) appends each token, detokenises it incrementally
   (``detokenizer.py``), checks stops on the new text only, streams a ``TokenEvent`` and
   retires finished rows (their KV row is reused at once, no other row moves).

Between steps, at most one fine-tuning micro-step runs when the serving-first policy says it
is due (``training_gate.py``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from importlib.metadata import version as installed_version
from typing import TypeVar, cast

import torch

from server import metrics
from server.engine.adapters import AdapterLease, AdapterRegistry
from server.engine.detokenizer import IncrementalDetokenizer, SpecialTokens
from server.engine.grammar import GrammarCompiler, GrammarMasks
from server.engine.handle import RequestHandle, deliver
from server.engine.model_runner import ModelRunner
from server.engine.sampler import PromptScores, SamplingBatch, sample
from server.engine.scheduler import Scheduler, StepPlan
from server.engine.sequence import Sequence
from server.engine.training_gate import TrainingGate, TrainingTask
from server.engine.types import (
    EngineStoppedError,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    PromptToken,
    QueueFullError,
    TokenEvent,
)
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Engine:
    def __init__(self, runner: ModelRunner, registry: AdapterRegistry, settings: ServerSettings, model_name: str):
        self.runner = runner
        self.registry = registry
        self.settings = settings
        self.model_name = model_name
        self.tokenizer = runner.tokenizer
        self.scheduler = Scheduler(settings.max_batch_size, settings.prefill_token_budget)
        runner.allocate_kv_cache(settings.max_batch_size, settings.max_total_tokens)
        self._special = SpecialTokens(self.tokenizer)
        self.grammars = GrammarCompiler(self.tokenizer, runner.vocab_size)
        self._grammar_masks = GrammarMasks(runner.vocab_size)
        self._wakeup = threading.Condition()
        self._training = TrainingGate(settings.training_share)
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
        task = TrainingTask(work)
        with self._wakeup:
            if self._stopping:
                raise EngineStoppedError("the engine is stopping")
            self._training.add(task)
            self._wakeup.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return cast(T, task.result)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes:
        return self.grammars.token_bytes(token_id)

    def is_ready(self) -> bool:
        return self._ready and self._thread.is_alive()

    @property
    def queue_length(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running_count(self) -> int:
        return self.scheduler.active_count

    def gauges(self) -> dict[str, int]:
        """The state :class:`server.metrics.ServingState` reads at each scrape."""
        kv_cache = self.runner.kv_cache
        return {
            "adapters_registered": self.registry.count(),
            "adapters_resident": self.registry.resident_count(),
            "adapter_bank_bytes": self.runner.bank.memory_bytes(),
            "kv_cache_bytes": kv_cache.bytes if kv_cache is not None else 0,
        }

    def adapter_activity(self) -> tuple[int, list[str], list[str]]:
        """For ``vllm:lora_requests_info``: every row may name its own adapter, so a batch applies up to
        ``--max-batch-size`` of them; ids in order of first appearance, blends contributing each of theirs."""
        with self._wakeup:
            running = [*self.scheduler.running, *([self.scheduler.chunked] if self.scheduler.chunked else [])]
            waiting = list(self.scheduler.waiting)

        def ids(sequences: list[Sequence]) -> list[str]:
            return list(dict.fromkeys(adapter for sequence in sequences for adapter in sequence.request.adapters))

        return self.settings.max_batch_size, ids(running), ids(waiting)

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
        # Before the leases: a grammar that does not compile then has nothing to give back.
        grammar = request.params.grammar
        matcher = self.grammars.matcher(grammar) if grammar is not None else None
        leases: list[tuple[AdapterLease, float]] = []
        try:
            for adapter_id, weight in request.adapters.items():
                leases.append((self.registry.lease(adapter_id), weight))
        except Exception:
            for lease, _ in leases:
                lease.release()
            raise
        handle = RequestHandle(request.request_id, len(request.prompt_ids), asyncio.get_running_loop())
        sequence = Sequence(request, handle, leases, IncrementalDetokenizer(self.tokenizer), matcher=matcher)
        with self._wakeup:
            if len(self.scheduler.waiting) >= self.settings.max_queue:
                self._finish_cancelled()
            if len(self.scheduler.waiting) >= self.settings.max_queue:
                for lease, _ in leases:
                    lease.release()
                raise QueueFullError(f"the queue is full ({self.settings.max_queue} waiting, --max-queue); retry later")
            self.scheduler.add(sequence)
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
        if request.params.min_tokens > max_new_tokens:
            raise InvalidRequestError(
                f"min_tokens ({request.params.min_tokens}) must be <= max_new_tokens ({max_new_tokens})",
                param="min_tokens",
            )
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
                while not (self._stopping or self.scheduler.has_work() or self._training):
                    self._wakeup.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception:
                logger.exception("engine step failed; failing the batch")
                self._fail_all()
            self._train_if_due()
        self._fail_all(waiting=True)
        with self._wakeup:
            self._training.fail_all()

    def _step(self) -> None:
        with self._wakeup:
            self._finish_cancelled()
            plan = self.scheduler.schedule()
        for sequence in plan.admitted:
            metrics.QUEUE_TIME.observe(time.monotonic() - sequence.submitted_at)
            sequence.adapter_slots = [lease.slot() for lease, _ in sequence.leases]
        if plan.empty:
            return
        self.runner.move_rows(plan.kv_moves)
        self._prefill(plan)
        if plan.decode:
            metrics.BATCH_SIZE.observe(len(plan.decode))
            logits = self.runner.decode(plan.decode)
            for sequence in plan.decode:
                self.scheduler.decoded(sequence)
            self._postprocess(plan.decode, logits)

    def _prefill(self, plan: StepPlan) -> None:
        if not plan.prefill:
            return
        output = self.runner.prefill(plan.prefill)
        completed = []
        for row, segment in enumerate(plan.prefill):
            self.scheduler.prefilled(segment)
            scores = output.prompt_scores[row]
            if scores is not None:
                self._record_prompt_scores(segment.sequence, segment.start, scores)
            if segment.completes:
                completed.append(row)
        if completed:
            sequences = [plan.prefill[row].sequence for row in completed]
            metrics.PROMPT_TOKENS.inc(sum(sequence.prompt_length for sequence in sequences))
            logits = output.logits
            self._postprocess(sequences, logits[completed] if len(completed) < len(plan.prefill) else logits)

    @staticmethod
    def _record_prompt_scores(sequence: Sequence, start: int, scores: PromptScores) -> None:
        """Append one segment's prompt scores: prompt position ``start + 1 + i`` gets ``scores[i]``."""
        if start == 0:
            sequence.prompt_tokens.append(PromptToken(sequence.prompt[0], None))
        targets = sequence.prompt[start + 1 : start + 1 + scores.logprobs.shape[0]]
        alternatives = _pairs(scores.top_ids, scores.top_logprobs) or [()] * len(targets)
        for token, logprob, top in zip(targets, scores.logprobs.tolist(), alternatives, strict=True):
            sequence.prompt_tokens.append(PromptToken(token, logprob, top))

    def _postprocess(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Sample every row's next token, stream it, and retire the rows that finished."""
        chosen = sample(logits, self._sampling_batch(sequences))
        tokens, logprobs = chosen.tokens.tolist(), chosen.logprobs.tolist()
        alternatives = _pairs(chosen.top_ids, chosen.top_logprobs)
        metrics.GENERATION_TOKENS.inc(len(sequences))
        outbox: list[tuple[RequestHandle, TokenEvent | FinishEvent]] = []
        for row, sequence in enumerate(sequences):
            top = alternatives[row][: sequence.request.params.top_logprobs] if alternatives else ()
            event, reason = self._append_token(sequence, tokens[row], logprobs[row], top)
            outbox.append((sequence.handle, event))
            if reason is not None:
                with self._wakeup:
                    self.scheduler.finish(sequence)
                outbox.append((sequence.handle, self._finished(sequence, reason)))
        deliver(outbox)

    def _sampling_batch(self, sequences: list[Sequence]) -> SamplingBatch:
        params = [sequence.request.params for sequence in sequences]
        penalised = any(p.repetition_penalty != 1.0 for p in params)
        device = self.runner.device
        return SamplingBatch.build(
            params,
            [len(sequence.generated) for sequence in sequences],
            [sequence.token_ids() for sequence in sequences] if penalised else None,
            device,
            grammar=self._grammar_masks.fill([sequence.matcher for sequence in sequences], device),
            eos_token_ids=tuple(self.runner.eos_token_ids),
        )

    def _append_token(
        self, sequence: Sequence, token: int, logprob: float, top: tuple[tuple[int, float], ...]
    ) -> tuple[TokenEvent, FinishReason | None]:
        sequence.generated.append(token)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.monotonic()
            metrics.TIME_TO_FIRST_TOKEN.observe(sequence.first_token_at - sequence.submitted_at)
        special = token in self._special
        text = self._special.text[token] if special else sequence.detokenizer.step(token)
        previous_length = len(sequence.text)
        if not special:
            sequence.text += text
        first = len(sequence.generated) == 1
        event = TokenEvent(token, text, logprob, special, top, tuple(sequence.prompt_tokens) if first else ())
        sequence.tokens.append(event)
        params = sequence.request.params
        matcher = sequence.matcher
        if matcher is not None and not matcher.consume_token(token):
            # The mask only lets through tokens the matcher accepts, so this is a grammar-engine bug.
            logger.error(
                "grammar rejected token %d of request %s: %s", token, sequence.handle.request_id, matcher.get_error()
            )
            return event, "stop_sequence"
        if token in self.runner.eos_token_ids and not params.ignore_eos:
            return event, "eos_token"
        if matcher is not None and matcher.is_stopped():
            return event, "eos_token"  # the text is complete and the grammar allows nothing more
        if len(sequence.generated) >= params.min_tokens:
            for stop in params.stop:
                position = sequence.text.find(stop, max(0, previous_length - len(stop) + 1))
                if position >= 0:
                    sequence.text = sequence.text[: position + len(stop)]
                    return event, "stop_sequence"
        if len(sequence.generated) >= params.max_new_tokens:
            return event, "length"
        return event, None

    def _finish_cancelled(self) -> None:
        """Finish every cancelled request, wherever it is (caller holds ``_wakeup``)."""
        for sequence in self.scheduler.cancelled():
            self._finish(sequence, "cancelled")

    def _train_if_due(self) -> None:
        if not self._training:  # the common case, checked without taking the lock every iteration
            return
        with self._wakeup:
            task = self._training.take_due(serving=self.scheduler.has_work())
        if task is not None:
            self._training.run(task)

    def _finish(self, sequence: Sequence, reason: FinishReason) -> None:
        sequence.handle.push(self._finished(sequence, reason))

    def _finished(self, sequence: Sequence, reason: FinishReason) -> FinishEvent:
        """Record the end of ``sequence`` (metrics, final text, leases released) and return its event."""
        now = time.monotonic()
        metrics.REQUESTS_FINISHED.labels(reason).inc()
        metrics.E2E_LATENCY.observe(now - sequence.submitted_at)
        if sequence.first_token_at is not None and len(sequence.generated) > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((now - sequence.first_token_at) / (len(sequence.generated) - 1))
        held_back = ""
        if reason not in ("cancelled", "stop_sequence"):
            streamed = sequence.text
            sequence.text = self.tokenizer.decode(sequence.generated, skip_special_tokens=True)
            # The incremental detokeniser holds back an incomplete UTF-8 character; the full decode has it.
            held_back = sequence.text[len(streamed) :] if sequence.text.startswith(streamed) else ""
        for lease, _ in sequence.leases:
            lease.release()
        sequence.leases = []
        return FinishEvent(
            reason,
            sequence.text,
            sequence.prompt_length,
            tuple(sequence.tokens),
            sequence.request.params.seed,
            tuple(sequence.prompt_tokens),
            held_back,
        )

    def _fail_all(self, *, waiting: bool = False) -> None:
        """Cancel every admitted request (after a failed step), and the queued ones too when stopping."""
        with self._wakeup:
            sequences = [*self.scheduler.running, *([self.scheduler.chunked] if self.scheduler.chunked else [])]
            if waiting:
                sequences.extend(self.scheduler.waiting)
            for sequence in sequences:
                self.scheduler.finish(sequence)
        for sequence in sequences:
            self._finish(sequence, "cancelled")


def _pairs(ids: torch.Tensor | None, values: torch.Tensor | None) -> list[tuple[tuple[int, float], ...]]:
    """Per row, the ``(token_id, logprob)`` alternatives of a top-k result (``[]`` when none was asked for)."""
    if ids is None or values is None:
        return []
    return [
        tuple(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]
