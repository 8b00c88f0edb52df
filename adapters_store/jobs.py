"""SQLite (WAL, synchronous=FULL) persistence of fine-tuning jobs, their events and checkpoints: the embedded
:class:`adapters_store.interfaces.JobRepository`.

Every state change is committed before the API reports it, so a restart finds each job where
its last acknowledged change left it (docs/finetuning.md, "Restarts").

A checkpoint's optimizer state is a file under ``checkpoints/<job id>/`` next to ``jobs.sqlite3``, written
atomically (:func:`adapters_store.durable.write_atomically`) before its row is committed; the row keeps the
file's path (relative to ``checkpoints/``; older releases wrote absolute paths there, which still resolve)
and its sha256 (older rows have none and are read unchecked).

Leases are kept as the PostgreSQL store keeps them, but one process owns the directory (``.lock``): leases
found on open were a previous process's, and are dropped, so the start-time claim takes every job at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from adapters_store.durable import ensure_columns, lock_directory, write_atomically
from adapters_store.errors import BlobCorruptError, UnknownCursorError
from adapters_store.ids import new_id
from adapters_store.records import CheckpointRecord, EventRecord, JobRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed INTEGER NOT NULL,
    adapter_id TEXT NOT NULL,
    request TEXT NOT NULL,
    hyperparameters TEXT,
    adapter TEXT,
    fine_tuned_model TEXT,
    trained_tokens INTEGER,
    error TEXT,
    started_at INTEGER,
    finished_at INTEGER,
    estimated_finish INTEGER,
    step INTEGER NOT NULL DEFAULT 0,
    namespace TEXT
);
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events (job_id, seq);
CREATE TABLE IF NOT EXISTS job_checkpoints (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    step INTEGER NOT NULL,
    adapter_version INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    state_path TEXT
);
CREATE INDEX IF NOT EXISTS job_checkpoints_job ON job_checkpoints (job_id, step);
"""

_JSON_COLUMNS = ("request", "hyperparameters", "adapter", "error")
# Added after the first release; older databases get them on open.
_ADDED_JOB_COLUMNS = {
    "namespace": "TEXT",
    "owner": "TEXT",
    "lease_expires_at": "REAL",
    "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
}
_UNFINISHED = "status IN ('running', 'queued', 'validating_files')"
_CLAIM_ORDER = "CASE status WHEN 'running' THEN 0 WHEN 'queued' THEN 1 ELSE 2 END, created_at, rowid"


def _decode(row: sqlite3.Row, json_columns: tuple[str, ...]) -> dict[str, Any]:
    values = dict(row)
    for column in json_columns:
        if values.get(column) is not None:
            values[column] = json.loads(values[column])
    return values


def _job(row: sqlite3.Row) -> JobRecord:
    values = _decode(row, _JSON_COLUMNS)
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRecord(**values)


def _checkpoint(row: sqlite3.Row) -> CheckpointRecord:
    values = _decode(row, ("metrics",))
    values["has_state"] = values.pop("state_path") is not None
    del values["state_sha256"]
    return CheckpointRecord(**values)


class JobStore:
    """Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = lock_directory(path.parent, "job store")
        self._states = path.parent / "checkpoints"
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._connection.row_factory = sqlite3.Row
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.executescript(_SCHEMA)
        ensure_columns(self._connection, "jobs", _ADDED_JOB_COLUMNS)
        ensure_columns(self._connection, "job_checkpoints", {"state_sha256": "TEXT"})
        self._connection.execute("UPDATE jobs SET owner = NULL, lease_expires_at = NULL WHERE owner IS NOT NULL")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._connection.close()
        self._lock_file.close()

    def _execute(self, sql: str, parameters: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._connection.execute(sql, parameters)

    # -- jobs -----------------------------------------------------------------------------------

    def insert_job(
        self,
        *,
        job_id: str,
        model: str,
        training_file: str,
        validation_file: str | None,
        suffix: str | None,
        seed: int,
        adapter_id: str,
        request: dict[str, Any],
        adapter: dict[str, Any],
        namespace: str | None = None,
    ) -> JobRecord:
        self._execute(
            "INSERT INTO jobs (id, created_at, status, model, training_file, validation_file, suffix, seed, "
            "adapter_id, request, adapter, namespace) VALUES (?, ?, 'validating_files', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                int(time.time()),
                model,
                training_file,
                validation_file,
                suffix,
                seed,
                adapter_id,
                json.dumps(request, sort_keys=True),
                json.dumps(adapter, sort_keys=True),
                namespace,
            ),
        )
        job = self.get_job(job_id)
        assert job is not None
        return job

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        """Set ``fields`` (JSON columns take dicts) in one committed statement."""
        values = [
            json.dumps(value, sort_keys=True) if key in _JSON_COLUMNS and value is not None else value
            for key, value in fields.items()
        ]
        assignments = ", ".join(f"{key} = ?" for key in fields)
        self._execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, *, after: str | None = None, limit: int = 20, visible_to: str | None = None) -> list[JobRecord]:
        """Newest first; ``after`` is the last job id of the previous page.

        ``visible_to`` keeps the jobs a caller of that namespace may see: its own and un-owned ones.
        """
        visible = "(?1 IS NULL OR namespace IS NULL OR namespace = ?1)"
        if after is None:
            rows = self._execute(
                f"SELECT * FROM jobs WHERE {visible} ORDER BY created_at DESC, id DESC LIMIT ?2", (visible_to, limit)
            ).fetchall()
        elif self.get_job(after) is None:
            raise UnknownCursorError(f"no job {after!r} to list after")
        else:
            rows = self._execute(
                f"SELECT * FROM jobs WHERE {visible} AND (created_at, id) < "
                "(SELECT created_at, id FROM jobs WHERE id = ?3) ORDER BY created_at DESC, id DESC LIMIT ?2",
                (visible_to, limit, after),
            ).fetchall()
        return [_job(row) for row in rows]

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        placeholders = ", ".join("?" for _ in statuses)
        rows = self._execute(
            f"SELECT * FROM jobs WHERE status IN ({placeholders}) ORDER BY created_at, rowid", statuses
        ).fetchall()
        return [_job(row) for row in rows]

    def count_by_status(self) -> dict[str, int]:
        rows = self._execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {row["status"]: row["n"] for row in rows}

    # -- events ---------------------------------------------------------------------------------

    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
    ) -> EventRecord:
        created = int(time.time())
        cursor = self._execute(
            "INSERT INTO job_events (job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, created, level, type, message, None if data is None else json.dumps(data)),
        )
        return EventRecord(int(cursor.lastrowid or 0), job_id, created, level, type, message, data)

    def events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> list[EventRecord]:
        """Newest first (OpenAI's order); ``after`` is the last event id of the previous page."""
        before = None
        if after is not None:
            prefix, _, number = after.partition("-")
            if prefix != "ftevent" or not number.isdigit():
                raise UnknownCursorError(f"after={after!r} is not an event id (ftevent-N)")
            before = int(number)
        rows = self._execute(
            "SELECT * FROM job_events WHERE job_id = ? AND (? IS NULL OR seq < ?) ORDER BY seq DESC LIMIT ?",
            (job_id, before, before, limit),
        ).fetchall()
        return [EventRecord(**_decode(row, ("data",))) for row in rows]

    # -- checkpoints ----------------------------------------------------------------------------

    def add_checkpoint(
        self, job_id: str, *, step: int, adapter_version: int, metrics: dict[str, Any], state: bytes | None
    ) -> CheckpointRecord:
        record = CheckpointRecord(
            new_id("ftckpt"), job_id, int(time.time()), step, adapter_version, metrics, state is not None
        )
        state_path = sha256 = None
        if state is not None:
            directory = self._states / job_id
            directory.mkdir(parents=True, exist_ok=True)
            state_path = f"{job_id}/step-{step}.safetensors"
            write_atomically(self._states / state_path, state, directory)
            sha256 = hashlib.sha256(state).hexdigest()
        self._execute(
            "INSERT INTO job_checkpoints (id, job_id, created_at, step, adapter_version, metrics, state_path, "
            "state_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.id, job_id, record.created_at, step, adapter_version, json.dumps(metrics), state_path, sha256),
        )
        return record

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """Newest (highest step) first."""
        rows = self._execute("SELECT * FROM job_checkpoints WHERE job_id = ? ORDER BY step DESC", (job_id,)).fetchall()
        return [_checkpoint(row) for row in rows]

    def checkpoint_state(self, checkpoint_id: str) -> bytes | None:
        row = self._execute(
            "SELECT state_path, state_sha256 FROM job_checkpoints WHERE id = ?", (checkpoint_id,)
        ).fetchone()
        if row is None or row["state_path"] is None:
            return None
        try:
            data = (self._states / row["state_path"]).read_bytes()
        except FileNotFoundError:
            return None
        if row["state_sha256"] is not None and hashlib.sha256(data).hexdigest() != row["state_sha256"]:
            raise BlobCorruptError(f"the optimizer state of checkpoint {checkpoint_id} fails its sha256 check")
        return data

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        row = self._execute(
            "DELETE FROM job_checkpoints WHERE id = ? RETURNING state_path", (checkpoint_id,)
        ).fetchone()
        if row is not None and row["state_path"] is not None:
            (self._states / row["state_path"]).unlink(missing_ok=True)

    def clear_states(self, job_id: str) -> None:
        self._execute("UPDATE job_checkpoints SET state_path = NULL, state_sha256 = NULL WHERE job_id = ?", (job_id,))
        shutil.rmtree(self._states / job_id, ignore_errors=True)

    # -- leases ---------------------------------------------------------------------------------

    def claim_jobs(self, owner: str, *, lease_seconds: float, limit: int) -> list[JobRecord]:
        with self._lock:
            now = time.time()
            rows = self._connection.execute(
                f"UPDATE jobs SET owner = ?, lease_expires_at = ? WHERE id IN (SELECT id FROM jobs WHERE {_UNFINISHED} "
                f"AND (owner IS NULL OR lease_expires_at < ?) ORDER BY {_CLAIM_ORDER} LIMIT ?) RETURNING id",
                (owner, now + lease_seconds, now, limit),
            ).fetchall()
            claimed = {row["id"] for row in rows}
            ordered = self._connection.execute(f"SELECT * FROM jobs WHERE owner = ? ORDER BY {_CLAIM_ORDER}", (owner,))
            return [_job(row) for row in ordered if row["id"] in claimed]

    def claim_job(self, job_id: str, owner: str, *, lease_seconds: float) -> JobRecord | None:
        now = time.time()
        row = self._execute(
            f"UPDATE jobs SET owner = ?1, lease_expires_at = ?2 WHERE id = ?3 AND {_UNFINISHED} "
            "AND (owner IS NULL OR owner = ?1 OR lease_expires_at < ?4) RETURNING *",
            (owner, now + lease_seconds, job_id, now),
        ).fetchone()
        return _job(row) if row else None

    def renew_lease(self, job_id: str, owner: str, *, lease_seconds: float) -> JobRecord | None:
        row = self._execute(
            "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND owner = ? RETURNING *",
            (time.time() + lease_seconds, job_id, owner),
        ).fetchone()
        return _job(row) if row else None

    def release_lease(self, job_id: str, owner: str) -> None:
        self._execute(
            "UPDATE jobs SET owner = NULL, lease_expires_at = NULL WHERE id = ? AND owner = ?", (job_id, owner)
        )
