"""The adapter registry in process: store-backed versions, leases, LRU residency within a byte budget, pins.

Real SQLite and blob files under ``tmp_path``, a real tiny Llama and its adapter bank; budgets are
whole multiples of one random adapter's :func:`resident_cost`, so "room for 2" means exactly that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from adapters_store.store import AdapterStore
from server.engine.adapters import (
    AdapterBrokenError,
    AdapterMemoryFullError,
    AdapterRegistry,
    InvalidAdapterRefError,
    resident_cost,
)
from server.engine.model_runner import ModelRunner
from server.engine.types import UnknownAdapterError
from server.spectral.adapter import SpectralAdapter
from server.spectral.bank import AdapterBank
from tests.engine_fixtures import random_adapter, registry_for

MakeRegistry = Callable[..., AdapterRegistry]


@pytest.fixture
def make_registry(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[MakeRegistry]:
    """``make_registry(room_for=N)``: a fresh model and bank over the store in ``tmp_path / "store"``."""
    stores: list[AdapterStore] = []

    def make(*, room_for: int) -> AdapterRegistry:
        runner = ModelRunner(tiny_llama_dir, dtype="float32", device="cpu")
        store = AdapterStore(tmp_path / "store")
        stores.append(store)
        return registry_for(runner, store, room_for * resident_cost(adapter_for(runner.module_shapes, 0)))

    yield make
    for store in stores:
        store.close()


def adapter_for(shapes: dict[str, tuple[int, int]], seed: int) -> SpectralAdapter:
    return random_adapter(shapes, seed)


def register_all(registry: AdapterRegistry, names: str, *, first_seed: int = 1) -> dict[str, SpectralAdapter]:
    """Register one random adapter per letter of ``names``; all cost the same bank bytes."""
    adapters = {}
    for seed, name in enumerate(names, start=first_seed):
        adapters[name] = adapter_for(registry.module_shapes, seed)
        assert resident_cost(adapters[name]) == one_cost(registry)
        registry.register(name, adapters[name])
    return adapters


def touch(registry: AdapterRegistry, ref: str) -> int:
    """What one request does: lease ``ref``, make it resident, release it. Returns its slot."""
    lease = registry.lease(ref)
    try:
        return lease.slot()
    finally:
        lease.release()


def holds(bank: AdapterBank, slot: int, adapter: SpectralAdapter) -> bool:
    """Whether ``slot`` carries exactly ``adapter``'s fp32 coefficients in every layer it adapts."""
    for name, spectrum in adapter.modules.items():
        row = bank.layers[name].slot_coef[slot, : spectrum.n]
        if not torch.equal(row, spectrum.coefficients.to(torch.float32)):
            return False
    return bank.method_of(slot) == adapter.method


def any_slot_holds(bank: AdapterBank, adapter: SpectralAdapter) -> bool:
    capacity = next(iter(bank.layers.values())).slot_coef.shape[0]
    return any(holds(bank, slot, adapter) for slot in range(1, capacity))


def one_cost(registry: AdapterRegistry) -> int:
    return resident_cost(adapter_for(registry.module_shapes, 0))


# -- LRU residency -----------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used_adapter(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    adapters = register_all(registry, "abc")
    slot_a = touch(registry, "a")
    touch(registry, "b")
    assert touch(registry, "a") == slot_a, "a was resident: touching it must reuse its slot"
    assert registry.loads == 2

    slot_c = touch(registry, "c")

    assert registry.evictions == 1
    assert registry.resident_count() == 2 == registry.bank.resident_slots
    assert registry.resident_bytes == 2 * one_cost(registry) <= registry.memory_budget_bytes
    assert holds(registry.bank, slot_a, adapters["a"]), "a (recently used) must not be evicted"
    assert holds(registry.bank, slot_c, adapters["c"])
    loads = registry.loads
    assert touch(registry, "a") == slot_a and registry.loads == loads, "a must still be resident"
    touch(registry, "b")
    assert registry.loads == loads + 1, "b (least recently used) must have been evicted and loaded again"


def test_an_adapter_in_use_is_never_evicted(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    adapters = register_all(registry, "abc")
    lease_a, lease_b = registry.lease("a"), registry.lease("b")
    slot_a = lease_a.slot()
    lease_b.slot()

    for _ in range(3):  # refusals must not leak held bytes
        with pytest.raises(AdapterMemoryFullError, match="--adapter-memory") as refused:
            registry.lease("c")
        assert refused.value.status_code == 429
    assert registry.evictions == 0 and registry.resident_count() == 2

    lease_b.release()
    lease_c = registry.lease("c")
    slot_c = lease_c.slot()

    assert lease_a.slot() == slot_a and holds(registry.bank, slot_a, adapters["a"]), "leased a must stay resident"
    assert holds(registry.bank, slot_c, adapters["c"])
    assert registry.evictions == 1, "only the released b may make room"
    assert registry.resident_count() == 2 == registry.bank.resident_slots
    lease_a.release()
    lease_c.release()


def test_leases_count_against_the_budget_before_they_load(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    register_all(registry, "abc")
    held = [registry.lease("a"), registry.lease("b")]
    with pytest.raises(AdapterMemoryFullError):
        registry.lease("c")
    assert registry.resident_count() == 0
    held[0].release()
    registry.lease("c").release()
    held[1].release()


def test_a_reloaded_adapter_carries_its_coefficients(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    adapters = register_all(registry, "abc")
    first_slot = touch(registry, "a")
    assert holds(registry.bank, first_slot, adapters["a"])
    touch(registry, "b")
    touch(registry, "c")  # evicts a
    assert registry.evictions == 1 and not holds(registry.bank, first_slot, adapters["a"])

    new_slot = touch(registry, "a")  # evicts b; a is read back from its blob

    assert registry.evictions == 2
    bank = registry.bank
    for name, spectrum in adapters["a"].modules.items():
        layer = bank.layers[name]
        torch.testing.assert_close(
            layer.slot_coef[new_slot, : spectrum.n], spectrum.coefficients.float(), rtol=0, atol=0
        )
        assert not layer.slot_coef[new_slot, spectrum.n :].any(), f"{name}: stale coefficients past n"
        assert float(layer.slot_scale[new_slot]) == spectrum.scaling
        assert int(layer.slot_locset[new_slot]) != 0


def test_a_slot_reused_after_a_bigger_adapter_has_no_stale_coefficients(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    small = random_adapter(registry.module_shapes, 1, n=100)  # half the unit cost
    big = random_adapter(registry.module_shapes, 2, n=400)  # the whole budget
    registry.register("small", small)
    registry.register("big", big)
    touch(registry, "small")
    touch(registry, "big")  # evicts small
    slot = touch(registry, "small")  # evicts big; small lands in a slot that held 400 coefficients per layer

    assert registry.evictions == 2 and registry.resident_count() == 1
    assert holds(registry.bank, slot, small)
    for name, spectrum in small.modules.items():
        assert not registry.bank.layers[name].slot_coef[slot, spectrum.n :].any(), f"{name}: big's coefficients remain"


# -- pins --------------------------------------------------------------------------------------


def test_a_pinned_version_is_resident_at_once_and_never_evicted(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    pinned = adapter_for(registry.module_shapes, 100)
    registry.register("p", pinned, pin=True)
    assert registry.resident_count() == 1 == registry.bank.resident_slots
    assert registry.store.index.get("p").pinned
    slot_p = touch(registry, "p")
    assert registry.loads == 1, "pinning loads the version; a lease reuses it"

    register_all(registry, "abcd")
    for name in "abcd":
        touch(registry, name)

    assert registry.evictions == 3, "the unpinned adapters evict each other, never the pin"
    assert registry.resident_count() == 2 == registry.bank.resident_slots
    assert holds(registry.bank, slot_p, pinned)


def test_pins_count_against_the_budget(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    registry.register("p", adapter_for(registry.module_shapes, 100), pin=True)
    registry.register("q", adapter_for(registry.module_shapes, 101), pin=True)
    register_all(registry, "a")

    with pytest.raises(AdapterMemoryFullError, match="--adapter-memory") as refused:
        registry.register("r", adapter_for(registry.module_shapes, 102), pin=True)
    assert refused.value.status_code == 429
    with pytest.raises(AdapterMemoryFullError):
        registry.lease("a")
    assert registry.resident_count() == 2


def test_a_pin_larger_than_the_budget_is_refused_before_it_is_stored(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=1)
    big = random_adapter(registry.module_shapes, 5, n=400)
    with pytest.raises(AdapterMemoryFullError, match="--adapter-memory"):
        registry.register("big", big, pin=True)
    assert registry.store.index.get("big") is None


def test_a_pin_refused_for_lack_of_memory_leaves_no_version_behind(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    registry.register("p", adapter_for(registry.module_shapes, 100), pin=True)
    registry.register("q", adapter_for(registry.module_shapes, 101), pin=True)
    with pytest.raises(AdapterMemoryFullError):
        registry.register("r", adapter_for(registry.module_shapes, 102), pin=True)
    record = registry.store.index.get("r")
    assert record is None, (
        f"the upload was refused with 429, yet r@{record.version} is stored (pinned={record.pinned}, "
        f"listed by ids(): {'r' in registry.ids()}); a client retrying the 429 adds a version each time, "
        "and load_pinned() at the next start competes for the budget with the pins that did load"
    )


def test_the_acknowledged_pins_are_the_ones_resident_after_a_restart(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    acknowledged = {"p": adapter_for(registry.module_shapes, 100), "q": adapter_for(registry.module_shapes, 101)}
    for name, adapter in acknowledged.items():
        registry.register(name, adapter, pin=True)
    with pytest.raises(AdapterMemoryFullError):
        registry.register("a", adapter_for(registry.module_shapes, 102), pin=True)  # sorts before p and q
    registry.store.close()

    restarted = make_registry(room_for=2)
    attempted = restarted.load_pinned()

    missing = [name for name, adapter in acknowledged.items() if not any_slot_holds(restarted.bank, adapter)]
    assert not missing, (
        f"pins {missing} were acknowledged but are not resident after the restart: load_pinned() tried {attempted} "
        "pins in id order and the refused pin 'a' took their place in the budget"
    )


def test_pins_are_loaded_again_after_a_restart(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    pinned = {"p": adapter_for(registry.module_shapes, 100), "q": adapter_for(registry.module_shapes, 101)}
    for name, adapter in pinned.items():
        registry.register(name, adapter, pin=True)
    register_all(registry, "a")
    registry.store.close()

    restarted = make_registry(room_for=2)
    assert restarted.resident_count() == 0
    assert restarted.load_pinned() == 2

    assert restarted.resident_count() == 2 == restarted.bank.resident_slots
    for name, adapter in pinned.items():
        assert holds(restarted.bank, touch(restarted, name), adapter)
    assert restarted.loads == 2, "the pins were resident before any lease"
    with pytest.raises(AdapterMemoryFullError):
        restarted.lease("a")


# -- versions and refs -------------------------------------------------------------------------


def test_latest_and_pinned_versions(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    first, second = adapter_for(registry.module_shapes, 1), adapter_for(registry.module_shapes, 2)
    assert registry.register("x", first).version == 1
    assert registry.register("x", second).version == 2

    latest, old = registry.lease("x"), registry.lease("x@1")

    assert (latest.version.version, old.version.version) == (2, 1)
    name = next(iter(first.modules))
    assert not torch.equal(first.modules[name].coefficients, second.modules[name].coefficients)
    latest_slot, old_slot = latest.slot(), old.slot()
    assert latest_slot != old_slot
    assert holds(registry.bank, latest_slot, second) and not holds(registry.bank, latest_slot, first)
    assert holds(registry.bank, old_slot, first) and not holds(registry.bank, old_slot, second)
    latest.release()
    old.release()


@pytest.mark.parametrize("ref", ["nope", "x@2", "team/x"])
def test_unknown_refs_are_404(make_registry: MakeRegistry, ref: str) -> None:
    registry = make_registry(room_for=2)
    registry.register("x", adapter_for(registry.module_shapes, 1))
    with pytest.raises(UnknownAdapterError) as missing:
        registry.lease(ref)
    assert missing.value.status_code == 404


@pytest.mark.parametrize("ref", ["a@0", "a@-1", "a@x", "../x", "a/b/c", "", "a/.."])
def test_invalid_refs_are_422(make_registry: MakeRegistry, ref: str) -> None:
    registry = make_registry(room_for=2)
    with pytest.raises(InvalidAdapterRefError) as invalid:
        registry.lease(ref)
    assert invalid.value.status_code == 422
    with pytest.raises(InvalidAdapterRefError):
        registry.delete(ref)


# -- delete and broken blobs -------------------------------------------------------------------


def test_delete_while_leased_unloads_at_release(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    adapters = register_all(registry, "ab")
    touch(registry, "b")
    lease = registry.lease("a")
    slot = lease.slot()

    deleted = registry.delete("a")

    assert [record.version for record in deleted] == [1]
    assert registry.store.index.get("a") is None and registry.ids() == ["b"]
    with pytest.raises(UnknownAdapterError):
        registry.lease("a")
    assert registry.bank.resident_slots == 2 and holds(registry.bank, slot, adapters["a"]), "in flight: still loaded"
    assert lease.slot() == slot

    lease.release()

    assert registry.bank.resident_slots == 1 == registry.resident_count()
    assert registry.bank.method_of(slot) is None
    assert registry.resident_bytes == one_cost(registry)


def test_delete_of_an_idle_resident_version_unloads_it_at_once(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    register_all(registry, "ab")
    touch(registry, "a")
    touch(registry, "b")
    registry.delete("a@1")
    assert registry.resident_count() == 1 == registry.bank.resident_slots
    assert registry.resident_bytes == one_cost(registry)


def test_deleting_a_pin_frees_its_budget(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    registry.register("p", adapter_for(registry.module_shapes, 100), pin=True)
    registry.register("q", adapter_for(registry.module_shapes, 101), pin=True)
    register_all(registry, "a")
    with pytest.raises(AdapterMemoryFullError):
        registry.lease("a")
    registry.delete("p")
    assert registry.resident_count() == 1 == registry.bank.resident_slots
    touch(registry, "a")
    assert registry.resident_count() == 2


def test_a_reuploaded_id_never_serves_the_deleted_version_still_in_flight(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    old, new = adapter_for(registry.module_shapes, 1), adapter_for(registry.module_shapes, 2)
    registry.register("x", old)
    in_flight = registry.lease("x")
    in_flight.slot()
    registry.delete("x")
    record = registry.register("x", new)
    assert record.version == 2, "version numbers are never reused"

    fresh = registry.lease("x")

    assert holds(registry.bank, fresh.slot(), new), (
        f"lease('x') after re-uploading x (now x@{record.version}, sha {record.sha256[:12]}) returned the deleted "
        f"x@{in_flight.version.version} still held by an in-flight request (same version object: "
        f"{fresh.version is in_flight.version}, slot {fresh.slot()} holds the old weights: "
        f"{holds(registry.bank, fresh.slot(), old)}): a new request runs the deleted adapter"
    )


def test_a_corrupted_blob_makes_its_version_broken(make_registry: MakeRegistry) -> None:
    registry = make_registry(room_for=2)
    adapters = register_all(registry, "ab")
    record = registry.store.index.get("a")
    blob = registry.store.blobs.path(record.sha256)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))

    with pytest.raises(AdapterBrokenError, match="broken") as broken:
        registry.lease("a")

    assert broken.value.status_code == 409
    assert "sha256" in registry.store.index.get("a").broken
    assert registry.ids() == ["b"]
    with pytest.raises(AdapterBrokenError, match="a@1 is broken"):
        registry.lease("a")  # refused from the index row now, without reading the blob
    assert registry.resident_count() == 0
    assert holds(registry.bank, touch(registry, "b"), adapters["b"])
