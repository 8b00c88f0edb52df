"""Liveness and server information."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import EngineDep, JobsDep
from server.api.errors import error_response
from server.api.schemas.common import ErrorResponse, HealthResponse, InfoResponse

router = APIRouter(tags=["Health"])


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse, "description": "The engine is not ready."}},
)
async def health(engine: EngineDep) -> HealthResponse | JSONResponse:
    if not engine.is_ready():
        return error_response("the engine is not ready", 503)
    return HealthResponse()


@router.get("/info", response_model=InfoResponse)
async def info(engine: EngineDep, jobs: JobsDep) -> dict:
    return {
        **engine.info(),
        "fine_tuning": {
            "jobs": jobs.status_counts(),
            "training_state_bytes": jobs.training_bytes(),
            "replica": jobs.replica,
        },
    }
