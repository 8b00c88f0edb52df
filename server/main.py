"""Build the model runner, adapter registry, engine, file store and app from settings, and run uvicorn (or, with
``--replicas``, hand over to the Ray Serve launcher, whose replicas build theirs with ``build_service``).

The composition root: the one module that builds the stores' backends (``adapters_store``'s SQLite classes, and
the PostgreSQL stores for ``--store``); everything else is typed against ``adapters_store.interfaces``
(docs/store.md, "Layers").
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from adapters_store.errors import StoreLockedError, StoreUnavailableError
from adapters_store.files import FileStore
from adapters_store.interfaces import AdapterRepository, FileRepository, JobRepository
from adapters_store.jobs import JobStore
from adapters_store.postgres import PostgresAdapterStore, PostgresChangeFeed
from adapters_store.postgres_files import PostgresFileStore
from adapters_store.postgres_jobs import PostgresJobStore
from adapters_store.store import AdapterStore
from server.api.auth import ExposureError, KeyRing, KeysFileError, check_exposure, key_ring
from server.engine.adapters import AdapterRegistry
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.store_follower import StoreFollower
from server.finetune.jobs import JobManager
from server.logging_setup import configure_logging
from server.models.embedded import DEFAULT_MODEL_NAME, ensure_default_model
from server.settings import ServerSettings
from server.spectral.formats.uploads import read_path

logger = logging.getLogger("server")


def store_startup_adapters(registry: AdapterRegistry, adapters: dict[str, Path], max_bytes: int) -> None:
    """``--adapter NAME=PATH``: stored as a new version unless the latest version already has these bytes."""
    for adapter_id, path in adapters.items():
        parsed = read_path(path, registry.module_shapes, max_bytes)
        latest = registry.latest(adapter_id)
        if (
            latest is not None
            and not latest.broken
            and latest.sha256 == hashlib.sha256(parsed.native_bytes).hexdigest()
        ):
            continue
        registry.register(
            adapter_id,
            parsed.adapter,
            data=parsed.native_bytes,
            source_format=parsed.source_format,
            description=f"from {path}",
        )


def build_adapter_store(settings: ServerSettings) -> AdapterRepository:
    """``--store``'s PostgreSQL database, shared with other replicas; else the embedded store in ``--data-dir``."""
    if settings.store is None:
        return AdapterStore(settings.data_dir / "adapters")
    store = PostgresAdapterStore(settings.store)
    logger.info("adapter store postgresql schema_version=%d", store.schema_version)
    return store


def replica_id() -> str:
    """Who holds a shared store's leases (jobs, garbage collection): unique among replicas on any number of
    hosts, and new at each start (in a container the pid and hostname repeat), so a restarted server never
    mistakes its predecessor's leases for its own."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def build_engine(settings: ServerSettings, replica: str) -> tuple[Engine, StoreFollower | None]:
    """The engine, and for a shared store the follower of its change feed (started with the engine)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    model_path = settings.model or str(ensure_default_model(settings.data_dir))
    runner = ModelRunner(model_path, dtype=settings.dtype, device=settings.device)
    store = build_adapter_store(settings)
    registry = AdapterRegistry(
        runner.bank,
        runner.module_shapes,
        runner.architecture,
        store,
        base_model=served_model_name(settings),
        memory_budget_bytes=settings.adapter_memory,
    )
    follower = None
    if isinstance(store, PostgresAdapterStore):
        follower = StoreFollower(registry, PostgresChangeFeed(store.url), store, replica_id=replica)
    store_startup_adapters(registry, settings.adapters, settings.max_adapter_bytes)
    registry.load_pinned()
    return Engine(runner, registry, settings, served_model_name(settings)), follower


def build_file_store(settings: ServerSettings) -> FileRepository:
    """Training files in ``--store``'s database, else in ``--data-dir``, as the adapters."""
    if settings.store is None:
        return FileStore(settings.data_dir / "files")
    return PostgresFileStore(settings.store)


def build_job_store(settings: ServerSettings) -> JobRepository:
    """Jobs, events and checkpoints (optimizer states included) in ``--store``'s database, else in ``--data-dir``."""
    if settings.store is None:
        return JobStore(settings.data_dir / "finetune" / "jobs.sqlite3")
    return PostgresJobStore(settings.store)


def build_jobs(engine: Engine, files: FileRepository, settings: ServerSettings, replica: str) -> JobManager:
    return JobManager(engine, files, build_job_store(settings), settings, replica=replica)


def torch_threads(requested: int) -> int:
    """One core is left to the event loop, uploads and clients: with every core in torch's pool, its
    spinning threads and the HTTP side take turns and first-token latency doubles (docs/engine.md)."""
    return requested or max(1, (os.cpu_count() or 2) - 1)


def served_model_name(settings: ServerSettings) -> str:
    """The base model's name in /v1/models and responses (the Ray ingress needs it without building a model)."""
    if settings.served_model_name:
        return settings.served_model_name
    return Path(settings.model).name if settings.model else DEFAULT_MODEL_NAME


def checked_keys(settings: ServerSettings) -> KeyRing:
    """The API keys, refusing to start (exit 2) on a bad keys file or an unauthenticated public --host."""
    try:
        keys = key_ring(settings)
        check_exposure(settings, keys)
    except (KeysFileError, ExposureError) as error:
        logger.error("%s", error)
        raise SystemExit(2) from error
    return keys


@dataclass
class Service:
    """One running engine with its file store, job manager and app: a process's, or one Ray replica's."""

    engine: Engine
    follower: StoreFollower | None
    files: FileRepository
    jobs: JobManager
    app: FastAPI

    def stop(self) -> None:
        self.jobs.stop()
        if self.follower is not None:
            self.follower.stop()
        self.engine.stop()
        self.files.close()


def build_service(settings: ServerSettings, keys: KeyRing) -> Service:
    """Build and start everything behind the app; store errors propagate (the caller decides how to fail)."""
    from server.api.app import create_app

    replica = replica_id()
    engine, follower = build_engine(settings, replica)
    files = build_file_store(settings)
    jobs = build_jobs(engine, files, settings, replica)
    engine.start()
    if follower is not None:
        follower.start()
    jobs.start()
    return Service(engine, follower, files, jobs, create_app(engine, settings, files=files, jobs=jobs, keys=keys))


def serve(settings: ServerSettings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    keys = checked_keys(settings)
    if settings.replicas is not None:
        from server.cluster.launcher import serve_replicas

        serve_replicas(settings)
        return
    torch.set_num_threads(torch_threads(settings.torch_threads))
    logger.info("torch intra-op threads=%d", torch.get_num_threads())
    try:
        service = build_service(settings, keys)
    except StoreLockedError as error:
        logger.error("%s; stop it or use another --data-dir", error)
        raise SystemExit(1) from error
    except StoreUnavailableError as error:
        logger.error("%s; check --store", error)
        raise SystemExit(1) from error
    logger.info("serving model=%s on http://%s:%d", service.engine.model_name, settings.host, settings.port)
    try:
        # log_config=None: uvicorn keeps the handler configure_logging installed instead of its own.
        uvicorn.run(service.app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None)
    finally:
        service.stop()
