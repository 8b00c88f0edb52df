"""Adapter bank: per-layer device tables that the routed layers gather from.

Every resident adapter owns one *slot* (an integer, shared by all layers; slot 0 is "no
adapter"). Per layer the bank keeps

- ``slot_coef[S, n_cap]``, ``slot_scale[S]``, ``slot_locset[S]``: the slot's coefficients,
  scaling and the id of its location set in this layer (0 = not adapted here);
- ``locset_in/out/factor/coef[L, E_cap]``: location sets compiled to spectral entries
  (see :mod:`server.spectral.entries`), deduplicated: every FourierFT adapter with the same
  seed, shape and ``n`` shares one, so 10,000 such adapters cost 10,000 coefficient rows
  and one location set per layer shape.

Loading or unloading a slot writes that adapter's rows only (time proportional to its
size); capacities grow by doubling, so growth is amortised. All mutation happens under
``lock``, which the engine also holds for the duration of one forward: a load waits for at
most one forward and a forward never sees a half-written slot.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from server.spectral.adapter import Method, SpectralAdapter
from server.spectral.entries import SpectralEntries, compile_entries
from server.spectral.routing import Routing, TrainableSpectrum, build_routing, build_row_routing

NO_ADAPTER = 0


def _grown(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] >= size:
        return tensor
    new_size = max(size, 2 * tensor.shape[dim])
    shape = list(tensor.shape)
    shape[dim] = new_size
    grown = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    grown.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return grown


@dataclass
class _LocationSet:
    id: int
    refcount: int


class LayerTable:
    """The bank's tables for one routed layer of shape ``(d_out, d_in)``."""

    def __init__(self, name: str, shape: tuple[int, int], device: torch.device, slot_capacity: int):
        self.name = name
        self.shape = shape
        self.device = device
        self.slot_coef = torch.zeros(slot_capacity, 1, device=device)
        self.slot_scale = torch.zeros(slot_capacity, device=device)
        self.slot_locset = torch.zeros(slot_capacity, dtype=torch.long, device=device)
        self.locset_in = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.locset_out = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.locset_factor = torch.zeros(1, 1, device=device)
        self.locset_coef = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.covered_slots: set[int] = set()
        self._locsets: dict[str, _LocationSet] = {}
        self._locset_key_of_slot: dict[int, str] = {}
        self._free_locsets: list[int] = []
        self._locset_count = 1
        self.reallocations = 0  # tables replaced by larger ones (captured CUDA graphs hold the old ones)

    def _grow(self, name: str, dim: int, size: int) -> None:
        tensor = getattr(self, name)
        grown = _grown(tensor, dim, size)
        if grown is not tensor:
            setattr(self, name, grown)
            self.reallocations += 1

    def ensure_slot_capacity(self, capacity: int) -> None:
        self._grow("slot_coef", 0, capacity)
        self._grow("slot_scale", 0, capacity)
        self._grow("slot_locset", 0, capacity)

    def _acquire_locset(self, key: str, compile_locations: Callable[[], SpectralEntries]) -> int:
        known = self._locsets.get(key)
        if known is not None:
            known.refcount += 1
            return known.id
        entries = compile_locations()
        if self._free_locsets:
            locset_id = self._free_locsets.pop()
        else:
            locset_id = self._locset_count
            self._locset_count += 1
        self._grow("locset_in", 0, locset_id + 1)
        self._grow("locset_out", 0, locset_id + 1)
        self._grow("locset_factor", 0, locset_id + 1)
        self._grow("locset_coef", 0, locset_id + 1)
        self._grow("locset_in", 1, entries.count)
        self._grow("locset_out", 1, entries.count)
        self._grow("locset_factor", 1, entries.count)
        self._grow("locset_coef", 1, entries.count)
        for table, values in (
            (self.locset_in, entries.in_index),
            (self.locset_out, entries.out_index),
            (self.locset_factor, entries.factor),
            (self.locset_coef, entries.coef_index),
        ):
            table[locset_id].zero_()
            table[locset_id, : entries.count] = values.to(self.device)
        self._locsets[key] = _LocationSet(locset_id, 1)
        return locset_id

    def _release_locset(self, key: str) -> None:
        locset = self._locsets[key]
        locset.refcount -= 1
        if locset.refcount == 0:
            del self._locsets[key]
            self.locset_factor[locset.id].zero_()
            self._free_locsets.append(locset.id)

    def load(self, slot: int, method: Method, adapter: SpectralAdapter) -> None:
        spectrum = adapter.modules[self.name]
        rows, cols = spectrum.rows.long().contiguous(), spectrum.cols.long().contiguous()
        digest = hashlib.blake2b(rows.numpy().tobytes() + cols.numpy().tobytes(), digest_size=16).hexdigest()
        key = f"{method}:{adapter.norm if method == 'sdctft' else ''}:{digest}"
        locset_id = self._acquire_locset(key, lambda: compile_entries(method, adapter.norm, spectrum))
        self._grow("slot_coef", 1, spectrum.n)
        self.slot_coef[slot].zero_()
        self.slot_coef[slot, : spectrum.n] = spectrum.coefficients.to(self.device, torch.float32)
        self.slot_scale[slot] = spectrum.scaling
        self.slot_locset[slot] = locset_id
        self._locset_key_of_slot[slot] = key
        self.covered_slots.add(slot)

    def unload(self, slot: int) -> None:
        key = self._locset_key_of_slot.pop(slot, None)
        if key is None:
            return
        self.covered_slots.discard(slot)
        self.slot_locset[slot] = 0
        self.slot_scale[slot] = 0.0
        self.slot_coef[slot].zero_()
        self._release_locset(key)

    def coefficient_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slot_coef, self.slot_scale, self.slot_locset))

    def location_bytes(self) -> int:
        tables = (self.locset_in, self.locset_out, self.locset_factor, self.locset_coef)
        return sum(t.numel() * t.element_size() for t in tables)


@dataclass(frozen=True)
class _Slot:
    method: Method
    modules: tuple[str, ...]


class AdapterBank:
    """Resident adapters of one base model, addressed by slot."""

    def __init__(self, device: torch.device | str = "cpu", initial_slots: int = 16):
        self.device = torch.device(device)
        self.lock = threading.RLock()
        self.layers: dict[str, LayerTable] = {}
        self._slot_capacity = max(2, initial_slots)
        self._slots: dict[int, _Slot] = {}
        self._free_slots: list[int] = []
        self._next_slot = 1
        self._routing: Routing | None = None
        self._mutations = 0  # loads and unloads: a routing built before one may gather stale entries
        self._last_routing: tuple[tuple, Routing] | None = None

    @property
    def routing(self) -> Routing | None:
        return self._routing

    @property
    def tables_version(self) -> int:
        """Changes whenever any layer's table is reallocated (growth), so device pointers taken before are stale."""
        return sum(table.reallocations for table in self.layers.values())

    @property
    def resident_slots(self) -> int:
        return len(self._slots)

    def register_layer(self, name: str, shape: tuple[int, int]) -> LayerTable:
        table = LayerTable(name, shape, self.device, self._slot_capacity)
        self.layers[name] = table
        return table

    def method_of(self, slot: int) -> Method | None:
        info = self._slots.get(slot)
        return info.method if info else None

    def load(self, adapter: SpectralAdapter) -> int:
        """Make ``adapter`` resident and return its slot. The caller validated it against the model."""
        unknown = sorted(set(adapter.modules) - set(self.layers))
        if unknown:
            raise KeyError(f"modules not routed in this model: {', '.join(unknown[:5])}")
        with self.lock:
            slot = self._allocate_slot()
            try:
                for name in adapter.modules:
                    self.layers[name].load(slot, adapter.method, adapter)
            except BaseException:
                self._release(slot, adapter.modules)
                raise
            self._slots[slot] = _Slot(adapter.method, tuple(adapter.modules))
            self._mutations += 1
            return slot

    def unload(self, slot: int) -> None:
        with self.lock:
            info = self._slots.pop(slot, None)
            if info is not None:
                self._release(slot, info.modules)
                self._mutations += 1

    def _release(self, slot: int, modules: Iterable[str]) -> None:
        for name in modules:
            self.layers[name].unload(slot)
        self._free_slots.append(slot)

    def _allocate_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        slot = self._next_slot
        self._next_slot += 1
        if slot >= self._slot_capacity:
            self._slot_capacity = max(slot + 1, 2 * self._slot_capacity)
            for table in self.layers.values():
                table.ensure_slot_capacity(self._slot_capacity)
        return slot

    def memory_bytes(self) -> int:
        return sum(t.coefficient_bytes() + t.location_bytes() for t in self.layers.values())

    @contextmanager
    def route(
        self,
        slots: torch.Tensor,
        weights: torch.Tensor | None = None,
        trainable: TrainableSpectrum | None = None,
    ) -> Iterator[Routing]:
        """Set the per-token slots for every routed layer during one forward.

        ``slots`` is ``[tokens]`` or ``[tokens, K]`` for K-way blends with ``weights`` of the
        same shape; any leading shape flattens to the token order of the layer inputs.
        """
        with self.lock, self.routed(build_routing(slots, weights, self.method_of, trainable, self.device)) as routing:
            yield routing

    def row_routing(
        self,
        row_slots: Sequence[Sequence[int]],
        row_weights: Sequence[Sequence[float]],
        tokens_per_row: int,
        *,
        static: bool = False,
    ) -> Routing:
        """:func:`build_row_routing` for the serving engine, reusing the previous call's routing (with the
        per-layer entries its forward gathered) while the rows and the resident adapters are unchanged:
        the common decode step."""
        key = (tuple(map(tuple, row_slots)), tuple(map(tuple, row_weights)), tokens_per_row, static)
        with self.lock:
            if self._last_routing is None or self._last_routing[0] != (key, self._mutations):
                routing = build_row_routing(
                    row_slots, row_weights, tokens_per_row, self.method_of, self.device, static=static
                )
                self._last_routing = ((key, self._mutations), routing)
            return self._last_routing[1]

    @contextmanager
    def routed(self, routing: Routing) -> Iterator[Routing]:
        """Route one forward by a prepared ``routing``, holding the lock for its duration."""
        with self.lock:
            self._routing = routing
            try:
                yield routing
            finally:
                self._routing = None
