"""Durable storage of uploaded training files (``/v1/files``): blob first, index row second, recovery on open.

The guarantees are the adapter store's (``docs/store.md``): the bytes go through :class:`BlobStore`
(temp file, fsync, rename, directory fsync) and the row in ``files.sqlite3`` (WAL,
``synchronous=FULL``) is committed last, so a crash leaves either nothing visible or a complete
file. Identical uploads are separate ids sharing one blob; the blob goes with its last row.

Listing is newest first, by upload order (an autoincrement sequence, never reused), not by
``created_at``: seconds tie, and a clock step must not reorder pages. The cursor ``after`` is a
file id; paging continues strictly after that file's position.

:class:`FileStore` is the embedded :class:`adapters_store.interfaces.FileRepository`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adapters_store.blobs import BlobStore
from adapters_store.durable import ensure_columns, lock_directory
from adapters_store.errors import BlobCorruptError, FileBrokenError, UnknownCursorError
from adapters_store.ids import new_id
from adapters_store.records import FileRecord

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    broken TEXT,
    namespace TEXT,
    public INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
"""
_COLUMNS = "id, filename, purpose, bytes, sha256, created_at, examples, broken, namespace, public"
# Added after the first release; older files.sqlite3 get them on open.
_ADDED_COLUMNS = {"namespace": "TEXT", "public": "INTEGER NOT NULL DEFAULT 0"}


def _record(row: sqlite3.Row) -> FileRecord:
    values = dict(row)
    values["public"] = bool(values["public"])
    return FileRecord(**values)


@dataclass(frozen=True)
class FileRecoveryReport:
    temp_files_removed: int
    orphan_blobs_removed: int
    broken: list[tuple[str, str]]


class FileStore:
    """Thread-safe: one SQLite connection behind a lock, and a second lock pairing blob and row changes."""

    def __init__(self, root: Path):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = lock_directory(root, "file store")
        self._lock = threading.Lock()
        # Orders "blob present, then row committed" against "row deleted, then blob removed" when two
        # files share one blob.
        self._blob_lock = threading.Lock()
        self.blobs = BlobStore(root / "blobs")
        self._db = sqlite3.connect(root / "files.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        ensure_columns(self._db, "files", _ADDED_COLUMNS)
        self.recovery = self._recover()

    def _recover(self) -> FileRecoveryReport:
        temp_files = self.blobs.clear_temp_files()
        with self._lock:
            records = [_record(row) for row in self._db.execute(f"SELECT {_COLUMNS} FROM files")]
        orphans = self.blobs.all_hashes() - {record.sha256 for record in records}
        for sha256 in orphans:
            self.blobs.remove(sha256)
        problems = {sha256: self.blobs.verify(sha256) for sha256 in {record.sha256 for record in records}}
        broken = []
        for record in records:
            problem = problems[record.sha256]
            if problem != record.broken:
                self._mark_broken(record.id, problem)
            if problem:
                broken.append((record.id, problem))
                logger.error("training file broken id=%s reason=%s", record.id, problem)
        logger.info(
            "file store recovered files=%d temp_removed=%d orphans_removed=%d broken=%d",
            len(records),
            temp_files,
            len(orphans),
            len(broken),
        )
        return FileRecoveryReport(temp_files, len(orphans), broken)

    def _mark_broken(self, file_id: str, reason: str | None) -> None:
        with self._lock:
            self._db.execute("UPDATE files SET broken = ? WHERE id = ?", (reason, file_id))

    def put(
        self,
        data: bytes,
        *,
        filename: str,
        purpose: str,
        examples: int,
        namespace: str | None = None,
        public: bool = False,
    ) -> FileRecord:
        """Store a validated file under a new id, owned by ``namespace``; durable when this returns."""
        sha256 = self.blobs.put(data)
        record = FileRecord(
            id=new_id("file"),
            filename=filename,
            purpose=purpose,
            bytes=len(data),
            sha256=sha256,
            created_at=int(time.time()),
            examples=examples,
            broken=None,
            namespace=namespace,
            public=public,
        )
        with self._blob_lock:
            # A delete of another file with these bytes may have removed the blob since it was written.
            if not self.blobs.path(sha256).exists():
                self.blobs.put(data)
            with self._lock:
                self._db.execute(
                    f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                    (record.id, filename, purpose, len(data), sha256, record.created_at, examples, namespace, public),
                )
        logger.info("training file stored id=%s bytes=%d examples=%d", record.id, record.bytes, examples)
        return record

    def get(self, file_id: str) -> FileRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
        return _record(row) if row else None

    def list(
        self, *, purpose: str | None = None, after: str | None = None, limit: int = 100, visible_to: str | None = None
    ) -> list[FileRecord]:
        """Newest first; ``after`` is the last id of the previous page (:class:`UnknownCursorError` if gone).

        ``visible_to`` keeps the files a caller of that namespace may see: its own, un-owned and public ones.
        """
        with self._lock:
            before = None
            if after is not None:
                row = self._db.execute("SELECT seq FROM files WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise UnknownCursorError(f"no file {after!r} to list after")
                before = row[0]
            rows = self._db.execute(
                f"""SELECT {_COLUMNS} FROM files WHERE (?1 IS NULL OR purpose = ?1) AND (?2 IS NULL OR seq < ?2)
                    AND (?4 IS NULL OR namespace IS NULL OR namespace = ?4 OR public = 1)
                    ORDER BY seq DESC LIMIT ?3""",
                (purpose, before, limit, visible_to),
            ).fetchall()
        return [_record(row) for row in rows]

    def read(self, record: FileRecord) -> bytes:
        """The stored bytes, checked against the sha256; a failed check marks the file broken."""
        if record.broken:
            raise FileBrokenError(f"training file {record.id} is broken ({record.broken}); upload it again")
        try:
            return self.blobs.get(record.sha256)
        except (BlobCorruptError, FileNotFoundError) as error:
            reason = str(error) if isinstance(error, BlobCorruptError) else f"blob {record.sha256} is missing"
            self._mark_broken(record.id, reason)
            logger.error("training file broken id=%s reason=%s", record.id, reason)
            raise FileBrokenError(f"training file {record.id} is broken ({reason}); upload it again") from error

    def delete(self, file_id: str) -> bool:
        """False when there is no such file; the blob goes when no other file shares it."""
        with self._blob_lock:
            with self._lock:
                row = self._db.execute("DELETE FROM files WHERE id = ? RETURNING sha256", (file_id,)).fetchone()
                if row is None:
                    return False
                shared = self._db.execute("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (row[0],)).fetchone()
            if shared is None:
                self.blobs.remove(row[0])
        logger.info("training file deleted id=%s", file_id)
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()
