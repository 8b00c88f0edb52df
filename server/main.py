"""Build the model runner, adapter registry, engine and app from settings, and run uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from adapters_store import native
from adapters_store.peft_format import CONFIG_NAME, from_peft_dir
from server.engine.adapters import AdapterRegistry
from server.engine.engine import Engine, EngineLimits
from server.engine.model_runner import ModelRunner
from server.models.embedded import DEFAULT_MODEL_NAME, ensure_default_model
from server.settings import ServerSettings
from server.spectral.adapter import SpectralAdapter

logger = logging.getLogger("server")


def read_adapter_path(path: Path, module_shapes: dict[str, tuple[int, int]]) -> SpectralAdapter:
    """A PEFT FourierFT directory or a native ``.safetensors`` file."""
    if path.is_dir() or path.name == CONFIG_NAME:
        return from_peft_dir(path if path.is_dir() else path.parent, module_shapes)
    return native.from_bytes(path.read_bytes())


def build_engine(settings: ServerSettings) -> Engine:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    model_path = settings.model or str(ensure_default_model(settings.data_dir))
    runner = ModelRunner(model_path, dtype=settings.dtype, device=settings.device)
    registry = AdapterRegistry(runner.bank, runner.module_shapes, runner.architecture)
    for adapter_id, path in settings.adapters.items():
        registry.register(adapter_id, read_adapter_path(path, runner.module_shapes))
    limits = EngineLimits(
        max_batch_size=settings.max_batch_size,
        max_input_tokens=settings.max_input_tokens,
        max_total_tokens=settings.max_total_tokens,
        max_queue=settings.max_queue,
        max_new_tokens_default=settings.max_new_tokens_default,
        prefill_token_budget=settings.prefill_token_budget,
    )
    name = settings.served_model_name or (Path(model_path).name if settings.model else DEFAULT_MODEL_NAME)
    return Engine(runner, registry, limits, name)


def serve(settings: ServerSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    engine = build_engine(settings)
    engine.start()
    logger.info("serving model=%s on http://%s:%d", engine.model_name, settings.host, settings.port)
    try:
        from server.api.app import create_app

        uvicorn.run(create_app(engine), host=settings.host, port=settings.port, log_level=settings.log_level)
    finally:
        engine.stop()
