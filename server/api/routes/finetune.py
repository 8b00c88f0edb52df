"""Fine-tuning jobs over HTTP, in OpenAI's shape (``/v1/fine_tuning/jobs``).

The job manager's calls touch SQLite (and cancel waits for the job thread to stop), so each
runs in the threadpool, never on the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from adapters_store.records import JobRecord
from server.api.auth import Principal
from server.api.deps import FilesDep, JobsDep, PrincipalDep
from server.api.schemas.common import ErrorResponse
from server.api.schemas.finetune import (
    CheckpointMetrics,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    JobError,
    JobHyperparameters,
    JobSupervised,
    MethodObject,
)
from server.api.tenancy import visible_file, visible_job
from server.finetune.hyperparameters import BASE_LEARNING_RATE
from server.finetune.jobs import JobManager, JobNotFoundError

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        404: "No such job or file.",
        409: "The job already finished (cancel), or a file is broken.",
        422: "Invalid settings: the model, a file's purpose, target modules, n_frequency, or a field's range.",
    }.items()
}
Limit = Annotated[int, Query(ge=1, le=1000)]


def _hyperparameters(job: JobRecord) -> JobHyperparameters:
    plan = job.hyperparameters
    if plan is None:
        return JobHyperparameters(**job.request["hyperparameters"])
    return JobHyperparameters(
        n_epochs=plan["n_epochs"],
        batch_size=plan["batch_size"],
        learning_rate_multiplier=plan["learning_rate"] / BASE_LEARNING_RATE,
    )


def job_object(job: JobRecord) -> FineTuningJob:
    hyperparameters = _hyperparameters(job)
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        model=job.model,
        status=job.status,
        training_file=job.training_file,
        validation_file=job.validation_file,
        hyperparameters=hyperparameters,
        method=MethodObject(supervised=JobSupervised(hyperparameters=hyperparameters)),
        seed=job.seed,
        user_provided_suffix=job.suffix,
        fine_tuned_model=job.fine_tuned_model,
        trained_tokens=job.trained_tokens,
        error=JobError(**job.error) if job.error else None,
        started_at=job.started_at,
        finished_at=job.finished_at,
        estimated_finish=job.estimated_finish,
        metadata=job.request.get("metadata"),
        adapter=job.adapter or {},
        adapter_id=job.adapter_id,
        step=job.step,
        total_steps=job.hyperparameters["total_steps"] if job.hyperparameters else None,
        # A finished job has no trainer; its lease row is released only just after the final status is stored.
        replica=None if job.terminal else job.owner,
    )


def _visible_job(jobs: JobManager, principal: Principal, job_id: str) -> JobRecord:
    return visible_job(principal, jobs.get(job_id))


@router.post("", response_model=FineTuningJob, responses=_ERRORS)
async def create_job(
    body: FineTuningJobCreate, jobs: JobsDep, files: FilesDep, principal: PrincipalDep
) -> FineTuningJob:
    for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
        if file_id is not None:
            await run_in_threadpool(visible_file, principal, files, file_id, param=param)
    job = await run_in_threadpool(
        lambda: jobs.create(
            model=body.model,
            training_file=body.training_file,
            validation_file=body.validation_file,
            suffix=body.suffix,
            seed=body.seed,
            hyperparameters=body.resolved_hyperparameters().model_dump(),
            adapter=body.adapter.model_dump(exclude_none=True),
            metadata=body.metadata,
            namespace=principal.namespace,
        )
    )
    return job_object(job)


@router.get("", response_model=FineTuningJobList, responses=_ERRORS)
async def list_jobs(
    jobs: JobsDep, principal: PrincipalDep, after: str | None = None, limit: Limit = 20
) -> FineTuningJobList:
    if after is not None:
        cursor = await run_in_threadpool(jobs.store.get_job, after)
        if cursor is None or not principal.can_see(cursor.namespace, public=False):
            raise JobNotFoundError(f"no job {after!r} to list after", param="after")
    page = await run_in_threadpool(jobs.list, after=after, limit=limit + 1, visible_to=principal.visible_namespace)
    return FineTuningJobList(data=[job_object(job) for job in page[:limit]], has_more=len(page) > limit)


@router.get("/{job_id}", response_model=FineTuningJob, responses=_ERRORS)
async def get_job(job_id: str, jobs: JobsDep, principal: PrincipalDep) -> FineTuningJob:
    return job_object(await run_in_threadpool(_visible_job, jobs, principal, job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=_ERRORS)
async def cancel_job(job_id: str, jobs: JobsDep, principal: PrincipalDep) -> FineTuningJob:
    await run_in_threadpool(_visible_job, jobs, principal, job_id)
    return job_object(await run_in_threadpool(jobs.cancel, job_id))


@router.get("/{job_id}/events", response_model=FineTuningJobEventList, responses=_ERRORS)
async def list_events(
    job_id: str, jobs: JobsDep, principal: PrincipalDep, after: str | None = None, limit: Limit = 20
) -> FineTuningJobEventList:
    await run_in_threadpool(_visible_job, jobs, principal, job_id)
    page = await run_in_threadpool(jobs.events, job_id, after=after, limit=limit + 1)
    return FineTuningJobEventList(
        data=[
            FineTuningJobEvent(
                id=event.id,
                created_at=event.created_at,
                level=event.level,  # type: ignore[arg-type]
                message=event.message,
                type=event.type,  # type: ignore[arg-type]
                data=event.data,
            )
            for event in page[:limit]
        ],
        has_more=len(page) > limit,
    )


@router.get("/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList, responses=_ERRORS)
async def list_checkpoints(
    job_id: str, jobs: JobsDep, principal: PrincipalDep, after: str | None = None, limit: Limit = 10
) -> FineTuningJobCheckpointList:
    job = await run_in_threadpool(_visible_job, jobs, principal, job_id)
    checkpoints = await run_in_threadpool(jobs.checkpoints, job_id)
    if after is not None:
        ids = [checkpoint.id for checkpoint in checkpoints]
        if after not in ids:
            raise JobNotFoundError(f"no checkpoint {after!r} of job {job_id} to list after", param="after")
        checkpoints = checkpoints[ids.index(after) + 1 :]
    page = [
        FineTuningJobCheckpoint(
            id=checkpoint.id,
            created_at=checkpoint.created_at,
            fine_tuned_model_checkpoint=f"{job.adapter_id}@{checkpoint.adapter_version}",
            fine_tuning_job_id=job.id,
            metrics=CheckpointMetrics(**checkpoint.metrics),
            step_number=checkpoint.step,
        )
        for checkpoint in checkpoints[:limit]
    ]
    return FineTuningJobCheckpointList(
        data=page,
        has_more=len(checkpoints) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
