"""Fine-tuning jobs: validation, a FIFO of queued jobs, training on the served model, checkpoints, leases.

Each job has one thread. It validates the files (``validating_files``), waits its turn in the
queue (``queued``; at most ``max_concurrent_jobs`` train at once), then trains (``running``):
every micro-step runs on the engine thread through :meth:`Engine.run_training`, the optimizer
step and the bookkeeping here. Checkpoints, about ten per job and the last three kept, are stored
adapter versions of the job's adapter id plus the optimizer state (safetensors bytes the job store
holds), so a job whose server restarted resumes from its last checkpoint exactly. A job that does
not succeed leaves no adapter versions behind.

Leases (docs/finetuning.md, "Leases"): a replica trains only the jobs whose lease it holds. It claims a
job it creates at once, and every ``--job-lease-seconds``/3 a background thread renews the leases of its
jobs (seeing cancels asked for on other replicas) and claims unheld jobs (new, released, or left by a
replica that died) while it has fewer than ``max_concurrent_jobs``. A job whose lease was lost, or not
renewed within the lease, stops between micro-steps without writing anything more: the replica that
claims it next resumes it from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from safetensors.torch import load, save

from adapters_store.errors import BlobCorruptError, StoreUnavailableError, UnknownCursorError
from adapters_store.ids import new_id, validate_adapter_id
from adapters_store.interfaces import FileRepository, JobRepository
from adapters_store.records import CheckpointRecord, EventRecord, JobRecord
from server import metrics
from server.engine.engine import Engine
from server.engine.types import EngineError, EngineStoppedError
from server.finetune.data import TrainingExample, TrainingFileError, parse_training_file
from server.finetune.hyperparameters import (
    AdapterSpec,
    HyperparameterError,
    TrainingPlan,
    resolve_adapter,
    resolve_plan,
)
from server.finetune.trainer import (
    LossSum,
    NonFiniteLossError,
    SpectralTrainer,
    batch_indices,
    initial_adapter,
    micro_batches,
)
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
CHECKPOINTS_KEPT = 3
CANCEL_WAIT_SECONDS = 30.0
CANCEL_POLL_SECONDS = 0.2


class JobNotFoundError(EngineError):
    status_code = 404
    error_type = "not_found_error"


class JobConflictError(EngineError):
    status_code = 409


class UnknownFileError(EngineError):
    status_code = 404
    error_type = "not_found_error"


class JobCancelledError(Exception):
    """Raised inside a job thread when its cancel flag is seen."""


class ResumeError(RuntimeError):
    """A job interrupted by a restart whose checkpoint cannot be continued from."""


class LeaseLostError(Exception):
    """Raised inside a job thread whose replica no longer holds the job's lease: another one may train it."""


@dataclass
class _LiveJob:
    # When the lease ends at the latest (monotonic clock), counted from before the call that set it: the
    # store's expiry is later, so a replica cut off from the store stops before another can claim the job.
    lease_deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    trainer: SpectralTrainer | None = None


def _short(job_id: str) -> str:
    return job_id.removeprefix("ftjob-")[:8]


def adapter_id_for(job_id: str, suffix: str | None, namespace: str | None = None) -> str:
    """``[namespace/]ft-<suffix>-<8 hex of the job id>``: says where the adapter came from, within the id rules."""
    name = f"ft-{suffix}-{_short(job_id)}" if suffix else f"ft-{_short(job_id)}"
    return validate_adapter_id(f"{namespace}/{name}" if namespace else name)


def _trained_tokens(examples: list[TrainingExample]) -> int:
    """Tokens whose prediction is trained (the first token is never predicted)."""
    return sum(sum(example.loss_mask[1:]) for example in examples)


class JobManager:
    def __init__(
        self, engine: Engine, files: FileRepository, store: JobRepository, settings: ServerSettings, *, replica: str
    ):
        """``replica``: who holds this process's leases (``server.main.replica_id``)."""
        self.engine = engine
        self.files = files
        self.store = store
        self.settings = settings
        self.replica = replica
        self._lease_seconds = settings.job_lease_seconds
        self._live: dict[str, _LiveJob] = {}
        self._turn = threading.Condition()
        self._queue: list[str] = []
        self._running: set[str] = set()
        self._stopping = False
        self._wake = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Claim what is unheld (with the embedded store: everything the last process left), running jobs
        first, then queued ones in their order, then those still validating; then keep the leases."""
        self._claim()
        threading.Thread(target=self._keep_leases, name="finetune-leases", daemon=True).start()

    def stop(self) -> None:
        with self._turn:
            self._stopping = True
            self._turn.notify_all()
        self._wake.set()

    def _launch(self, job: JobRecord) -> None:
        live = _LiveJob(lease_deadline=time.monotonic() + self._lease_seconds)
        if job.cancel_requested:
            live.cancel.set()
        self._live[job.id] = live
        resumed = job.status == "running"
        threading.Thread(target=self._run, args=(job.id, resumed), name=f"finetune-{job.id}", daemon=True).start()

    # -- leases -----------------------------------------------------------------------------------

    def _keep_leases(self) -> None:
        """Every lease/3 (or when a job of this replica ends): renew, then claim up to the free slots."""
        while True:
            self._wake.wait(self._lease_seconds / 3)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._renew()
                self._claim()
            except StoreUnavailableError as error:
                logger.warning("finetune leases not renewed: %s", error)
            except Exception:
                logger.exception("finetune lease upkeep failed")

    def _renew(self) -> None:
        for job_id, live in list(self._live.items()):
            asked = time.monotonic()
            job = self.store.renew_lease(job_id, self.replica, lease_seconds=self._lease_seconds)
            if job is None:
                logger.warning("finetune job lease lost id=%s replica=%s", job_id, self.replica)
                live.lease_lost.set()
            else:
                live.lease_deadline = asked + self._lease_seconds
                if job.cancel_requested and not live.cancel.is_set():
                    logger.info("finetune job cancel requested by another replica id=%s", job_id)
                    live.cancel.set()
            with self._turn:
                self._turn.notify_all()

    def _claim(self) -> None:
        free = self.settings.max_concurrent_jobs - len(self._live)
        if free <= 0 or self._stopping:
            return
        claimed = self.store.claim_jobs(self.replica, lease_seconds=self._lease_seconds, limit=free)
        with self._turn:
            self._queue.extend(job.id for job in claimed if job.status in ("running", "queued"))
        for job in claimed:
            logger.info("finetune job claimed id=%s status=%s replica=%s", job.id, job.status, self.replica)
            self._launch(job)

    def _check_lease(self, live: _LiveJob) -> None:
        if live.lease_lost.is_set() or time.monotonic() > live.lease_deadline:
            raise LeaseLostError

    # -- API --------------------------------------------------------------------------------------

    def create(
        self,
        *,
        model: str,
        training_file: str,
        validation_file: str | None,
        suffix: str | None,
        seed: int | None,
        hyperparameters: dict[str, Any],
        adapter: dict[str, Any],
        metadata: dict[str, str] | None = None,
        namespace: str | None = None,
    ) -> JobRecord:
        """A job owned by ``namespace`` (None: the server's), whose adapter is stored in that namespace."""
        if model != self.engine.model_name:
            raise HyperparameterError(
                f"model {model!r} is not served here; fine-tune the served base model {self.engine.model_name!r}",
                param="model",
            )
        for param, file_id in (("training_file", training_file), ("validation_file", validation_file)):
            if file_id is not None:
                self._training_file_record(file_id, param)
        job_id = new_id("ftjob")
        seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") % (1 << 31)
        spec = self._adapter_spec(adapter, seed)
        adapter_id = adapter_id_for(job_id, suffix, namespace)
        job = self.store.insert_job(
            job_id=job_id,
            model=model,
            training_file=training_file,
            validation_file=validation_file,
            suffix=suffix,
            seed=seed,
            adapter_id=adapter_id,
            request={"hyperparameters": hyperparameters, "adapter": adapter, "metadata": metadata},
            adapter=spec.as_dict(),
            namespace=namespace,
        )
        # Claimed here at once, so the job queues on the replica it was created on (another could claim it
        # in between: then that one trains it).
        claimed = self.store.claim_job(job_id, self.replica, lease_seconds=self._lease_seconds)
        self.store.add_event(job_id, f"Created fine-tuning job {job_id}")
        logger.info("finetune job created id=%s method=%s adapter_id=%s", job_id, spec.method, adapter_id)
        if claimed is not None:
            self._launch(claimed)
            job = claimed
        return job

    def list(self, *, after: str | None, limit: int, visible_to: str | None = None) -> list[JobRecord]:
        try:
            return self.store.list_jobs(after=after, limit=limit, visible_to=visible_to)
        except UnknownCursorError as error:
            raise JobNotFoundError(str(error), param="after") from error

    def events(self, job_id: str, *, after: str | None, limit: int) -> list[EventRecord]:
        self.get(job_id)
        try:
            return self.store.events(job_id, after=after, limit=limit)
        except UnknownCursorError as error:
            raise JobNotFoundError(str(error), param="after") from error

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise JobNotFoundError(f"fine-tuning job {job_id!r} not found", param="fine_tuning_job_id")
        return job

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.terminal:
            raise JobConflictError(
                f"job {job_id} has already finished ({job.status}); only unfinished jobs can be cancelled"
            )
        live = self._live.get(job_id)
        if live is not None:
            live.cancel.set()
            with self._turn:
                self._turn.notify_all()
            live.finished.wait(CANCEL_WAIT_SECONDS)
            return self.get(job_id)
        if self.store.claim_job(job_id, self.replica, lease_seconds=self._lease_seconds) is not None:
            # No replica trains it (none claimed it yet, or its replica died): cancelled here.
            try:
                return self._cancelled(job_id)
            finally:
                self.store.release_lease(job_id, self.replica)
        # Another replica holds the lease: it cancels at its next renewal; wait for that, as for a local job.
        self.store.update_job(job_id, cancel_requested=True)
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while not (job := self.get(job_id)).terminal and time.monotonic() < deadline:
            time.sleep(CANCEL_POLL_SECONDS)
        return job

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        self.get(job_id)
        return self.store.checkpoints(job_id)

    def status_counts(self) -> dict[str, int]:
        return self.store.count_by_status()

    def training_bytes(self) -> int:
        return sum(live.trainer.state_bytes for live in self._live.values() if live.trainer is not None)

    # -- validation -------------------------------------------------------------------------------

    def _training_file_record(self, file_id: str, param: str):
        record = self.files.get(file_id)
        if record is None:
            raise UnknownFileError(f"file {file_id!r} not found", param=param)
        if record.purpose != "fine-tune":
            raise HyperparameterError(f"file {file_id} has purpose {record.purpose!r}, not 'fine-tune'", param=param)
        if record.broken:
            raise JobConflictError(f"file {file_id} is broken ({record.broken}); upload it again", param=param)
        return record

    def _adapter_spec(self, adapter: dict[str, Any], seed: int) -> AdapterSpec:
        runner = self.engine.runner
        return resolve_adapter(
            method=adapter.get("type", "fourierft"),
            n_frequency=adapter.get("n_frequency"),
            scaling=adapter.get("scaling"),
            target_modules=adapter.get("target_modules"),
            init=adapter.get("init"),
            norm=adapter.get("norm"),
            delta=adapter.get("delta"),
            seed=seed,
            module_shapes=runner.module_shapes,
            model_type=runner.model.config.model_type,
        )

    def _examples(self, file_id: str, param: str) -> list[TrainingExample]:
        record = self._training_file_record(file_id, param)
        try:
            return parse_training_file(
                self.files.read(record),
                self.engine.tokenizer,
                max_tokens=self.engine.settings.max_total_tokens,
                end_token_ids=self.engine.runner.eos_token_ids,
            )
        except TrainingFileError as error:
            raise HyperparameterError(f"{param} {file_id}: {error}", param=param) from error

    def _validate(self, job: JobRecord) -> tuple[list[TrainingExample], list[TrainingExample], TrainingPlan]:
        training = self._examples(job.training_file, "training_file")
        validation = self._examples(job.validation_file, "validation_file") if job.validation_file else []
        if job.hyperparameters is not None:
            return training, validation, TrainingPlan.from_dict(job.hyperparameters)
        requested = job.request["hyperparameters"]
        plan = resolve_plan(
            n_examples=len(training),
            n_epochs=requested.get("n_epochs", "auto"),
            batch_size=requested.get("batch_size", "auto"),
            learning_rate_multiplier=requested.get("learning_rate_multiplier", "auto"),
            micro_batch_tokens=self.settings.finetune_micro_batch_tokens,
        )
        self.store.update_job(job.id, hyperparameters=plan.as_dict())
        return training, validation, plan

    # -- the job thread ---------------------------------------------------------------------------

    def _run(self, job_id: str, resumed: bool) -> None:
        live = self._live[job_id]
        try:
            if live.cancel.is_set():
                raise JobCancelledError
            job = self.get(job_id)
            if job.status == "validating_files":
                self.store.add_event(job_id, f"Validating training file: {job.training_file}")
            training, validation, plan = self._validate(job)
            if job.status == "validating_files":
                self.store.update_job(job_id, status="queued")
                self.store.add_event(job_id, "Files validated, moving job to queued state")
            self._wait_turn(job_id, live)
            try:
                self._train(self.get(job_id), live, training, validation, plan, resumed)
            finally:
                # Memory is back before any final status is visible.
                if live.trainer is not None:
                    live.trainer.close()
                    live.trainer = None
                with self._turn:
                    self._running.discard(job_id)
                    self._turn.notify_all()
        except LeaseLostError:
            logger.warning("finetune job stopped id=%s: lease lost; the replica that claims it resumes it", job_id)
        except JobCancelledError:
            self._cancelled(job_id)
        except EngineStoppedError:
            logger.info("finetune job interrupted by shutdown id=%s; it resumes on restart", job_id)
        except NonFiniteLossError as error:
            self._fail(job_id, "non_finite_loss", str(error), None)
        except ResumeError as error:
            self._fail(job_id, "resume_failed", str(error), None)
        except EngineError as error:
            self._fail(job_id, "invalid_request", error.message, error.param)
        except (torch.OutOfMemoryError, MemoryError) as error:
            self._fail(job_id, "out_of_memory", f"out of memory while training: {error}", None)
        except Exception as error:
            logger.exception("finetune job failed id=%s", job_id)
            self._fail(job_id, "internal_error", f"{type(error).__name__}: {error}", None)
        finally:
            try:
                self.store.release_lease(job_id, self.replica)
            except StoreUnavailableError as error:
                logger.warning("finetune job lease not released id=%s: %s", job_id, error)
            live.finished.set()
            self._live.pop(job_id, None)
            self._wake.set()

    def _wait_turn(self, job_id: str, live: _LiveJob) -> None:
        with self._turn:
            if job_id not in self._queue:
                self._queue.append(job_id)
            try:
                while not (
                    live.cancel.is_set()
                    or live.lease_lost.is_set()
                    or self._stopping
                    or (self._queue[0] == job_id and len(self._running) < self.settings.max_concurrent_jobs)
                ):
                    self._turn.wait()
            finally:
                self._queue.remove(job_id)
                self._turn.notify_all()
            self._check_lease(live)
            if live.cancel.is_set():
                raise JobCancelledError
            if self._stopping:
                raise EngineStoppedError("the server is stopping")
            self._running.add(job_id)

    def _engine_step(self, live: _LiveJob, work: Callable[[], T]) -> T:
        self._check_lease(live)
        if live.cancel.is_set():
            raise JobCancelledError
        return self.engine.run_training(work)

    def _train(
        self,
        job: JobRecord,
        live: _LiveJob,
        training: list[TrainingExample],
        validation: list[TrainingExample],
        plan: TrainingPlan,
        resumed: bool,
    ) -> None:
        runner = self.engine.runner
        assert job.adapter is not None
        spec = AdapterSpec(**{**job.adapter, "target_modules": tuple(job.adapter["target_modules"])})
        trainer = SpectralTrainer(
            runner.model,
            runner.bank,
            initial_adapter(runner.model, runner.module_shapes, spec, runner.architecture),
            plan,
            runner.pad_token_id,
        )
        live.trainer = trainer
        trained_tokens = 0
        if resumed:
            trained_tokens = self._resume(job, trainer)
        else:
            self.store.update_job(job.id, status="running", started_at=int(time.time()))
            self.store.add_event(job.id, "Fine-tuning job started")
        logger.info("finetune job running id=%s steps=%d from=%d", job.id, plan.total_steps, trainer.step)
        started = time.monotonic()
        first_step = trainer.step
        while trainer.step < plan.total_steps:
            step_started = time.monotonic()
            batch = [training[i] for i in batch_indices(plan, job.seed, trainer.step, len(training))]
            batch_tokens = _trained_tokens(batch)
            loss = LossSum(0.0, 0)
            for group in micro_batches(batch, plan.micro_batch_tokens):
                part = self._engine_step(
                    live, lambda group=group, tokens=batch_tokens: trainer.accumulate(group, tokens)
                )
                loss = LossSum(loss.total + part.total, loss.tokens + part.tokens)
            learning_rate = trainer.optimizer_step()
            metrics.FINETUNE_STEPS.inc()
            metrics.FINETUNE_LAST_LOSS.set(loss.mean)
            step_tokens = sum(example.n_tokens for example in batch)
            trained_tokens += step_tokens
            elapsed = time.monotonic() - step_started
            per_step = (time.monotonic() - started) / (trainer.step - first_step)
            self.store.add_event(
                job.id,
                f"Step {trainer.step}/{plan.total_steps}: training loss={loss.mean:.4f}",
                type="metrics",
                data={
                    "step": trainer.step,
                    "total_steps": plan.total_steps,
                    "train_loss": loss.mean,
                    "learning_rate": learning_rate,
                    "tokens_per_second": step_tokens / elapsed if elapsed > 0 else None,
                },
            )
            self.store.update_job(
                job.id,
                step=trainer.step,
                trained_tokens=trained_tokens,
                estimated_finish=int(time.time() + per_step * (plan.total_steps - trainer.step)),
            )
            if plan.is_checkpoint(trainer.step):
                self._checkpoint(job, live, trainer, validation, loss, trained_tokens)
        self._check_lease(live)
        self._finish(
            job.id,
            "succeeded",
            message="The job has successfully completed",
            fine_tuned_model=job.adapter_id,
            trained_tokens=trained_tokens,
        )
        self.store.clear_states(job.id)

    def _checkpoint(
        self,
        job: JobRecord,
        live: _LiveJob,
        trainer: SpectralTrainer,
        validation: list[TrainingExample],
        loss: LossSum,
        trained_tokens: int,
    ) -> None:
        metrics: dict[str, Any] = {"step": trainer.step, "train_loss": loss.mean, "trained_tokens": trained_tokens}
        if validation:
            total = LossSum(0.0, 0)
            for group in micro_batches(validation, trainer.plan.micro_batch_tokens):
                part = self._engine_step(live, lambda group=group: trainer.evaluate(group))
                total = LossSum(total.total + part.total, total.tokens + part.tokens)
            metrics["valid_loss"] = total.mean
        final = trainer.step == trainer.plan.total_steps
        self._check_lease(live)
        record = self.engine.registry.register(
            job.adapter_id,
            trainer.adapter(),
            source_format="finetune",
            description=f"{'fine-tuned' if final else 'checkpoint'} by {job.id} at step {trainer.step}",
            metadata={"fine_tuning_job": job.id, "step": trainer.step, "metrics": metrics},
        )
        checkpoint = self.store.add_checkpoint(
            job.id,
            step=trainer.step,
            adapter_version=record.version,
            metrics=metrics,
            state=None if final else save(trainer.state_tensors()),
        )
        self.store.add_event(
            job.id,
            f"Checkpoint created at step {trainer.step}: {job.adapter_id}@{record.version}",
            data={"checkpoint": checkpoint.id, "step": trainer.step, "adapter_version": record.version},
        )
        for old in self.store.checkpoints(job.id)[CHECKPOINTS_KEPT:]:
            self._delete_checkpoint(job, old)

    def _delete_checkpoint(self, job: JobRecord, checkpoint: CheckpointRecord) -> None:
        if self.engine.registry.has_version(job.adapter_id, checkpoint.adapter_version):
            self.engine.registry.delete(f"{job.adapter_id}@{checkpoint.adapter_version}")
        self.store.delete_checkpoint(checkpoint.id)

    def _resume(self, job: JobRecord, trainer: SpectralTrainer) -> int:
        """Continue from the last checkpoint with its optimizer state, or from step 0 when there is none."""
        latest = next(iter(self.store.checkpoints(job.id)), None)
        if latest is None:
            self.store.add_event(
                job.id, "The server restarted before the first checkpoint; training restarts from step 0"
            )
            return 0
        if latest.step == trainer.plan.total_steps:
            trainer.step = latest.step
        else:
            try:
                state = self.store.checkpoint_state(latest.id)
            except BlobCorruptError as error:
                raise ResumeError(f"the server restarted during the job and {error}; start a new job") from error
            if state is None:
                raise ResumeError(
                    f"the server restarted during the job and the optimizer state of its checkpoint at step "
                    f"{latest.step} is missing; start a new job"
                )
            trainer.restore(load(state), latest.step)
        self.store.add_event(
            job.id,
            f"The server restarted; training resumed from the checkpoint at step {latest.step} "
            f"on replica {self.replica}",
        )
        return int(latest.metrics.get("trained_tokens", 0))

    # -- endings ----------------------------------------------------------------------------------

    def _cancelled(self, job_id: str) -> JobRecord:
        self._discard_outputs(job_id)
        return self._finish(job_id, "cancelled", message="Fine-tuning job cancelled")

    def _fail(self, job_id: str, code: str, message: str, param: str | None) -> None:
        logger.error("finetune job failed id=%s code=%s message=%s", job_id, code, message)
        self._discard_outputs(job_id)
        self._finish(
            job_id,
            "failed",
            message=f"Fine-tuning job failed: {message}",
            level="error",
            error={"code": code, "message": message, "param": param},
        )

    def _discard_outputs(self, job_id: str) -> None:
        """Remove the job's checkpoint versions and states: a job that does not succeed leaves no adapter."""
        job = self.store.get_job(job_id)
        if job is None:
            return
        for checkpoint in self.store.checkpoints(job_id):
            self._delete_checkpoint(job, checkpoint)
        # A crash between storing a version and recording its checkpoint leaves a version only its metadata names.
        registry = self.engine.registry
        for record in registry.versions(job.adapter_id):
            if record.metadata.get("fine_tuning_job") == job_id:
                registry.delete(f"{record.adapter_id}@{record.version}")
        self.store.clear_states(job_id)

    def _finish(self, job_id: str, status: str, *, message: str, level: str = "info", **fields: Any) -> JobRecord:
        fields.setdefault("estimated_finish", None)
        # The event first: a client that sees the final status has every event already.
        self.store.add_event(job_id, message, level=level)
        job = self.store.update_job(job_id, status=status, finished_at=int(time.time()), **fields)
        logger.info("finetune job finished id=%s status=%s", job_id, status)
        return job
