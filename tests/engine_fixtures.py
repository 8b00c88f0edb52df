"""Build an in-process engine on a tiny model with random spectral adapters."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters_store.interfaces import AdapterRepository
from adapters_store.store import AdapterStore
from server.engine.adapters import AdapterRegistry
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner
from server.settings import ServerSettings
from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.fourierft import peft_locations


def random_adapter(
    shapes: dict[str, tuple[int, int]], seed: int, *, method: str = "fourierft", n: int = 200, scaling: float = 300.0
) -> SpectralAdapter:
    """A FourierFT-style adapter on the q and v projections with coefficients ~ N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in shapes.items():
        if not name.endswith(("q_proj", "v_proj", "c_attn")):
            continue
        count = min(n, shape[0] * shape[1])
        rows, cols = peft_locations(seed, shape, count)
        modules[name] = ModuleSpectrum(torch.randn(count, generator=generator), rows, cols, shape, scaling)
    return SpectralAdapter(method, modules, norm="ortho", seed=seed if method == "fourierft" else None)  # type: ignore[arg-type]


def registry_for(runner: ModelRunner, store: AdapterRepository, memory_budget_bytes: int) -> AdapterRegistry:
    """The registry of ``runner``'s bank over ``store``, for a model served as "tiny"."""
    return AdapterRegistry(
        runner.bank,
        runner.module_shapes,
        runner.architecture,
        store,
        base_model="tiny",
        memory_budget_bytes=memory_budget_bytes,
    )


def make_engine(model_dir: Path, store_dir: Path, *, adapter_memory: int = 1 << 30, **settings: float) -> Engine:
    runner = ModelRunner(model_dir, dtype="float32", device="cpu")
    registry = registry_for(runner, AdapterStore(store_dir), adapter_memory)
    return Engine(runner, registry, ServerSettings(**settings), "tiny")
