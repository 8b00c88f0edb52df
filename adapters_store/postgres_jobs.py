"""Fine-tuning jobs, their events and checkpoints in the PostgreSQL store: a
:class:`adapters_store.interfaces.JobRepository` that every replica on the database shares.

- Rows mirror the SQLite job store's (JSON columns as ``jsonb``); ``jobs.seq`` and ``job_events.seq`` are
  sequences, so insertion order is kept and event ids are never reused.
- A checkpoint's optimizer state is ``bytea`` in its row, with its sha256 checked on read: the replica that
  resumes a job is usually not the one that wrote it.
- Leases: ``owner`` is the replica training the job and ``lease_expires_at`` when its lease ends, in seconds
  of the database's clock (``clock_timestamp()``), so replicas' clocks never have to agree. A claim is
  ``SELECT ... FOR UPDATE SKIP LOCKED`` of unfinished jobs whose lease is free or past, updated in the same
  statement: replicas claiming together skip each other's rows and get disjoint jobs. A renewal (the
  heartbeat) and a release only touch a row the caller still owns.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from typing import Any

from psycopg.types.json import Jsonb

from adapters_store.errors import BlobCorruptError, UnknownCursorError
from adapters_store.ids import new_id
from adapters_store.postgres import DATABASE_NOW, StoreConnection, migrate
from adapters_store.records import CheckpointRecord, EventRecord, JobRecord

_JOB_COLUMNS = ", ".join(field.name for field in fields(JobRecord))
_JSON_COLUMNS = frozenset({"request", "hyperparameters", "adapter", "error"})
_CHECKPOINT_COLUMNS = "id, job_id, created_at, step, adapter_version, metrics, state IS NOT NULL AS has_state"
_UNFINISHED = "status IN ('running', 'queued', 'validating_files')"
_CLAIM_ORDER = "CASE status WHEN 'running' THEN 0 WHEN 'queued' THEN 1 ELSE 2 END, created_at, seq"
_EPOCH = "extract(epoch FROM clock_timestamp())::bigint"


def _json(column: str, value: Any) -> Any:
    return Jsonb(value) if column in _JSON_COLUMNS and value is not None else value


class PostgresJobStore:
    """Jobs in the database at ``url``; one connection behind a lock, as the adapter store."""

    def __init__(self, url: str):
        self._connection = StoreConnection(url)
        self.schema_version = migrate(self._connection)

    def close(self) -> None:
        self._connection.close()

    def _one(self, sql: str, parameters: Any = ()) -> dict[str, Any] | None:
        with self._connection.session() as db:
            return db.execute(sql, parameters).fetchone()

    def _execute(self, sql: str, parameters: Any = ()) -> None:
        with self._connection.session() as db:
            db.execute(sql, parameters)

    def _all(self, sql: str, parameters: Any = ()) -> list[dict[str, Any]]:
        with self._connection.session() as db:
            return db.execute(sql, parameters).fetchall()

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
        row = self._one(
            f"""INSERT INTO jobs (id, created_at, status, model, training_file, validation_file, suffix, seed,
                                  adapter_id, request, adapter, namespace)
                VALUES (%s, {_EPOCH}, 'validating_files', %s, %s, %s, %s, %s, %s, %s, %s, %s)
                RETURNING {_JOB_COLUMNS}""",
            (
                job_id,
                model,
                training_file,
                validation_file,
                suffix,
                seed,
                adapter_id,
                Jsonb(request),
                Jsonb(adapter),
                namespace,
            ),
        )
        assert row is not None
        return JobRecord(**row)

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        unknown = set(fields) - set(JobRecord.__dataclass_fields__)
        if unknown:
            raise ValueError(f"not job columns: {sorted(unknown)}")
        assignments = ", ".join(f"{key} = %s" for key in fields)
        row = self._one(
            f"UPDATE jobs SET {assignments} WHERE id = %s RETURNING {_JOB_COLUMNS}",
            (*(_json(key, value) for key, value in fields.items()), job_id),
        )
        assert row is not None
        return JobRecord(**row)

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
        return JobRecord(**row) if row else None

    def list_jobs(self, *, after: str | None = None, limit: int = 20, visible_to: str | None = None) -> list[JobRecord]:
        visible = "(%(namespace)s::text IS NULL OR namespace IS NULL OR namespace = %(namespace)s)"
        parameters = {"namespace": visible_to, "limit": limit, "after": after}
        if after is None:
            rows = self._all(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {visible} ORDER BY created_at DESC, id DESC LIMIT %(limit)s",
                parameters,
            )
        elif self.get_job(after) is None:
            raise UnknownCursorError(f"no job {after!r} to list after")
        else:
            rows = self._all(
                f"""SELECT {_JOB_COLUMNS} FROM jobs WHERE {visible}
                    AND (created_at, id) < (SELECT created_at, id FROM jobs WHERE id = %(after)s)
                    ORDER BY created_at DESC, id DESC LIMIT %(limit)s""",
                parameters,
            )
        return [JobRecord(**row) for row in rows]

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        rows = self._all(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = ANY(%s) ORDER BY created_at, seq", (list(statuses),)
        )
        return [JobRecord(**row) for row in rows]

    def count_by_status(self) -> dict[str, int]:
        return {row["status"]: row["n"] for row in self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    # -- events ---------------------------------------------------------------------------------

    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
    ) -> EventRecord:
        row = self._one(
            f"""INSERT INTO job_events (job_id, created_at, level, type, message, data)
                VALUES (%s, {_EPOCH}, %s, %s, %s, %s) RETURNING seq, created_at""",
            (job_id, level, type, message, None if data is None else Jsonb(data)),
        )
        assert row is not None
        return EventRecord(row["seq"], job_id, row["created_at"], level, type, message, data)

    def events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> list[EventRecord]:
        before = None
        if after is not None:
            prefix, _, number = after.partition("-")
            if prefix != "ftevent" or not number.isdigit():
                raise UnknownCursorError(f"after={after!r} is not an event id (ftevent-N)")
            before = int(number)
        rows = self._all(
            """SELECT seq, job_id, created_at, level, type, message, data FROM job_events
               WHERE job_id = %s AND (%s::bigint IS NULL OR seq < %s) ORDER BY seq DESC LIMIT %s""",
            (job_id, before, before, limit),
        )
        return [EventRecord(**row) for row in rows]

    # -- checkpoints ----------------------------------------------------------------------------

    def add_checkpoint(
        self, job_id: str, *, step: int, adapter_version: int, metrics: dict[str, Any], state: bytes | None
    ) -> CheckpointRecord:
        row = self._one(
            f"""INSERT INTO job_checkpoints
                    (id, job_id, created_at, step, adapter_version, metrics, state, state_sha256)
                VALUES (%s, %s, {_EPOCH}, %s, %s, %s, %s, %s) RETURNING {_CHECKPOINT_COLUMNS}""",
            (
                new_id("ftckpt"),
                job_id,
                step,
                adapter_version,
                Jsonb(metrics),
                state,
                None if state is None else hashlib.sha256(state).hexdigest(),
            ),
        )
        assert row is not None
        return CheckpointRecord(**row)

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        rows = self._all(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM job_checkpoints WHERE job_id = %s ORDER BY step DESC", (job_id,)
        )
        return [CheckpointRecord(**row) for row in rows]

    def checkpoint_state(self, checkpoint_id: str) -> bytes | None:
        row = self._one("SELECT state, state_sha256 FROM job_checkpoints WHERE id = %s", (checkpoint_id,))
        if row is None or row["state"] is None:
            return None
        data = bytes(row["state"])
        if hashlib.sha256(data).hexdigest() != row["state_sha256"]:
            raise BlobCorruptError(f"the optimizer state of checkpoint {checkpoint_id} fails its sha256 check")
        return data

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        self._execute("DELETE FROM job_checkpoints WHERE id = %s", (checkpoint_id,))

    def clear_states(self, job_id: str) -> None:
        self._execute("UPDATE job_checkpoints SET state = NULL, state_sha256 = NULL WHERE job_id = %s", (job_id,))

    # -- leases ---------------------------------------------------------------------------------

    def claim_jobs(self, owner: str, *, lease_seconds: float, limit: int) -> list[JobRecord]:
        rows = self._all(
            f"""WITH claimable AS (
                    SELECT id FROM jobs WHERE {_UNFINISHED} AND (owner IS NULL OR lease_expires_at < {DATABASE_NOW})
                    ORDER BY {_CLAIM_ORDER} LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
                UPDATE jobs SET owner = %(owner)s, lease_expires_at = {DATABASE_NOW} + %(lease)s
                FROM claimable WHERE jobs.id = claimable.id
                RETURNING seq, {", ".join(f"jobs.{name}" for name in _JOB_COLUMNS.split(", "))}""",
            {"owner": owner, "lease": lease_seconds, "limit": limit},
        )
        order = {"running": 0, "queued": 1}
        rows.sort(key=lambda row: (order.get(row["status"], 2), row["created_at"], row["seq"]))
        return [JobRecord(**{key: value for key, value in row.items() if key != "seq"}) for row in rows]

    def claim_job(self, job_id: str, owner: str, *, lease_seconds: float) -> JobRecord | None:
        row = self._one(
            f"""UPDATE jobs SET owner = %(owner)s, lease_expires_at = {DATABASE_NOW} + %(lease)s
                WHERE id = %(id)s AND {_UNFINISHED}
                  AND (owner IS NULL OR owner = %(owner)s OR lease_expires_at < {DATABASE_NOW})
                RETURNING {_JOB_COLUMNS}""",
            {"owner": owner, "lease": lease_seconds, "id": job_id},
        )
        return JobRecord(**row) if row else None

    def renew_lease(self, job_id: str, owner: str, *, lease_seconds: float) -> JobRecord | None:
        row = self._one(
            f"""UPDATE jobs SET lease_expires_at = {DATABASE_NOW} + %s WHERE id = %s AND owner = %s
                RETURNING {_JOB_COLUMNS}""",
            (lease_seconds, job_id, owner),
        )
        return JobRecord(**row) if row else None

    def release_lease(self, job_id: str, owner: str) -> None:
        self._execute(
            "UPDATE jobs SET owner = NULL, lease_expires_at = NULL WHERE id = %s AND owner = %s", (job_id, owner)
        )
