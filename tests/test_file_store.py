"""The training file store on a real directory: round trips, shared blobs, paging, recovery on open."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_store.errors import FileBrokenError, StoreLockedError, UnknownCursorError
from adapters_store.files import FileStore
from adapters_store.records import FileRecord

DATA = b'{"prompt": "a", "completion": "b"}\n'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "files"


@pytest.fixture
def store(root: Path) -> Iterator[FileStore]:
    files = FileStore(root)
    yield files
    files.close()


def put(store: FileStore, data: bytes = DATA, **fields) -> FileRecord:
    return store.put(data, **{"filename": "train.jsonl", "purpose": "fine-tune", "examples": 1, **fields})


def blob_files(root: Path) -> list[Path]:
    return sorted(path for path in (root / "blobs").glob("??/*") if path.is_file())


def test_put_get_read_and_delete(store: FileStore, root: Path) -> None:
    before = int(time.time())
    record = put(store, examples=3)
    assert re.fullmatch(r"file-[0-9a-f]{24}", record.id)
    assert record == FileRecord(
        id=record.id,
        filename="train.jsonl",
        purpose="fine-tune",
        bytes=len(DATA),
        sha256=hashlib.sha256(DATA).hexdigest(),
        created_at=record.created_at,
        examples=3,
        broken=None,
    )
    assert isinstance(record.created_at, int) and before <= record.created_at <= int(time.time())
    assert store.get(record.id) == record
    assert store.read(record) == DATA
    assert store.delete(record.id) is True
    assert store.get(record.id) is None and store.delete(record.id) is False
    assert blob_files(root) == []
    assert store.get("file-000000000000000000000000") is None


def test_identical_bytes_are_two_files_sharing_one_blob_until_the_last_goes(store: FileStore, root: Path) -> None:
    first, second = put(store, filename="a.jsonl"), put(store, filename="b.jsonl")
    assert first.id != second.id and first.sha256 == second.sha256
    assert len(blob_files(root)) == 1
    assert store.delete(first.id)
    assert store.read(second) == DATA and len(blob_files(root)) == 1
    assert store.delete(second.id)
    assert blob_files(root) == []


def test_listing_is_newest_first_filtered_by_purpose_and_paged_after_an_id(store: FileStore) -> None:
    records = [put(store, f"{index}\n".encode(), purpose="fine-tune" if index != 3 else "other") for index in range(7)]
    newest_first = [record.id for record in reversed(records)]
    assert [record.id for record in store.list()] == newest_first
    fine_tune = [record_id for record_id in newest_first if record_id != records[3].id]
    assert [record.id for record in store.list(purpose="fine-tune")] == fine_tune
    assert [record.id for record in store.list(purpose="batch")] == []

    pages, after = [], None
    while page := store.list(purpose="fine-tune", after=after, limit=4):
        pages.append([record.id for record in page])
        after = page[-1].id
    assert pages == [fine_tune[:4], fine_tune[4:]]

    store.delete(records[2].id)
    with pytest.raises(UnknownCursorError, match=records[2].id):
        store.list(after=records[2].id)


def test_reopening_keeps_every_file_and_a_second_open_is_refused(root: Path) -> None:
    store = FileStore(root)
    records = [put(store, f"{index}\n".encode(), filename=f"{index}.jsonl", examples=index) for index in range(3)]
    with pytest.raises(StoreLockedError, match="in use by another process"):
        FileStore(root)
    store.close()
    reopened = FileStore(root)
    try:
        assert reopened.list() == list(reversed(records))
        assert [reopened.read(record) for record in records] == [f"{index}\n".encode() for index in range(3)]
        assert reopened.recovery.temp_files_removed == reopened.recovery.orphan_blobs_removed == 0
        assert reopened.recovery.broken == []
        newer = put(reopened)
        assert reopened.list(limit=1) == [newer], "ids made after a restart still list first"
    finally:
        reopened.close()


def test_recovery_removes_temp_files_and_orphans_and_marks_damaged_blobs_broken(root: Path) -> None:
    store = FileStore(root)
    flipped, missing, intact = (put(store, f"{name}\n".encode()) for name in ("flipped", "missing", "intact"))
    orphan = store.blobs.put(b"bytes no row refers to")
    store.close()
    (root / "blobs" / "tmp" / "upload-crashed").write_bytes(b"half a file")
    path = root / "blobs" / flipped.sha256[:2] / flipped.sha256
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    (root / "blobs" / missing.sha256[:2] / missing.sha256).unlink()

    store = FileStore(root)
    try:
        report = store.recovery
        assert (report.temp_files_removed, report.orphan_blobs_removed) == (1, 1)
        assert dict(report.broken) == {
            flipped.id: f"blob {flipped.sha256} fails its sha256 check",
            missing.id: f"blob {missing.sha256} is missing",
        }
        assert list((root / "blobs" / "tmp").iterdir()) == []
        assert not store.blobs.path(orphan).exists()
        for record in (flipped, missing):
            stored = store.get(record.id)
            assert stored is not None and stored.broken == dict(report.broken)[record.id]
            with pytest.raises(FileBrokenError, match=f"training file {record.id} is broken .*; upload it again"):
                store.read(stored)
        assert store.read(store.get(intact.id)) == b"intact\n"  # type: ignore[arg-type]
    finally:
        store.close()


def test_a_blob_damaged_while_open_is_caught_at_read_and_marked_broken(store: FileStore, root: Path) -> None:
    record = put(store)
    store.blobs.path(record.sha256).write_bytes(b"something else")
    with pytest.raises(FileBrokenError, match="fails its sha256 check"):
        store.read(record)
    assert store.get(record.id).broken == f"blob {record.sha256} fails its sha256 check"  # type: ignore[union-attr]
