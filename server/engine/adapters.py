"""Servable adapters by id, and leases that keep a version resident while requests use it.

A request resolves its adapter ids once, at submit, to leases on specific versions; replacing
or deleting an id later never changes what an in-flight request runs. A version's bank slot is
loaded lazily by the engine thread (first use) and unloaded when it is both replaced and no
longer leased.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from adapters_store.validation import validate_adapter
from server.engine.types import UnknownAdapterError
from server.spectral.adapter import SpectralAdapter
from server.spectral.bank import AdapterBank

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class AdapterVersion:
    adapter_id: str
    adapter: SpectralAdapter
    slot: int | None = None
    leases: int = 0
    retired: bool = False
    extra: dict = field(default_factory=dict)


class AdapterLease:
    """One request's hold on one adapter version."""

    def __init__(self, registry: AdapterRegistry, version: AdapterVersion):
        self._registry = registry
        self.version = version
        self._released = False

    def slot(self) -> int:
        """The version's bank slot, loading it on first use (engine thread only)."""
        return self._registry.ensure_loaded(self.version)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry.release(self.version)


class AdapterRegistry:
    def __init__(self, bank: AdapterBank, module_shapes: dict[str, tuple[int, int]], architecture: str | None):
        self.bank = bank
        self.module_shapes = module_shapes
        self.architecture = architecture
        self._lock = threading.Lock()
        self._current: dict[str, AdapterVersion] = {}

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    def resident_count(self) -> int:
        return self.bank.resident_slots

    def register(self, adapter_id: str, adapter: SpectralAdapter) -> None:
        """Validate against the served model and make ``adapter`` what ``adapter_id`` means from now on."""
        validate_adapter(adapter, self.module_shapes, base_architecture=self.architecture)
        with self._lock:
            previous = self._current.get(adapter_id)
            self._current[adapter_id] = AdapterVersion(adapter_id, adapter)
        if previous is not None:
            self._retire(previous)
        logger.info("adapter registered id=%s method=%s params=%d", adapter_id, adapter.method, adapter.n_params)

    def unregister(self, adapter_id: str) -> bool:
        with self._lock:
            previous = self._current.pop(adapter_id, None)
        if previous is not None:
            self._retire(previous)
        return previous is not None

    def lease(self, adapter_id: str) -> AdapterLease:
        with self._lock:
            version = self._current.get(adapter_id)
            if version is None:
                raise UnknownAdapterError(f"adapter {adapter_id!r} not found", param="adapter_id")
            version.leases += 1
        return AdapterLease(self, version)

    def ensure_loaded(self, version: AdapterVersion) -> int:
        with self._lock:
            if version.slot is None:
                version.slot = self.bank.load(version.adapter)
                logger.info("adapter loaded id=%s slot=%d", version.adapter_id, version.slot)
            return version.slot

    def release(self, version: AdapterVersion) -> None:
        with self._lock:
            version.leases -= 1
            unload = version.retired and version.leases == 0 and version.slot is not None
        if unload:
            self._unload(version)

    def _retire(self, version: AdapterVersion) -> None:
        with self._lock:
            version.retired = True
            unload = version.leases == 0 and version.slot is not None
        if unload:
            self._unload(version)

    def _unload(self, version: AdapterVersion) -> None:
        slot, version.slot = version.slot, None
        if slot is not None:
            self.bank.unload(slot)
