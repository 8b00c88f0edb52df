"""The FastAPI application around one engine."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from adapters_store.interfaces import FileRepository
from server import metrics
from server.api.access import AccessMiddleware
from server.api.auth import ADMIN, KeyRing, key_ring
from server.api.body_limit import BodySizeLimitMiddleware
from server.api.deps import get_engine, requires
from server.api.errors import install_error_handlers
from server.api.http_metrics import HTTPMetricsMiddleware
from server.api.openapi import install_openapi
from server.api.request_id import RequestIdMiddleware
from server.api.routes import adapters, finetune, generate, health, openai, tokenize, vllm
from server.api.routes import files as file_routes
from server.api.routes import metrics as metrics_routes
from server.engine.engine import Engine
from server.finetune.jobs import JobManager
from server.settings import ServerSettings

# Generation and JSON bodies get --max-request-bytes; uploads get their file limit (two files for adapters)
# plus room for multipart framing.
MULTIPART_SLACK = 1 << 20

__all__ = ["create_app", "get_engine"]


def _version() -> str:
    try:
        return version("spectra-serve")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def create_app(
    engine: Engine,
    settings: ServerSettings | None = None,
    *,
    files: FileRepository,
    jobs: JobManager,
    keys: KeyRing | None = None,
) -> FastAPI:
    """Routes for TGI/LoRAX (``/generate``...), OpenAI (``/v1/...``), ``/tokenize``, ``/health`` and ``/info``.

    The caller owns the lifecycles of the engine, the file store and the job manager. ``keys``
    defaults to the keys the settings name; with none the server is open (``docs/security.md``).
    """
    app = FastAPI(
        title="Spectra",
        version=_version(),
        description="One frozen causal LM serving many spectral (FourierFT / sDCTFT) adapters in one batch.",
    )
    settings = settings or ServerSettings()
    keys = keys if keys is not None else key_ring(settings)
    app.state.engine = engine
    app.state.settings = settings
    app.state.adapter_index = engine.registry.store.index
    app.state.files = files
    app.state.jobs = jobs
    # /v1/models needs a "created" time; the adapters' own times are not tracked, so the server start stands in.
    app.state.created = int(time.time())
    limits_by_path = {
        "/v1/adapters": 2 * settings.max_adapter_bytes + MULTIPART_SLACK,
        "/v1/files": settings.max_training_file_bytes + MULTIPART_SLACK,
    }
    # Added before the error handlers so the catch-all middleware wraps it.
    app.add_middleware(
        BodySizeLimitMiddleware,
        default_limit=settings.max_request_bytes,
        limits_by_path=limits_by_path,
        default_flag="--max-request-bytes",
        flags_by_path={"/v1/adapters": "--max-adapter-bytes", "/v1/files": "--max-training-file-bytes"},
    )
    # Inside the catch-all and outside the body limit: a caller without a valid key gets no body read.
    endpoint_auth = {"/health": settings.health_auth, "/metrics": settings.metrics_auth}
    open_paths = frozenset(path for path, auth in endpoint_auth.items() if auth == "open")
    app.add_middleware(AccessMiddleware, keys=keys, open_paths=open_paths)
    install_error_handlers(app)
    # Outside the catch-all, so requests it turns into 500s are counted too.
    app.add_middleware(HTTPMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # last added, outermost: every response carries X-Request-Id
    metrics.SERVER_STATE.bind(engine, jobs)
    metrics.ADAPTER_LABELS.limit = settings.metrics_adapter_labels
    app.include_router(health.router)
    app.include_router(metrics_routes.router, dependencies=[] if settings.metrics_auth == "open" else requires(ADMIN))
    app.include_router(generate.router, dependencies=requires("inference"))
    app.include_router(openai.router, dependencies=requires("inference"))
    app.include_router(tokenize.router, dependencies=requires("inference"))
    app.include_router(adapters.router)
    app.include_router(file_routes.router, dependencies=requires("finetune"))
    app.include_router(finetune.router, dependencies=requires("finetune"))
    app.include_router(vllm.router, dependencies=requires("adapters:write"))
    install_openapi(app)
    return app
