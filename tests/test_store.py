"""The adapter store: versions, ids, pagination, visibility and crash recovery.

The tests taking ``adapter_store`` run against both backends: the embedded one (SQLite and blob files in a temp
dir) and PostgreSQL (a fresh database on the session's throwaway cluster, tests/postgres_fixtures.py). The
tests under "Embedded backend only" poke the SQLite backend's files and lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters_store.errors import StoreLockedError
from adapters_store.ids import InvalidAdapterIdError, parse_ref, validate_adapter_id
from adapters_store.interfaces import AdapterRepository
from adapters_store.postgres import PostgresAdapterStore
from adapters_store.store import AdapterStore

pytest_plugins = ["tests.postgres_fixtures"]


@pytest.fixture(params=["sqlite", "postgresql"])
def adapter_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AdapterRepository]:
    if request.param == "sqlite":
        store = AdapterStore(tmp_path)
    else:
        from tests.postgres_fixtures import fresh_database

        store = PostgresAdapterStore(fresh_database(request.getfixturevalue("postgres_url")))
    yield store
    store.close()


def _put(store: AdapterRepository, adapter_id: str, data: bytes, **fields):
    return store.put(
        adapter_id, data, method="fourierft", n_params=10, source_format="native", base_model="m", **fields
    )


@pytest.mark.parametrize("good", ["a", "team/a", "A.b-c_d", "x" * 64, "ns-1/model.v2"])
def test_valid_ids(good: str) -> None:
    assert validate_adapter_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "/a", "a/", "a//b", "a/b/c", "..", "a/..", "-a", ".a", "a\n", "a b", "x" * 65, "é"]
)
def test_invalid_ids_are_rejected_with_the_rule(bad: str) -> None:
    with pytest.raises(InvalidAdapterIdError, match="expected 'name' or 'namespace/name'"):
        validate_adapter_id(bad)


def test_refs_pin_versions() -> None:
    assert parse_ref("team/a@3").version == 3
    assert parse_ref("team/a").version is None
    for bad in ("a@0", "a@x", "a@"):
        with pytest.raises(InvalidAdapterIdError):
            parse_ref(bad)


def test_versions_latest_pinning_and_delete(adapter_store: AdapterRepository) -> None:
    store = adapter_store
    first, second = _put(store, "team/a", b"one"), _put(store, "team/a", b"two")
    assert (first.version, second.version) == (1, 2)
    assert store.read(store.index.get("team/a")) == b"two"
    assert store.read(store.index.get("team/a", 1)) == b"one"
    assert [record.version for record in store.delete("team/a", 2)] == [2]
    assert store.index.get("team/a").version == 1
    with pytest.raises(FileNotFoundError):
        store.read(second)
    assert store.delete("team/a") == [first]
    assert store.index.get("team/a") is None and store.index.versions("team/a") == []
    with pytest.raises(FileNotFoundError):
        store.read(first)


def test_shared_blob_survives_until_its_last_version_goes(adapter_store: AdapterRepository) -> None:
    store = adapter_store
    a, b = _put(store, "a", b"same"), _put(store, "b", b"same")
    assert a.sha256 == b.sha256
    store.delete("a")
    assert store.read(store.index.get("b")) == b"same"
    store.delete("b")
    with pytest.raises(FileNotFoundError):
        store.read(b)


def test_records_keep_every_field(adapter_store: AdapterRepository) -> None:
    record = _put(adapter_store, "team/a", b"x" * 7, description="d", metadata={"k": [1, "v"]}, pinned=True)
    assert record == adapter_store.index.get("team/a", 1) == adapter_store.index.versions("team/a")[0]
    assert (record.size_bytes, record.description, record.metadata) == (7, "d", {"k": [1, "v"]})
    assert (record.pinned, record.public, record.broken, record.namespace) == (True, False, None, "team")
    assert adapter_store.index.pinned_records() == [record]


def test_broken_marks_hide_the_latest_version_until_cleared(adapter_store: AdapterRepository) -> None:
    _put(adapter_store, "a", b"one")
    _put(adapter_store, "b", b"two")
    adapter_store.index.mark_broken("b", 1, "bad bytes")
    assert adapter_store.index.get("b").broken == "bad bytes"
    assert adapter_store.index.latest_ids() == ["a"]
    adapter_store.index.mark_broken("b", 1, None)
    assert adapter_store.index.latest_ids() == ["a", "b"] and adapter_store.index.count_ids() == 2


def test_namespaces_see_their_own_the_servers_and_public_ids(adapter_store: AdapterRepository) -> None:
    for adapter_id, public in (("shared", False), ("t1/own", False), ("t2/hidden", False), ("t2/open", True)):
        _put(adapter_store, adapter_id, adapter_id.encode(), public=public)
    assert adapter_store.index.latest_ids(visible_to="t1") == ["shared", "t1/own", "t2/open"]
    assert [r.adapter_id for r in adapter_store.index.list_latest(visible_to="t2")] == [
        "shared",
        "t2/hidden",
        "t2/open",
    ]
    assert len(adapter_store.index.list_latest()) == 4


def test_concurrent_puts_to_one_id_get_distinct_gap_free_versions(adapter_store: AdapterRepository) -> None:
    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(lambda i: _put(adapter_store, "a", f"{i}".encode()), range(40)))
    assert sorted(record.version for record in records) == list(range(1, 41))
    for i, record in enumerate(records):
        assert adapter_store.read(record) == f"{i}".encode()


def test_listing_pages_through_every_id_with_prefix(adapter_store: AdapterRepository) -> None:
    store = adapter_store
    for i in range(25):
        _put(store, f"p/{i:03d}", f"{i}".encode())
        _put(store, f"q{i:03d}", b"x")
    _put(store, "p/007", b"newer")
    seen, cursor = [], ""
    while page := store.index.list_latest(prefix="p/", after=cursor, limit=10):
        seen.extend(page)
        cursor = page[-1].adapter_id
    assert [r.adapter_id for r in seen] == [f"p/{i:03d}" for i in range(25)]
    assert next(r for r in seen if r.adapter_id == "p/007").version == 2


def test_a_namespaced_download_name_is_reserved() -> None:
    validate_adapter_id("download")
    with pytest.raises(InvalidAdapterIdError, match="other than 'download'"):
        validate_adapter_id("team/download")


def test_version_numbers_are_never_reused_after_deletes(adapter_store: AdapterRepository) -> None:
    store = adapter_store
    _put(store, "a", b"one")
    _put(store, "a", b"two")
    store.delete("a", 2)
    assert _put(store, "a", b"three").version == 3
    store.delete("a")
    assert _put(store, "a", b"four").version == 4


# Embedded backend only: these tests poke the SQLite backend's blob files and its directory lock.


def test_recovery_removes_orphans_and_temp_files_and_marks_broken_rows(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    kept, flipped, missing = (
        _put(store, "kept", b"k" * 100),
        _put(store, "flipped", b"f" * 100),
        _put(store, "gone", b"g"),
    )
    orphan = store.blobs.put(b"uploaded but never indexed")
    (store.blobs.tmp / "upload-half-written").write_bytes(b"partial")
    path = store.blobs.path(flipped.sha256)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    store.blobs.path(missing.sha256).unlink()
    store.close()

    reopened = AdapterStore(tmp_path)
    report = reopened.recovery
    assert report.temp_files_removed == 1 and report.orphan_blobs_removed == 1
    assert not reopened.blobs.path(orphan).exists()
    assert {(adapter_id, reason.split()[-1]) for adapter_id, _, reason in report.broken} == {
        ("flipped", "check"),
        ("gone", "missing"),
    }
    assert reopened.index.get("flipped").broken == f"blob {flipped.sha256} fails its sha256 check"
    assert reopened.index.get("kept").broken is None
    assert reopened.index.get("kept").sha256 == kept.sha256
    assert reopened.read(reopened.index.get("kept")) == b"k" * 100


def test_a_store_cannot_be_opened_twice_at_once(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(StoreLockedError, match="in use by another process"):
        AdapterStore(tmp_path)
    store.close()
    AdapterStore(tmp_path).close()
