"""The PostgreSQL store's change feed and garbage collection, and two registries following each other through it.

Real PostgreSQL (a throwaway cluster); the registries hold a real tiny Llama's adapter bank each, as two
replicas would, and follow the feed with the real :class:`StoreFollower` thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from adapters_store.errors import UnknownCursorError
from adapters_store.postgres import PostgresAdapterStore, PostgresChangeFeed
from server.engine.adapters import AdapterMemoryFullError, AdapterRegistry, resident_cost
from server.engine.model_runner import ModelRunner
from server.engine.store_follower import StoreFollower
from server.engine.types import UnknownAdapterError
from tests.engine_fixtures import random_adapter, registry_for

pytest_plugins = ["tests.postgres_fixtures"]

FOLLOW_DEADLINE_S = 1.0


@pytest.fixture
def database(postgres_url: str) -> str:
    from tests.postgres_fixtures import fresh_database

    return fresh_database(postgres_url)


@pytest.fixture
def store(database: str) -> Iterator[PostgresAdapterStore]:
    store = PostgresAdapterStore(database)
    yield store
    store.close()


@pytest.fixture
def feed(database: str, store: PostgresAdapterStore) -> Iterator[PostgresChangeFeed]:
    feed = PostgresChangeFeed(database)
    yield feed
    feed.close()


def _put(store: PostgresAdapterStore, adapter_id: str, data: bytes, *, pinned: bool = False):
    return store.put(
        adapter_id, data, method="fourierft", n_params=10, source_format="native", base_model="m", pinned=pinned
    )


def _kinds(feed: PostgresChangeFeed, after: int) -> list[tuple[str, int, str]]:
    return [(change.adapter_id, change.version, change.kind) for change in feed.changes_after(after)]


def test_every_write_is_one_change_in_commit_order(store: PostgresAdapterStore, feed: PostgresChangeFeed) -> None:
    start = feed.last_seq()
    _put(store, "x", b"1")
    _put(store, "x", b"2")
    store.index.mark_broken("x", 1, "bad bytes")
    store.index.mark_broken("x", 9, "no such version: no change")
    store.delete("x")
    assert _kinds(feed, start) == [
        ("x", 1, "put"),
        ("x", 2, "put"),
        ("x", 1, "broken"),
        ("x", 1, "delete"),
        ("x", 2, "delete"),
    ]
    changes = feed.changes_after(start)
    assert [change.seq for change in changes] == list(range(start + 1, start + 6))
    assert feed.last_seq() == start + 5
    assert _kinds(feed, start + 3) == [("x", 1, "delete"), ("x", 2, "delete")]


def test_concurrent_writers_leave_no_gap_a_reader_could_skip(database: str, feed: PostgresChangeFeed) -> None:
    """Readers racing the writers see a prefix of the final sequence every time: never seq N+1 before N."""
    stores = [PostgresAdapterStore(database) for _ in range(3)]
    done = threading.Event()
    prefixes_ok: list[bool] = []

    def read_while_writing() -> None:
        while not done.is_set():
            seqs = [change.seq for change in feed.changes_after(0)]
            prefixes_ok.append(seqs == list(range(1, len(seqs) + 1)))

    def write(store: PostgresAdapterStore, worker: int) -> None:
        for i in range(20):
            _put(store, f"w{worker}", f"{worker}-{i}".encode())

    reader = threading.Thread(target=read_while_writing)
    writers = [threading.Thread(target=write, args=(stores[n], n)) for n in range(3)]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    assert [change.seq for change in feed.changes_after(0)] == list(range(1, 61))
    assert prefixes_ok and all(prefixes_ok)
    for store in stores:
        store.close()


def test_a_commit_wakes_a_waiting_feed_at_once(store: PostgresAdapterStore, feed: PostgresChangeFeed) -> None:
    feed.last_seq()  # connected and LISTENing before the commit
    woke: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        feed.wait(10.0)
        woke.append(time.monotonic() - started)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    _put(store, "x", b"1")
    waiter.join()
    assert woke[0] < 2.0


def test_a_dropped_feed_connection_reconnects_and_catches_up(
    database: str, store: PostgresAdapterStore, feed: PostgresChangeFeed
) -> None:
    from adapters_store.errors import StoreUnavailableError

    start = feed.last_seq()
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query LIKE '%adapter_change_counter%'"
        )
    _put(store, "x", b"1")
    with pytest.raises(StoreUnavailableError, match="change feed failed"):
        feed.changes_after(start)
    assert _kinds(feed, start) == [("x", 1, "put")]


def test_garbage_collection_prunes_old_changes_and_a_reader_behind_them_is_told(
    database: str, store: PostgresAdapterStore, feed: PostgresChangeFeed
) -> None:
    _put(store, "x", b"1")
    _put(store, "x", b"2")
    with psycopg.connect(database, autocommit=True) as db:
        db.execute("UPDATE adapter_changes SET created_at = created_at - 7200 WHERE seq = 1")
    report = store.collect_garbage("a", lease_seconds=60, grace_seconds=3600)
    assert report is not None and report.changes_pruned == 1
    with pytest.raises(UnknownCursorError, match="pruned"):
        feed.changes_after(0)
    assert _kinds(feed, 1) == [("x", 2, "put")]


def test_garbage_collection_is_one_replica_at_a_time_until_its_lease_expires(database: str) -> None:
    a, b = PostgresAdapterStore(database), PostgresAdapterStore(database)
    assert a.collect_garbage("a", lease_seconds=1.0, grace_seconds=3600) is not None
    assert b.collect_garbage("b", lease_seconds=1.0, grace_seconds=3600) is None
    assert a.collect_garbage("a", lease_seconds=1.0, grace_seconds=3600) is not None, "the holder renews"
    time.sleep(1.2)
    assert b.collect_garbage("b", lease_seconds=60, grace_seconds=3600) is not None
    assert a.collect_garbage("a", lease_seconds=60, grace_seconds=3600) is None
    a.close()
    b.close()


def test_garbage_collection_sweeps_only_orphan_blobs_older_than_the_grace(
    database: str, store: PostgresAdapterStore
) -> None:
    kept = _put(store, "x", b"referenced")
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(
            "INSERT INTO adapter_blobs (sha256, data, created_at) VALUES ('old', 'o', 0), ('young', 'y', %s)",
            (time.time(),),
        )
        db.execute("UPDATE adapter_blobs SET created_at = 0 WHERE sha256 = %s", (kept.sha256,))
    report = store.collect_garbage("a", lease_seconds=60, grace_seconds=3600)
    assert report is not None and report.orphan_blobs == 1
    with psycopg.connect(database) as db:
        assert sorted(row[0] for row in db.execute("SELECT sha256 FROM adapter_blobs")) == sorted(
            [kept.sha256, "young"]
        )
    assert store.read(kept) == b"referenced"


# -- two registries ("replicas") following each other -------------------------------------------------------

Replica = tuple[AdapterRegistry, StoreFollower]


@pytest.fixture
def make_replica(tiny_llama_dir: Path, database: str) -> Iterator[Callable[..., Replica]]:
    started: list[tuple[PostgresAdapterStore, StoreFollower]] = []

    def make(*, room_for: int = 4) -> Replica:
        runner = ModelRunner(tiny_llama_dir, dtype="float32", device="cpu")
        store = PostgresAdapterStore(database)
        registry = registry_for(runner, store, room_for * resident_cost(random_adapter(runner.module_shapes, 0)))
        follower = StoreFollower(registry, PostgresChangeFeed(database), store, replica_id=f"r{len(started)}")
        registry.load_pinned()
        follower.start()
        started.append((store, follower))
        return registry, follower

    yield make
    for store, follower in started:
        follower.stop()
        store.close()


def _within(deadline_s: float, condition: Callable[[], bool]) -> float:
    """Seconds until ``condition`` held; fails after ``deadline_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline_s:
            pytest.fail(f"not within {deadline_s} s")
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_pin_on_one_replica_becomes_resident_on_the_other_within_a_second(make_replica) -> None:
    (a, _), (b, _) = make_replica(room_for=1), make_replica(room_for=1)
    a.register("pinned", random_adapter(a.module_shapes, 1), pin=True)
    a.register("other", random_adapter(a.module_shapes, 2))
    _within(FOLLOW_DEADLINE_S, lambda: b.resident_count() == 1)
    with pytest.raises(AdapterMemoryFullError):
        b.lease("other")  # the pin holds b's whole budget, as it holds a's


def test_a_delete_on_one_replica_unloads_the_resident_copy_on_the_other(make_replica) -> None:
    (a, _), (b, _) = make_replica(), make_replica()
    a.register("x", random_adapter(a.module_shapes, 1))
    lease = b.lease("x")
    b.ensure_loaded(lease.version)
    lease.release()
    assert b.resident_count() == 1
    a.delete("x")
    _within(FOLLOW_DEADLINE_S, lambda: b.resident_count() == 0)


def test_a_request_in_flight_keeps_its_version_through_a_delete_elsewhere(make_replica) -> None:
    (a, _), (b, b_follower) = make_replica(), make_replica()
    a.register("x", random_adapter(a.module_shapes, 1))
    lease = b.lease("x")
    slot = b.ensure_loaded(lease.version)
    a.delete("x")
    _within(FOLLOW_DEADLINE_S, lambda: b_follower.position >= 2)
    assert lease.version.slot == slot and b.resident_count() == 1, "held until the request releases it"
    lease.release()
    assert b.resident_count() == 0


def test_a_pinned_version_deleted_elsewhere_frees_its_budget(make_replica) -> None:
    (a, _), (b, _) = make_replica(room_for=1), make_replica(room_for=1)
    a.register("p", random_adapter(a.module_shapes, 1), pin=True)
    _within(FOLLOW_DEADLINE_S, lambda: b.resident_count() == 1)
    a.delete("p")
    _within(FOLLOW_DEADLINE_S, lambda: b.resident_count() == 0)
    b.register("q", random_adapter(b.module_shapes, 2), pin=True)


def test_a_broken_mark_elsewhere_retires_the_resident_copy(make_replica) -> None:
    (a, _), (b, _) = make_replica(), make_replica()
    record = a.register("x", random_adapter(a.module_shapes, 1))
    lease = b.lease("x")
    b.ensure_loaded(lease.version)
    lease.release()
    a.store.index.mark_broken("x", record.version, "blob failed its sha256")
    _within(FOLLOW_DEADLINE_S, lambda: b.resident_count() == 0)


def test_a_registry_that_missed_changes_resynchronises_from_the_catalog(make_replica) -> None:
    """What the follower does when the feed was pruned past its position: drop what is gone, pin what is
    pinned."""
    (a, _), (b, b_follower) = make_replica(), make_replica()
    a.register("x", random_adapter(a.module_shapes, 1))
    lease = b.lease("x")
    b.ensure_loaded(lease.version)
    lease.release()
    b_follower.stop()
    a.delete("x")
    a.register("p", random_adapter(a.module_shapes, 2), pin=True)
    assert b.resident_count() == 1
    b.resynchronise()
    assert b.resident_count() == 1 and b.lease("p").version.slot is not None
    with pytest.raises(UnknownAdapterError):
        b.lease("x")
