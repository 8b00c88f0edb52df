"""The FastAPI application around one engine."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from server.api.deps import get_engine
from server.api.errors import install_error_handlers
from server.api.routes import generate, health, openai
from server.engine.engine import Engine

__all__ = ["create_app", "get_engine"]


def _version() -> str:
    try:
        return version("spectra-serve")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def create_app(engine: Engine) -> FastAPI:
    """Routes for TGI/LoRAX (``/generate``...), OpenAI (``/v1/...``), ``/health`` and ``/info``.

    The caller owns the engine's lifecycle (start before serving, stop after).
    """
    app = FastAPI(
        title="Spectra",
        version=_version(),
        description="One frozen causal LM serving many spectral (FourierFT / sDCTFT) adapters in one batch.",
    )
    app.state.engine = engine
    # /v1/models needs a "created" time; the adapters' own times are not tracked, so the server start stands in.
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    return app
