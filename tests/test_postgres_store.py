"""The PostgreSQL adapter store as replicas use it: two stores on one database, each a "replica"."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from adapters_store.errors import BlobCorruptError, StoreUnavailableError
from adapters_store.postgres import MIGRATIONS, PostgresAdapterStore

pytest_plugins = ["tests.postgres_fixtures"]


@pytest.fixture
def database(postgres_url: str) -> str:
    from tests.postgres_fixtures import fresh_database

    return fresh_database(postgres_url)


@pytest.fixture
def replicas(database: str) -> Iterator[tuple[PostgresAdapterStore, PostgresAdapterStore]]:
    a, b = PostgresAdapterStore(database), PostgresAdapterStore(database)
    yield a, b
    a.close()
    b.close()


def _put(store: PostgresAdapterStore, adapter_id: str, data: bytes):
    return store.put(adapter_id, data, method="fourierft", n_params=10, source_format="native", base_model="m")


def test_a_put_on_one_replica_is_read_with_the_same_bytes_on_the_other(replicas) -> None:
    a, b = replicas
    data = bytes(range(256)) * 40
    record = _put(a, "team/x", data)
    assert b.index.get("team/x") == record
    assert b.read(b.index.get("team/x", 1)) == data
    assert b.index.latest_ids() == ["team/x"]
    b.delete("team/x")
    assert a.index.get("team/x") is None


def test_concurrent_puts_from_two_replicas_get_distinct_gap_free_versions(replicas) -> None:
    results: dict[bytes, int] = {}
    barrier = threading.Barrier(4)

    def upload(store: PostgresAdapterStore, worker: int) -> None:
        barrier.wait()
        for i in range(15):
            data = f"{worker}-{i}".encode()
            results[data] = _put(store, "shared", data).version

    threads = [threading.Thread(target=upload, args=(replicas[n % 2], n)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == list(range(1, 61))
    for data, version in results.items():
        assert replicas[version % 2].read(replicas[0].index.get("shared", version)) == data


def test_versions_are_not_reused_across_replicas_after_deletes(replicas) -> None:
    a, b = replicas
    _put(a, "x", b"1")
    _put(b, "x", b"2")
    a.delete("x")
    assert _put(b, "x", b"3").version == 3


def test_a_corrupted_blob_row_fails_its_sha256_on_read_and_a_reupload_repairs_it(replicas, database: str) -> None:
    a, b = replicas
    record = _put(a, "x", b"good bytes")
    with psycopg.connect(database, autocommit=True) as db:
        db.execute("UPDATE adapter_blobs SET data = %s WHERE sha256 = %s", (b"bad bytes!", record.sha256))
    with pytest.raises(BlobCorruptError, match="fails its sha256 check"):
        b.read(record)
    _put(b, "x", b"good bytes")
    assert a.read(record) == b"good bytes"


def test_a_missing_blob_row_reads_as_file_not_found(replicas, database: str) -> None:
    a, _ = replicas
    record = _put(a, "x", b"bytes")
    with psycopg.connect(database, autocommit=True) as db:
        db.execute("ALTER TABLE adapter_versions DROP CONSTRAINT adapter_versions_sha256_fkey")
        db.execute("DELETE FROM adapter_blobs")
    with pytest.raises(FileNotFoundError):
        a.read(record)


def test_the_schema_is_created_once_by_replicas_starting_together(database: str) -> None:
    stores: list[PostgresAdapterStore] = []
    threads = [threading.Thread(target=lambda: stores.append(PostgresAdapterStore(database))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [store.schema_version for store in stores] == [len(MIGRATIONS)] * 4
    with psycopg.connect(database) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
    for store in stores:
        store.close()


def test_a_newer_schema_is_refused(database: str) -> None:
    PostgresAdapterStore(database).close()
    with psycopg.connect(database, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(RuntimeError, match="newer than this server's"):
        PostgresAdapterStore(database)


def test_a_dropped_connection_is_reopened(replicas, database: str) -> None:
    a, _ = replicas
    _put(a, "x", b"1")
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
    with pytest.raises(StoreUnavailableError, match="store error"):
        a.index.get("x")
    assert a.index.get("x").version == 1


def test_an_unreachable_store_is_a_store_error() -> None:
    from tests.http_fixtures import free_port

    with pytest.raises(StoreUnavailableError, match="cannot connect to the store"):
        PostgresAdapterStore(f"postgresql://postgres@127.0.0.1:{free_port()}/none?connect_timeout=5")
