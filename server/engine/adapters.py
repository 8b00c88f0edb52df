"""Servable adapters: the durable store behind them, leases on versions, and bank residency.

The store (``adapters_store``) is the truth for which ids and versions exist. A request
resolves each adapter reference (``id`` = latest, ``id@N`` = version N) once, at submit, to a
lease on one immutable version; replacing or deleting the id later never changes what an
in-flight request runs.

Residency: a version's coefficients enter the bank on first use (or at upload when pinned)
and stay while they fit in ``memory_budget_bytes``; to make room the least recently used
versions that are neither leased nor pinned are unloaded. Admission keeps the bytes of leased
and pinned versions within the budget, so a load never has to evict a version in use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from adapters_store.errors import BlobCorruptError
from adapters_store.ids import InvalidAdapterIdError, parse_ref, validate_adapter_id
from adapters_store.interfaces import AdapterRepository
from adapters_store.records import AdapterChange, AdapterRecord
from server import metrics
from server.engine.types import EngineError, UnknownAdapterError
from server.spectral.adapter import SpectralAdapter
from server.spectral.bank import AdapterBank
from server.spectral.formats import native
from server.spectral.formats.validation import validate_adapter

logger = logging.getLogger(__name__)

COEFFICIENT_BYTES = 4  # the bank keeps coefficients in fp32 whatever the file's dtype


class AdapterBrokenError(EngineError):
    status_code = 409
    error_type = "adapter_broken_error"


class AdapterMemoryFullError(EngineError):
    """More distinct adapters are in use (leased or pinned) than ``--adapter-memory`` holds."""

    status_code = 429
    error_type = "overloaded_error"
    retry_after_seconds = 1


class InvalidAdapterRefError(EngineError):
    status_code = 422


def resident_cost(adapter: SpectralAdapter) -> int:
    """Bank bytes charged to one resident adapter: its coefficients in fp32 (location sets are shared)."""
    return COEFFICIENT_BYTES * adapter.n_params


@dataclass(eq=False)
class AdapterVersion:
    """``adapter`` is the parsed file, kept only until its slot is loaded: the bank has what serving needs,
    and parsed locations (int64 rows and cols) would otherwise cost several times the coefficients."""

    adapter_id: str
    version: int
    adapter: SpectralAdapter | None
    cost: int
    slot: int | None = None
    leases: int = 0
    pinned: bool = False
    deleted: bool = False
    read_seconds: float = 0.0  # reading and parsing the stored file, counted in the load latency

    @property
    def key(self) -> tuple[str, int]:
        return (self.adapter_id, self.version)

    @property
    def held(self) -> bool:
        return self.leases > 0 or self.pinned


class AdapterLease:
    """One request's hold on one adapter version."""

    def __init__(self, registry: AdapterRegistry, version: AdapterVersion):
        self._registry = registry
        self.version = version
        self._released = False

    def slot(self) -> int:
        """The version's bank slot, loading it on first use (engine thread, or an upload that pins)."""
        return self._registry.ensure_loaded(self.version)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry.release(self.version)


class AdapterRegistry:
    def __init__(
        self,
        bank: AdapterBank,
        module_shapes: dict[str, tuple[int, int]],
        architecture: str | None,
        store: AdapterRepository,
        *,
        base_model: str,
        memory_budget_bytes: int = 3 << 30,
    ):
        self.bank = bank
        self.module_shapes = module_shapes
        self.architecture = architecture
        self.store = store
        self.base_model = base_model
        self.memory_budget_bytes = memory_budget_bytes
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._versions: dict[tuple[str, int], AdapterVersion] = {}
        self._resident: OrderedDict[tuple[str, int], AdapterVersion] = OrderedDict()
        self._resident_bytes = 0
        self._held_bytes = 0
        self.loads = 0
        self.evictions = 0

    # -- catalogue ---------------------------------------------------------------------------

    def ids(self, visible_to: str | None = None) -> list[str]:
        """Every servable id (its latest version is not broken) that namespace ``visible_to`` may see, in id order."""
        return self.store.index.latest_ids(visible_to=visible_to)

    def latest(self, adapter_id: str) -> AdapterRecord | None:
        return self.store.index.get(adapter_id)

    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        return self.store.index.versions(adapter_id)

    def has_version(self, adapter_id: str, version: int) -> bool:
        return self.store.index.get(adapter_id, version) is not None

    def count(self) -> int:
        return self.store.index.count_ids()

    def resident_count(self) -> int:
        return len(self._resident)

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def register(
        self,
        adapter_id: str,
        adapter: SpectralAdapter,
        *,
        data: bytes | None = None,
        source_format: str = "native",
        description: str = "",
        metadata: dict[str, Any] | None = None,
        pin: bool = False,
        public: bool = False,
    ) -> AdapterRecord:
        """Validate ``adapter`` against the served model and store it as the next version of ``adapter_id``.

        ``data`` is the native file to keep (the uploaded bytes); without it the adapter is serialised.
        Servable by the next request once this returns.
        """
        validate_adapter_id(adapter_id)
        validate_adapter(adapter, self.module_shapes, base_architecture=self.architecture)
        cost = resident_cost(adapter)
        if pin:
            self._reserve_pin(cost)
        try:
            record = self.store.put(
                adapter_id,
                data if data is not None else native.to_bytes(adapter),
                method=adapter.method,
                n_params=adapter.n_params,
                source_format=source_format,
                base_model=self.base_model,
                description=description,
                metadata=metadata,
                pinned=pin,
                public=public,
            )
        except BaseException:
            if pin:
                with self._lock:
                    self._held_bytes -= cost
            raise
        logger.info(
            "adapter stored id=%s version=%d method=%s params=%d bytes=%d pinned=%s",
            record.adapter_id,
            record.version,
            record.method,
            record.n_params,
            record.size_bytes,
            pin,
        )
        if pin:
            version = AdapterVersion(record.adapter_id, record.version, adapter, cost, pinned=True)
            with self._lock:
                followed = self._versions.setdefault(version.key, version)
                if followed is not version:
                    # The change feed saw the commit first and pinned the stored copy, counting its cost.
                    self._held_bytes -= cost
                    version = followed
            self.ensure_loaded(version)
        return record

    def _reserve_pin(self, cost: int) -> None:
        """Count a pin against the budget before it is stored, so a refused pin leaves nothing behind."""
        with self._lock:
            if self._held_bytes + cost > self.memory_budget_bytes:
                raise AdapterMemoryFullError(
                    f"pinning needs {cost} bytes of adapter memory; {self._held_bytes} of "
                    f"{self.memory_budget_bytes} are held by pinned adapters or adapters in use: "
                    "unpin (delete) some, or raise --adapter-memory"
                )
            self._held_bytes += cost

    def load_pinned(self) -> int:
        """At start: make every pinned, intact version resident again; returns how many were loaded."""
        return sum(self._pin_stored(record) for record in self.store.index.pinned_records() if not record.broken)

    def delete(self, ref: str) -> list[AdapterRecord]:
        """Delete ``id`` (all versions) or ``id@N``; in-flight requests finish on what they leased."""
        parsed = self._parse(ref)
        deleted = self.store.delete(parsed.adapter_id, parsed.version)
        self._retire([(record.adapter_id, record.version) for record in deleted])
        return deleted

    def _retire(self, keys: list[tuple[str, int]]) -> None:
        """Stop holding these versions: unpinned now, forgotten (and unloaded) once no request leases them."""
        retired = []
        with self._lock:
            for key in keys:
                version = self._versions.get(key)
                if version is None:
                    continue
                version.deleted = True
                if version.pinned:
                    version.pinned = False
                    if not version.leases:
                        self._held_bytes -= version.cost
                if not version.held:
                    retired.append(self._forget_locked(version))
        self._unload_slots(retired)

    # -- other replicas' changes (docs/store.md, "Change feed") --------------------------------

    def follow(self, change: AdapterChange) -> None:
        """Bring this replica's copy of a version in line with a committed change, whoever made it (a
        replica's own changes come back too, and find nothing left to do).

        A deleted or broken version is retired (requests holding it finish on it); a pinned version, or one
        whose broken mark was cleared, is pinned here too. Anything else needs nothing: leases resolve ids
        through the store, so a new version is servable here as soon as it is committed.
        """
        key = (change.adapter_id, change.version)
        record = None if change.kind == "delete" else self.store.index.get(*key)
        if record is None or record.broken:
            self._retire([key])
        elif record.pinned:
            self._pin_stored(record)

    def resynchronise(self) -> None:
        """After changes were missed (pruned from the feed): check every version held here against the
        catalog, and pin what is pinned there."""
        with self._lock:
            keys = list(self._versions)
        gone = []
        for key in keys:
            record = self.store.index.get(*key)
            if record is None or record.broken:
                gone.append(key)
        self._retire(gone)
        self.load_pinned()

    def _pin_stored(self, record: AdapterRecord) -> bool:
        try:
            self.ensure_loaded(self._hold(record, None, pin=True))
        except EngineError as error:
            logger.error("pinned adapter not loaded id=%s version=%d: %s", record.adapter_id, record.version, error)
            return False
        return True

    # -- leases ------------------------------------------------------------------------------

    def lease(self, ref: str) -> AdapterLease:
        parsed = self._parse(ref)
        record = self.store.index.get(parsed.adapter_id, parsed.version)
        if record is None:
            raise UnknownAdapterError(f"adapter {ref!r} not found", param="adapter_id")
        if record.broken:
            raise AdapterBrokenError(
                f"adapter {record.adapter_id}@{record.version} is broken ({record.broken}); upload it again",
                param="adapter_id",
            )
        return AdapterLease(self, self._hold(record, None, pin=False))

    def _hold(self, record: AdapterRecord, adapter: SpectralAdapter | None, *, pin: bool) -> AdapterVersion:
        key = (record.adapter_id, record.version)
        with self._lock:
            version = self._versions.get(key)
            if version is not None and self._take_locked(version, pin):
                return version
        if version is None:
            started = time.perf_counter()
            parsed = adapter or self._read(record)
            version = AdapterVersion(record.adapter_id, record.version, parsed, resident_cost(parsed))
            version.read_seconds = time.perf_counter() - started
        with self._lock:
            version = self._versions.setdefault(key, version)
            if not self._take_locked(version, pin):
                self._forget_if_idle_locked(version)
                raise AdapterMemoryFullError(
                    f"adapter memory is full: {self._held_bytes} of {self.memory_budget_bytes} bytes are held by "
                    f"adapters in use or pinned; retry later, or raise --adapter-memory"
                )
            return version

    def _take_locked(self, version: AdapterVersion, pin: bool) -> bool:
        """Add a lease (or the pin) to ``version`` if the held bytes stay within the budget."""
        if not version.held and self._held_bytes + version.cost > self.memory_budget_bytes:
            return False
        if not version.held:
            self._held_bytes += version.cost
        if pin:
            version.pinned = True
        else:
            version.leases += 1
        return True

    def read_bytes(self, record: AdapterRecord) -> bytes:
        """The stored file of ``record``, checked against its sha256; a failed check marks it broken."""
        try:
            return self.store.read(record)
        except (BlobCorruptError, FileNotFoundError) as error:
            reason = str(error) if isinstance(error, BlobCorruptError) else f"blob {record.sha256} is missing"
            self.store.index.mark_broken(record.adapter_id, record.version, reason)
            logger.error("adapter broken id=%s version=%d reason=%s", record.adapter_id, record.version, reason)
            raise AdapterBrokenError(
                f"adapter {record.adapter_id}@{record.version} is broken ({reason}); upload it again",
                param="adapter_id",
            ) from error

    def _read(self, record: AdapterRecord) -> SpectralAdapter:
        return native.from_bytes(self.read_bytes(record))

    def release(self, version: AdapterVersion) -> None:
        retired = []
        with self._lock:
            version.leases -= 1
            if not version.held:
                self._held_bytes -= version.cost
                if version.deleted:
                    retired.append(self._forget_locked(version))
                else:
                    self._forget_if_idle_locked(version)
        self._unload_slots(retired)

    # -- residency ---------------------------------------------------------------------------

    def ensure_loaded(self, version: AdapterVersion) -> int:
        with self._load_lock:
            with self._lock:
                if version.slot is not None:
                    self._resident.move_to_end(version.key)
                    return version.slot
                victims = self._evict_for_locked(version.cost)
            self._unload_slots(victims)
            assert version.adapter is not None, "a version without a slot keeps its parsed adapter"
            started = time.perf_counter()
            slot = self.bank.load(version.adapter)
            metrics.ADAPTER_LOAD_SECONDS.observe(version.read_seconds + time.perf_counter() - started)
            metrics.ADAPTER_LOADS.inc()
            with self._lock:
                version.slot = slot
                version.adapter = None
                self._resident[version.key] = version
                self._resident_bytes += version.cost
                self.loads += 1
                deleted_meanwhile = version.deleted and not version.held
                if deleted_meanwhile:
                    self._forget_locked(version)
            if deleted_meanwhile:
                self.bank.unload(slot)
        logger.info("adapter loaded id=%s version=%d slot=%d", version.adapter_id, version.version, slot)
        return slot

    def _evict_for_locked(self, cost: int) -> list[int]:
        victims = []
        for version in list(self._resident.values()):
            if self._resident_bytes + cost <= self.memory_budget_bytes:
                break
            if not version.held:
                victims.append(self._forget_locked(version))
                self.evictions += 1
                metrics.ADAPTER_EVICTIONS.inc()
                logger.info("adapter evicted id=%s version=%d", version.adapter_id, version.version)
        return victims

    def _forget_if_idle_locked(self, version: AdapterVersion) -> None:
        """Drop the parsed copy of a version that is neither leased, pinned nor resident."""
        if not version.held and version.slot is None:
            self._versions.pop(version.key, None)

    def _forget_locked(self, version: AdapterVersion) -> int | None:
        """Remove ``version`` from the registry; returns the slot the caller must unload (outside the lock)."""
        self._versions.pop(version.key, None)
        slot, version.slot = version.slot, None
        if slot is not None:
            del self._resident[version.key]
            self._resident_bytes -= version.cost
        return slot

    def _unload_slots(self, slots: list[int | None]) -> None:
        for slot in slots:
            if slot is not None:
                self.bank.unload(slot)

    @staticmethod
    def _parse(ref: str):
        try:
            return parse_ref(ref)
        except InvalidAdapterIdError as error:
            raise InvalidAdapterRefError(str(error), param="adapter_id") from error
