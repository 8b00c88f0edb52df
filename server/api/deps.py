"""FastAPI dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapters_store.files import FileStore
from server.engine.engine import Engine
from server.finetune.jobs import JobManager
from server.settings import ServerSettings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_files(request: Request) -> FileStore:
    return request.app.state.files


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
FilesDep = Annotated[FileStore, Depends(get_files)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
