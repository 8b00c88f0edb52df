"""FastAPI dependencies: the app's parts, the caller, and scope checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from adapters_store.interfaces import AdapterCatalog, FileRepository
from server.api.auth import ANONYMOUS, Principal, Scope
from server.engine.engine import Engine
from server.engine.types import EngineError
from server.finetune.jobs import JobManager
from server.settings import ServerSettings


class PermissionDeniedError(EngineError):
    status_code = 403
    error_type = "permission_error"


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_adapter_index(request: Request) -> AdapterCatalog:
    """The adapter catalogue that routes resolve and check visibility against."""
    return request.app.state.adapter_index


def get_files(request: Request) -> FileRepository:
    return request.app.state.files


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


def get_principal(request: Request) -> Principal:
    """Set by :class:`server.api.access.AccessMiddleware`; absent only when an app is built without it."""
    return getattr(request.state, "principal", ANONYMOUS)


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
AdapterIndexDep = Annotated[AdapterCatalog, Depends(get_adapter_index)]
FilesDep = Annotated[FileRepository, Depends(get_files)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_scope(scope: Scope) -> Callable[[Principal], None]:
    def check(principal: PrincipalDep) -> None:
        if not principal.has(scope):
            raise PermissionDeniedError(f"the API key {principal.name!r} lacks the {scope!r} scope this route needs")

    return check


def requires(scope: Scope) -> list:
    """``dependencies=requires("inference")`` on a route or router."""
    return [Depends(require_scope(scope))]
