"""The training file store: round trips, shared blobs, paging, damaged bytes; recovery on open (embedded).

The tests taking ``backend`` run against both backends: the embedded one (SQLite and blob files in a temp dir)
and PostgreSQL (a fresh database on the session's throwaway cluster), each with a way to see and damage its
stored bytes from outside. The tests under "Embedded backend only" poke the SQLite backend's files and lock.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from adapters_store.errors import FileBrokenError, StoreLockedError, UnknownCursorError
from adapters_store.files import FileStore
from adapters_store.interfaces import FileRepository
from adapters_store.postgres_files import PostgresFileStore
from adapters_store.records import FileRecord

pytest_plugins = ["tests.postgres_fixtures"]
DATA = b'{"prompt": "a", "completion": "b"}\n'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "files"


@dataclass
class Backend:
    """A store and the bytes it holds, seen from outside it: a blob directory, or a database."""

    store: FileRepository
    root: Path | None = None
    database: str | None = None

    def blobs(self) -> list[str]:
        if self.root is not None:
            return [path.name for path in blob_files(self.root)]
        with psycopg.connect(self.database) as db:
            return [row[0] for row in db.execute("SELECT sha256 FROM training_file_blobs ORDER BY sha256")]

    def overwrite(self, sha256: str, data: bytes) -> None:
        if self.root is not None:
            (self.root / "blobs" / sha256[:2] / sha256).write_bytes(data)
            return
        with psycopg.connect(self.database, autocommit=True) as db:
            db.execute("UPDATE training_file_blobs SET data = %s WHERE sha256 = %s", (data, sha256))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, root: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        backend = Backend(FileStore(root), root=root)
    else:
        from tests.postgres_fixtures import fresh_database

        database = fresh_database(request.getfixturevalue("postgres_url"))
        backend = Backend(PostgresFileStore(database), database=database)
    yield backend
    backend.store.close()


@pytest.fixture
def store(backend: Backend) -> FileRepository:
    return backend.store


def put(store: FileRepository, data: bytes = DATA, **fields) -> FileRecord:
    return store.put(data, **{"filename": "train.jsonl", "purpose": "fine-tune", "examples": 1, **fields})


def blob_files(root: Path) -> list[Path]:
    return sorted(path for path in (root / "blobs").glob("??/*") if path.is_file())


def test_put_get_read_and_delete(store: FileRepository, backend: Backend) -> None:
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
    assert backend.blobs() == []
    assert store.get("file-000000000000000000000000") is None


def test_identical_bytes_are_two_files_sharing_one_blob_until_the_last_goes(
    store: FileRepository, backend: Backend
) -> None:
    first, second = put(store, filename="a.jsonl"), put(store, filename="b.jsonl")
    assert first.id != second.id and first.sha256 == second.sha256
    assert len(backend.blobs()) == 1
    assert store.delete(first.id)
    assert store.read(second) == DATA and len(backend.blobs()) == 1
    assert store.delete(second.id)
    assert backend.blobs() == []


def test_visibility_keeps_a_namespace_its_own_unowned_and_public_files(store: FileRepository) -> None:
    mine, theirs, public, unowned = (
        put(store, namespace="me"),
        put(store, namespace="them"),
        put(store, namespace="them", public=True),
        put(store),
    )
    assert [record.id for record in store.list(visible_to="me")] == [unowned.id, public.id, mine.id]
    assert [record.id for record in store.list()] == [unowned.id, public.id, theirs.id, mine.id]
    assert store.get(public.id).public is True  # type: ignore[union-attr]


def test_a_blob_damaged_while_open_is_caught_at_read_and_marked_broken(store: FileRepository, backend: Backend) -> None:
    record = put(store)
    backend.overwrite(record.sha256, b"something else")
    with pytest.raises(FileBrokenError, match="fails its sha256 check"):
        store.read(record)
    broken = store.get(record.id)
    assert broken is not None and broken.broken == f"blob {record.sha256} fails its sha256 check"
    with pytest.raises(FileBrokenError, match="upload it again"):
        store.read(broken)
    fresh = put(store)
    assert fresh.sha256 == record.sha256 and store.read(fresh) == DATA, "uploading the bytes again repairs them"


def test_listing_is_newest_first_filtered_by_purpose_and_paged_after_an_id(store: FileRepository) -> None:
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


# -- Embedded backend only --------------------------------------------------------------------------


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
