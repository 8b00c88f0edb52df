"""The PostgreSQL adapter store: index, versions and blobs in one database that any number of replicas share.

:class:`PostgresAdapterStore` is an :class:`adapters_store.interfaces.AdapterRepository` and its ``index`` a
:class:`PostgresAdapterIndex` (:class:`adapters_store.interfaces.AdapterCatalog`), chosen by
``--store postgresql://...``. Unlike the embedded store it takes no lock on the store: every replica opens the
same database, and the database orders their writes.

- Blobs are ``bytea`` rows keyed by sha256 (adapters are kB-sized), checked against it on every read; a
  version's row references its blob, so a blob cannot go while a version needs it.
- Each write is one transaction, committed before the call returns. A put writes the blob and the version
  row together, so a crash leaves the whole version or nothing: no orphans, no recovery pass on start.
- Version numbers come from ``adapter_ids.last_version``, incremented in the writing transaction
  (``INSERT ... ON CONFLICT DO UPDATE`` locks the id's row until commit): concurrent puts from any replica
  get distinct numbers with no gaps, and deletes never give a number back.
- A put and a delete that share a blob take the blob's advisory transaction lock, so a delete never removes
  bytes a concurrent put of the same bytes is about to refer to.
- Ids are ``COLLATE "C"``: listings are in byte order, as SQLite's are.
- The schema is created and migrated on start, under an advisory lock so replicas starting together take
  turns; ``schema_version`` records the steps applied.
- One connection per store, guarded by a lock (the statements are small; replicas scale out, threads do
  not need to), reopened when the server drops it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from adapters_store.errors import BlobCorruptError, StoreUnavailableError, UnknownCursorError
from adapters_store.ids import validate_adapter_id
from adapters_store.records import AdapterChange, AdapterChangeKind, AdapterRecord, GarbageReport

logger = logging.getLogger(__name__)

# Schema steps in order; schema_version holds how many are applied. Append, never edit.
MIGRATIONS = (
    """
    CREATE TABLE adapter_ids (
        adapter_id TEXT COLLATE "C" PRIMARY KEY,
        last_version INTEGER NOT NULL
    );
    CREATE TABLE adapter_blobs (
        sha256 TEXT PRIMARY KEY,
        data BYTEA NOT NULL
    );
    CREATE TABLE adapter_versions (
        adapter_id TEXT COLLATE "C" NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL REFERENCES adapter_blobs (sha256),
        method TEXT NOT NULL,
        n_params BIGINT NOT NULL,
        size_bytes BIGINT NOT NULL,
        source_format TEXT NOT NULL,
        base_model TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        metadata JSONB NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        broken TEXT,
        pinned BOOLEAN NOT NULL DEFAULT FALSE,
        public BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (adapter_id, version)
    );
    CREATE INDEX adapter_versions_sha ON adapter_versions (sha256);
    """,
    """
    CREATE TABLE adapter_changes (
        seq BIGINT PRIMARY KEY,
        adapter_id TEXT COLLATE "C" NOT NULL,
        version INTEGER NOT NULL,
        kind TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE adapter_change_counter (
        only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
        last_seq BIGINT NOT NULL,
        pruned_through BIGINT NOT NULL
    );
    INSERT INTO adapter_change_counter VALUES (TRUE, 0, 0);
    CREATE TABLE store_leases (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    ALTER TABLE adapter_blobs ADD COLUMN created_at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM now());
    """,
    # Training files (adapters_store/postgres_files.py); jobs, events and checkpoints (postgres_jobs.py).
    """
    CREATE TABLE training_file_blobs (
        sha256 TEXT PRIMARY KEY,
        data BYTEA NOT NULL
    );
    CREATE TABLE training_files (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT COLLATE "C" NOT NULL UNIQUE,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        sha256 TEXT NOT NULL REFERENCES training_file_blobs (sha256),
        created_at BIGINT NOT NULL,
        examples INTEGER NOT NULL,
        broken TEXT,
        namespace TEXT,
        public BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX training_files_sha ON training_files (sha256);
    CREATE TABLE jobs (
        seq BIGSERIAL UNIQUE,
        id TEXT COLLATE "C" PRIMARY KEY,
        created_at BIGINT NOT NULL,
        status TEXT NOT NULL,
        model TEXT NOT NULL,
        training_file TEXT NOT NULL,
        validation_file TEXT,
        suffix TEXT,
        seed BIGINT NOT NULL,
        adapter_id TEXT NOT NULL,
        request JSONB NOT NULL,
        hyperparameters JSONB,
        adapter JSONB,
        fine_tuned_model TEXT,
        trained_tokens BIGINT,
        error JSONB,
        started_at BIGINT,
        finished_at BIGINT,
        estimated_finish BIGINT,
        step INTEGER NOT NULL DEFAULT 0,
        namespace TEXT,
        owner TEXT,
        lease_expires_at DOUBLE PRECISION,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX jobs_unfinished ON jobs (status, created_at);
    CREATE TABLE job_events (
        seq BIGSERIAL PRIMARY KEY,
        job_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        level TEXT NOT NULL,
        type TEXT NOT NULL,
        message TEXT NOT NULL,
        data JSONB
    );
    CREATE INDEX job_events_job ON job_events (job_id, seq);
    CREATE TABLE job_checkpoints (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        step INTEGER NOT NULL,
        adapter_version INTEGER NOT NULL,
        metrics JSONB NOT NULL,
        state BYTEA,
        state_sha256 TEXT
    );
    CREATE INDEX job_checkpoints_job ON job_checkpoints (job_id, step);
    """,
)
# pg_advisory_xact_lock keys: the schema migration, and (hashed) each blob's sha256.
_MIGRATION_LOCK = 0x5EC7A_0001
CHANGES_CHANNEL = "spectra_adapter_changes"
_GC_LEASE = "garbage-collection"
# The database's clock, so leases held by replicas on different hosts expire by one clock.
DATABASE_NOW = "extract(epoch FROM clock_timestamp())::double precision"
_COLUMNS = (
    "adapter_id, version, sha256, method, n_params, size_bytes, source_format, base_model, description, metadata, "
    "created_at, broken, pinned, public"
)
# Which versions a caller of namespace %(namespace)s may see (NULL: every one): as the SQLite index's _VISIBLE.
_VISIBLE = """(%(namespace)s::text IS NULL OR strpos(v.adapter_id, '/') = 0 OR v.public
              OR left(v.adapter_id, length(%(namespace)s) + 1) = %(namespace)s || '/')"""
_LATEST = "SELECT adapter_id, MAX(version) AS version FROM adapter_versions"


def _record(row: dict[str, Any]) -> AdapterRecord:
    return AdapterRecord(**row)


class StoreConnection:
    """One autocommit connection behind a lock; ``transaction()`` for writes, ``session()`` for single reads."""

    def __init__(self, url: str):
        self._url = url
        self._lock = threading.Lock()
        self._db = self._connect()

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self._url, autocommit=True, row_factory=dict_row)
        except psycopg.OperationalError as error:
            raise StoreUnavailableError(f"cannot connect to the store: {error}") from error

    @contextmanager
    def session(self) -> Iterator[psycopg.Connection]:
        """The connection, reopened first if the server dropped it, for one statement or transaction. A driver
        error leaves as :class:`StoreUnavailableError` (the interfaces promise the store's errors only): a call
        that finds the connection gone mid-statement fails (whether a write in flight committed is then
        unknown, as with any lost connection), and the next call reconnects."""
        with self._lock:
            if self._db.closed or self._db.broken:
                logger.warning("store connection lost; reconnecting")
                self._db = self._connect()
            try:
                yield self._db
            except psycopg.OperationalError as error:
                raise StoreUnavailableError(f"the store connection failed: {error}") from error
            except psycopg.Error as error:
                raise StoreUnavailableError(f"store error ({type(error).__name__}): {error}") from error

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        with self.session() as db, db.transaction():
            yield db

    def close(self) -> None:
        with self._lock:
            self._db.close()


def migrate(connection: StoreConnection) -> int:
    """Apply the schema steps this database lacks; returns the schema version now."""
    with connection.transaction() as db:
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        current = row["version"] if row else 0
        if current > len(MIGRATIONS):
            raise RuntimeError(f"store schema version {current} is newer than this server's {len(MIGRATIONS)}")
        for step in MIGRATIONS[current:]:
            db.execute(step)
        if row is None:
            db.execute("INSERT INTO schema_version VALUES (%s)", (len(MIGRATIONS),))
        else:
            db.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))
    if current < len(MIGRATIONS):
        logger.info("store schema migrated from=%d to=%d", current, len(MIGRATIONS))
    return len(MIGRATIONS)


def lock_blob(db: psycopg.Connection, sha256: str) -> None:
    db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (sha256,))


def _record_change(db: psycopg.Connection, adapter_id: str, version: int, kind: AdapterChangeKind) -> None:
    """Append a change to the feed inside the writing transaction, last. The counter row stays locked until
    commit, so changes commit in ``seq`` order: a reader that sees ``seq`` N has every change before it, and
    catching up by ``seq`` cannot skip one. The NOTIFY goes out at commit, and only if it commits."""
    seq = db.execute("UPDATE adapter_change_counter SET last_seq = last_seq + 1 RETURNING last_seq").fetchone()[
        "last_seq"
    ]
    db.execute("INSERT INTO adapter_changes VALUES (%s, %s, %s, %s, %s)", (seq, adapter_id, version, kind, time.time()))
    db.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, str(seq)))


class PostgresAdapterIndex:
    """The versions that exist, read from the shared database (nothing cached: every replica sees every commit)."""

    def __init__(self, connection: StoreConnection):
        self._connection = connection

    def get(self, adapter_id: str, version: int | None = None) -> AdapterRecord | None:
        with self._connection.session() as db:
            if version is None:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM adapter_versions WHERE adapter_id = %s ORDER BY version DESC LIMIT 1",
                    (adapter_id,),
                ).fetchone()
            else:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM adapter_versions WHERE adapter_id = %s AND version = %s",
                    (adapter_id, version),
                ).fetchone()
        return _record(row) if row else None

    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        with self._connection.session() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM adapter_versions WHERE adapter_id = %s ORDER BY version", (adapter_id,)
            ).fetchall()
        return [_record(row) for row in rows]

    def list_latest(
        self, *, prefix: str = "", after: str = "", limit: int = 100, visible_to: str | None = None
    ) -> list[AdapterRecord]:
        with self._connection.session() as db:
            rows = db.execute(
                f"""SELECT v.* FROM adapter_versions v
                   JOIN ({_LATEST} WHERE adapter_id >= %(prefix)s AND adapter_id > %(after)s
                               AND left(adapter_id, length(%(prefix)s)) = %(prefix)s
                         GROUP BY adapter_id) latest
                   USING (adapter_id, version)
                   WHERE {_VISIBLE} ORDER BY v.adapter_id LIMIT %(limit)s""",
                {"prefix": prefix, "after": after, "namespace": visible_to, "limit": limit},
            ).fetchall()
        return [_record(row) for row in rows]

    def latest_ids(self, *, visible_to: str | None = None) -> list[str]:
        with self._connection.session() as db:
            rows = db.execute(
                f"""SELECT v.adapter_id FROM adapter_versions v
                   JOIN ({_LATEST} GROUP BY adapter_id) latest USING (adapter_id, version)
                   WHERE v.broken IS NULL AND {_VISIBLE} ORDER BY v.adapter_id""",
                {"namespace": visible_to},
            ).fetchall()
        return [row["adapter_id"] for row in rows]

    def count_ids(self) -> int:
        with self._connection.session() as db:
            return int(db.execute("SELECT COUNT(DISTINCT adapter_id) AS n FROM adapter_versions").fetchone()["n"])

    def pinned_records(self) -> list[AdapterRecord]:
        with self._connection.session() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM adapter_versions WHERE pinned ORDER BY adapter_id, version"
            ).fetchall()
        return [_record(row) for row in rows]

    def mark_broken(self, adapter_id: str, version: int, reason: str | None) -> None:
        with self._connection.transaction() as db:
            marked = db.execute(
                "UPDATE adapter_versions SET broken = %s WHERE adapter_id = %s AND version = %s",
                (reason, adapter_id, version),
            ).rowcount
            if marked:
                _record_change(db, adapter_id, version, "broken")


class PostgresAdapterStore:
    """Adapter versions and their bytes in the database at ``url`` (``postgresql://USER@HOST:PORT/DB``)."""

    def __init__(self, url: str):
        self.url = url
        self._connection = StoreConnection(url)
        self.schema_version = migrate(self._connection)
        self._index = PostgresAdapterIndex(self._connection)

    @property
    def index(self) -> PostgresAdapterIndex:
        return self._index

    def put(
        self,
        adapter_id: str,
        data: bytes,
        *,
        method: str,
        n_params: int,
        source_format: str,
        base_model: str,
        description: str = "",
        metadata: dict[str, Any] | None = None,
        pinned: bool = False,
        public: bool = False,
    ) -> AdapterRecord:
        """The blob (replaced when the stored copy fails its sha256: uploading again repairs a broken version)
        and the next version's row, in one transaction."""
        validate_adapter_id(adapter_id)
        sha256 = hashlib.sha256(data).hexdigest()
        with self._connection.transaction() as db:
            lock_blob(db, sha256)
            db.execute(
                """INSERT INTO adapter_blobs VALUES (%s, %s) ON CONFLICT (sha256) DO UPDATE SET data = EXCLUDED.data
                   WHERE sha256(adapter_blobs.data) <> decode(adapter_blobs.sha256, 'hex')""",
                (sha256, data),
            )
            version = db.execute(
                """INSERT INTO adapter_ids VALUES (%s, 1)
                   ON CONFLICT (adapter_id) DO UPDATE SET last_version = adapter_ids.last_version + 1
                   RETURNING last_version""",
                (adapter_id,),
            ).fetchone()["last_version"]
            row = db.execute(
                f"""INSERT INTO adapter_versions ({_COLUMNS})
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, %s, %s) RETURNING {_COLUMNS}""",
                (
                    adapter_id,
                    version,
                    sha256,
                    method,
                    n_params,
                    len(data),
                    source_format,
                    base_model,
                    description,
                    Jsonb(metadata or {}),
                    time.time(),
                    pinned,
                    public,
                ),
            ).fetchone()
            _record_change(db, adapter_id, version, "put")
        return _record(row)

    def read(self, record: AdapterRecord) -> bytes:
        with self._connection.session() as db:
            row = db.execute("SELECT data FROM adapter_blobs WHERE sha256 = %s", (record.sha256,)).fetchone()
        if row is None:
            raise FileNotFoundError(f"blob {record.sha256} is missing")
        data = bytes(row["data"])
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise BlobCorruptError(f"blob {record.sha256} fails its sha256 check")
        return data

    def delete(self, adapter_id: str, version: int | None = None) -> list[AdapterRecord]:
        """The rows, and each blob no version refers to any more, in one transaction."""
        if version is None:
            where, params = "adapter_id = %s", (adapter_id,)
        else:
            where, params = "adapter_id = %s AND version = %s", (adapter_id, version)
        with self._connection.transaction() as db:
            rows = db.execute(f"DELETE FROM adapter_versions WHERE {where} RETURNING {_COLUMNS}", params).fetchall()
            for sha256 in sorted({row["sha256"] for row in rows}):
                lock_blob(db, sha256)
                db.execute(
                    """DELETE FROM adapter_blobs b WHERE b.sha256 = %s
                       AND NOT EXISTS (SELECT 1 FROM adapter_versions v WHERE v.sha256 = b.sha256)""",
                    (sha256,),
                )
            for row in sorted(rows, key=lambda row: row["version"]):
                _record_change(db, row["adapter_id"], row["version"], "delete")
        return sorted((_record(row) for row in rows), key=lambda record: record.version)

    def collect_garbage(self, owner: str, *, lease_seconds: float, grace_seconds: float) -> GarbageReport | None:
        """Prune the change feed and sweep orphan blobs, if ``owner`` holds (or takes) the garbage-collection
        lease; None when another replica holds it.

        Only what is older than ``grace_seconds`` goes: a change a follower may still need to read, or a
        blob a transaction committed moments ago. Each orphan is re-checked under its blob lock, so a put
        of the same bytes racing the sweep keeps them. A put and a delete are single transactions, so
        orphans are not expected; the sweep is there for rows left by hand or by an older server.
        """
        with self._connection.transaction() as db:
            held = db.execute(
                f"""INSERT INTO store_leases VALUES (%(name)s, %(owner)s, {DATABASE_NOW} + %(ttl)s)
                    ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                    WHERE store_leases.owner = EXCLUDED.owner OR store_leases.expires_at < {DATABASE_NOW}
                    RETURNING owner""",
                {"name": _GC_LEASE, "owner": owner, "ttl": lease_seconds},
            ).fetchone()
        if held is None:
            return None
        with self._connection.transaction() as db:
            pruned = db.execute(
                f"DELETE FROM adapter_changes WHERE created_at < {DATABASE_NOW} - %s RETURNING seq", (grace_seconds,)
            ).fetchall()
            if pruned:
                db.execute(
                    "UPDATE adapter_change_counter SET pruned_through = GREATEST(pruned_through, %s)",
                    (max(row["seq"] for row in pruned),),
                )
        orphans = 0
        with self._connection.session() as db:
            candidates = db.execute(
                f"""SELECT sha256 FROM adapter_blobs b WHERE created_at < {DATABASE_NOW} - %s
                    AND NOT EXISTS (SELECT 1 FROM adapter_versions v WHERE v.sha256 = b.sha256)""",
                (grace_seconds,),
            ).fetchall()
        for row in candidates:
            with self._connection.transaction() as db:
                lock_blob(db, row["sha256"])
                orphans += db.execute(
                    """DELETE FROM adapter_blobs b WHERE b.sha256 = %s
                       AND NOT EXISTS (SELECT 1 FROM adapter_versions v WHERE v.sha256 = b.sha256)""",
                    (row["sha256"],),
                ).rowcount
        report = GarbageReport(changes_pruned=len(pruned), orphan_blobs=orphans)
        if report.changes_pruned or report.orphan_blobs:
            logger.info("store garbage collected owner=%s changes=%d orphan_blobs=%d", owner, len(pruned), orphans)
        return report

    def close(self) -> None:
        self._connection.close()


class PostgresChangeFeed:
    """The adapter change feed of the database at ``url``: an :class:`adapters_store.interfaces.AdapterChangeFeed`.

    It has a connection of its own, LISTENing on :data:`CHANGES_CHANNEL`; the rows of ``adapter_changes`` are
    the truth and the notifications only wake the follower, so a notification lost while disconnected costs
    nothing: the follower reads by ``seq`` after it reconnects. One follower thread uses it.
    """

    def __init__(self, url: str):
        self._url = url
        self._lock = threading.Lock()
        self._db: psycopg.Connection | None = None

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection]:
        with self._lock:
            try:
                if self._db is None or self._db.closed or self._db.broken:
                    self._db = psycopg.connect(self._url, autocommit=True, row_factory=dict_row)
                    self._db.execute(f"LISTEN {CHANGES_CHANNEL}")
                yield self._db
            except psycopg.OperationalError as error:
                raise StoreUnavailableError(f"the store's change feed failed: {error}") from error

    def last_seq(self) -> int:
        with self._session() as db:
            return int(db.execute("SELECT last_seq FROM adapter_change_counter").fetchone()["last_seq"])

    def changes_after(self, seq: int, *, limit: int = 1000) -> list[AdapterChange]:
        with self._session() as db, db.transaction():
            # One snapshot for the watermark and the rows: a prune between them cannot hide a gap.
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            pruned_through = db.execute("SELECT pruned_through FROM adapter_change_counter").fetchone()[
                "pruned_through"
            ]
            if seq < pruned_through:
                raise UnknownCursorError(f"changes after {seq} were pruned (through {pruned_through})")
            rows = db.execute(
                "SELECT seq, adapter_id, version, kind FROM adapter_changes WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            ).fetchall()
        return [AdapterChange(**row) for row in rows]

    def wait(self, timeout: float) -> None:
        with self._session() as db:
            for _ in db.notifies(timeout=timeout, stop_after=1):
                pass

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
