"""SQLite (WAL) index of adapter versions, the embedded :class:`adapters_store.interfaces.AdapterCatalog`; the
blob bytes live in :class:`BlobStore`."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from adapters_store.durable import ensure_columns
from adapters_store.records import AdapterRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapter_versions (
    adapter_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    method TEXT NOT NULL,
    n_params INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    source_format TEXT NOT NULL,
    base_model TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    broken TEXT,
    pinned INTEGER NOT NULL DEFAULT 0,
    public INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (adapter_id, version)
);
CREATE INDEX IF NOT EXISTS adapter_versions_sha ON adapter_versions (sha256);
CREATE TABLE IF NOT EXISTS adapter_ids (
    adapter_id TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
);
"""
# Which versions a caller of namespace :namespace may see (NULL: every one): its own ids, the server's
# un-namespaced ones, and public ones.
_VISIBLE = """(:namespace IS NULL OR instr(v.adapter_id, '/') = 0 OR v.public = 1
              OR substr(v.adapter_id, 1, length(:namespace) + 1) = :namespace || '/')"""


def _record(row: sqlite3.Row) -> AdapterRecord:
    values = dict(row)
    values["metadata"] = json.loads(values["metadata"])
    values["pinned"] = bool(values["pinned"])
    values["public"] = bool(values["public"])
    return AdapterRecord(**values)


class AdapterIndex:
    """Thread-safe: one connection guarded by a lock (writes are tiny; SQLite serialises them anyway)."""

    def __init__(self, path: Path):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        ensure_columns(self._db, "adapter_versions", {"public": "INTEGER NOT NULL DEFAULT 0"})

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_version(
        self,
        adapter_id: str,
        *,
        sha256: str,
        method: str,
        n_params: int,
        size_bytes: int,
        source_format: str,
        base_model: str,
        description: str = "",
        metadata: dict[str, Any] | None = None,
        pinned: bool = False,
        public: bool = False,
    ) -> AdapterRecord:
        """Commit the next version of ``adapter_id``; returns its record once durable."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # Numbers are never reused, even after deletes: a client holding id@N must never get other bytes.
                row = self._db.execute(
                    """INSERT INTO adapter_ids VALUES (?, 1)
                       ON CONFLICT (adapter_id) DO UPDATE SET last_version = last_version + 1
                       RETURNING last_version""",
                    (adapter_id,),
                ).fetchone()
                version = int(row[0])
                self._db.execute(
                    """INSERT INTO adapter_versions (adapter_id, version, sha256, method, n_params, size_bytes,
                       source_format, base_model, description, metadata, created_at, pinned, public)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        adapter_id,
                        version,
                        sha256,
                        method,
                        n_params,
                        size_bytes,
                        source_format,
                        base_model,
                        description,
                        json.dumps(metadata or {}),
                        time.time(),
                        int(pinned),
                        int(public),
                    ),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._get_locked(adapter_id, version)  # type: ignore[return-value]

    def _get_locked(self, adapter_id: str, version: int | None) -> AdapterRecord | None:
        if version is None:
            row = self._db.execute(
                "SELECT * FROM adapter_versions WHERE adapter_id = ? ORDER BY version DESC LIMIT 1", (adapter_id,)
            ).fetchone()
        else:
            row = self._db.execute(
                "SELECT * FROM adapter_versions WHERE adapter_id = ? AND version = ?", (adapter_id, version)
            ).fetchone()
        return _record(row) if row else None

    def get(self, adapter_id: str, version: int | None = None) -> AdapterRecord | None:
        """A version, or the latest one when ``version`` is None."""
        with self._lock:
            return self._get_locked(adapter_id, version)

    def list_latest(
        self, *, prefix: str = "", after: str = "", limit: int = 100, visible_to: str | None = None
    ) -> list[AdapterRecord]:
        """Latest version of each id starting with ``prefix``, ids after the cursor ``after``, in id order.

        ``visible_to`` keeps the ids a caller of that namespace may see: its own, the server's
        un-namespaced ones, and those whose latest version is public.
        """
        with self._lock:
            rows = self._db.execute(
                f"""SELECT v.* FROM adapter_versions v
                   JOIN (SELECT adapter_id, MAX(version) AS version FROM adapter_versions
                         WHERE adapter_id >= :prefix AND adapter_id > :after
                               AND substr(adapter_id, 1, :prefix_length) = :prefix
                         GROUP BY adapter_id) latest
                   USING (adapter_id, version)
                   WHERE {_VISIBLE} ORDER BY v.adapter_id LIMIT :limit""",
                {
                    "prefix": prefix,
                    "after": after,
                    "prefix_length": len(prefix),
                    "namespace": visible_to,
                    "limit": limit,
                },
            ).fetchall()
        return [_record(row) for row in rows]

    def latest_ids(self, *, visible_to: str | None = None) -> list[str]:
        """Ids whose latest version is servable (not broken), in id order; ``visible_to`` as in :meth:`list_latest`."""
        with self._lock:
            rows = self._db.execute(
                f"""SELECT v.adapter_id FROM adapter_versions v
                   JOIN (SELECT adapter_id, MAX(version) AS version FROM adapter_versions GROUP BY adapter_id) latest
                   USING (adapter_id, version) WHERE v.broken IS NULL AND {_VISIBLE} ORDER BY v.adapter_id""",
                {"namespace": visible_to},
            ).fetchall()
        return [row[0] for row in rows]

    def count_ids(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(DISTINCT adapter_id) FROM adapter_versions").fetchone()[0])

    def pinned_records(self) -> list[AdapterRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM adapter_versions WHERE pinned = 1 ORDER BY adapter_id").fetchall()
        return [_record(row) for row in rows]

    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM adapter_versions WHERE adapter_id = ? ORDER BY version", (adapter_id,)
            ).fetchall()
        return [_record(row) for row in rows]

    def delete(self, adapter_id: str, version: int | None = None) -> list[AdapterRecord]:
        """Delete one version or all of them; returns what was deleted."""
        with self._lock:
            if version is None:
                where, params = "adapter_id = ?", (adapter_id,)
            else:
                where, params = "adapter_id = ? AND version = ?", (adapter_id, version)
            rows = self._db.execute(f"SELECT * FROM adapter_versions WHERE {where}", params).fetchall()
            self._db.execute(f"DELETE FROM adapter_versions WHERE {where}", params)
        return [_record(row) for row in rows]

    def sha_in_use(self, sha256: str) -> bool:
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM adapter_versions WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
                is not None
            )

    def all_records(self) -> list[AdapterRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM adapter_versions ORDER BY adapter_id, version").fetchall()
        return [_record(row) for row in rows]

    def mark_broken(self, adapter_id: str, version: int, reason: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE adapter_versions SET broken = ? WHERE adapter_id = ? AND version = ?",
                (reason, adapter_id, version),
            )
