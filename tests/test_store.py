"""The adapter store on real files and SQLite: versions, ids, pagination and crash recovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store.errors import StoreLockedError
from adapters_store.ids import InvalidAdapterIdError, parse_ref, validate_adapter_id
from adapters_store.store import AdapterStore


def _put(store: AdapterStore, adapter_id: str, data: bytes):
    return store.put(adapter_id, data, method="fourierft", n_params=10, source_format="native", base_model="m")


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


def test_versions_latest_pinning_and_delete(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    first, second = _put(store, "team/a", b"one"), _put(store, "team/a", b"two")
    assert (first.version, second.version) == (1, 2)
    assert store.read(store.index.get("team/a")) == b"two"
    assert store.read(store.index.get("team/a", 1)) == b"one"
    store.delete("team/a", 2)
    assert store.index.get("team/a").version == 1
    assert not store.blobs.path(second.sha256).exists()
    store.delete("team/a")
    assert store.index.get("team/a") is None and store.blobs.all_hashes() == set()


def test_shared_blob_survives_until_its_last_version_goes(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    a, b = _put(store, "a", b"same"), _put(store, "b", b"same")
    assert a.sha256 == b.sha256
    store.delete("a")
    assert store.read(store.index.get("b")) == b"same"


def test_listing_pages_through_every_id_with_prefix(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
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


def test_a_namespaced_download_name_is_reserved() -> None:
    validate_adapter_id("download")
    with pytest.raises(InvalidAdapterIdError, match="other than 'download'"):
        validate_adapter_id("team/download")


def test_version_numbers_are_never_reused_after_deletes(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    _put(store, "a", b"one")
    _put(store, "a", b"two")
    store.delete("a", 2)
    assert _put(store, "a", b"three").version == 3
    store.delete("a")
    assert _put(store, "a", b"four").version == 4
