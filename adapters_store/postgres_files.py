"""Training files (``/v1/files``) in the PostgreSQL store: a :class:`adapters_store.interfaces.FileRepository`
that every replica on the database shares.

- The bytes are ``bytea`` rows of ``training_file_blobs`` keyed by sha256 (files are at most
  ``--max-training-file-bytes``, 100 MiB by default; ``bytea`` holds up to 1 GiB), checked against it on every
  read: a mismatch or a missing row marks the file broken, as the embedded store does (:class:`FileBrokenError`).
- Each upload is its own ``file-`` id; identical bytes share one blob row. A put writes the blob and the file's
  row in one transaction, and a delete drops the blob with its last file, both under the blob's advisory lock
  (the adapter store's rule), so a delete never removes bytes a concurrent put is about to refer to.
  Uploading the same bytes again replaces a stored copy that fails its sha256.
- Listing is newest first by ``seq`` (a sequence: upload order, never reused), as the SQLite ``seq``.
"""

from __future__ import annotations

import hashlib
import logging
import time

from adapters_store.errors import FileBrokenError, UnknownCursorError
from adapters_store.ids import new_id
from adapters_store.postgres import StoreConnection, lock_blob, migrate
from adapters_store.records import FileRecord

logger = logging.getLogger(__name__)

_COLUMNS = "id, filename, purpose, bytes, sha256, created_at, examples, broken, namespace, public"


class PostgresFileStore:
    """Training files in the database at ``url``; one connection behind a lock, as the adapter store."""

    def __init__(self, url: str):
        self._connection = StoreConnection(url)
        self.schema_version = migrate(self._connection)

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
        sha256 = hashlib.sha256(data).hexdigest()
        with self._connection.transaction() as db:
            lock_blob(db, sha256)
            db.execute(
                """INSERT INTO training_file_blobs VALUES (%s, %s) ON CONFLICT (sha256) DO UPDATE
                   SET data = EXCLUDED.data
                   WHERE sha256(training_file_blobs.data) <> decode(training_file_blobs.sha256, 'hex')""",
                (sha256, data),
            )
            row = db.execute(
                f"""INSERT INTO training_files ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, %s, %s)
                    RETURNING {_COLUMNS}""",
                (new_id("file"), filename, purpose, len(data), sha256, int(time.time()), examples, namespace, public),
            ).fetchone()
        record = FileRecord(**row)
        logger.info("training file stored id=%s bytes=%d examples=%d", record.id, record.bytes, examples)
        return record

    def get(self, file_id: str) -> FileRecord | None:
        with self._connection.session() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM training_files WHERE id = %s", (file_id,)).fetchone()
        return FileRecord(**row) if row else None

    def list(
        self, *, purpose: str | None = None, after: str | None = None, limit: int = 100, visible_to: str | None = None
    ) -> list[FileRecord]:
        with self._connection.session() as db:
            before = None
            if after is not None:
                row = db.execute("SELECT seq FROM training_files WHERE id = %s", (after,)).fetchone()
                if row is None:
                    raise UnknownCursorError(f"no file {after!r} to list after")
                before = row["seq"]
            rows = db.execute(
                f"""SELECT {_COLUMNS} FROM training_files
                    WHERE (%(purpose)s::text IS NULL OR purpose = %(purpose)s)
                      AND (%(before)s::bigint IS NULL OR seq < %(before)s)
                      AND (%(namespace)s::text IS NULL OR namespace IS NULL OR namespace = %(namespace)s OR public)
                    ORDER BY seq DESC LIMIT %(limit)s""",
                {"purpose": purpose, "before": before, "namespace": visible_to, "limit": limit},
            ).fetchall()
        return [FileRecord(**row) for row in rows]

    def read(self, record: FileRecord) -> bytes:
        if record.broken:
            raise FileBrokenError(f"training file {record.id} is broken ({record.broken}); upload it again")
        with self._connection.session() as db:
            row = db.execute("SELECT data FROM training_file_blobs WHERE sha256 = %s", (record.sha256,)).fetchone()
        if row is None:
            reason = f"blob {record.sha256} is missing"
        elif hashlib.sha256(data := bytes(row["data"])).hexdigest() != record.sha256:
            reason = f"blob {record.sha256} fails its sha256 check"
        else:
            return data
        with self._connection.session() as db:
            db.execute("UPDATE training_files SET broken = %s WHERE id = %s", (reason, record.id))
        logger.error("training file broken id=%s reason=%s", record.id, reason)
        raise FileBrokenError(f"training file {record.id} is broken ({reason}); upload it again")

    def delete(self, file_id: str) -> bool:
        with self._connection.transaction() as db:
            row = db.execute("DELETE FROM training_files WHERE id = %s RETURNING sha256", (file_id,)).fetchone()
            if row is None:
                return False
            lock_blob(db, row["sha256"])
            db.execute(
                """DELETE FROM training_file_blobs b WHERE b.sha256 = %s
                   AND NOT EXISTS (SELECT 1 FROM training_files f WHERE f.sha256 = b.sha256)""",
                (row["sha256"],),
            )
        logger.info("training file deleted id=%s", file_id)
        return True

    def close(self) -> None:
        self._connection.close()
