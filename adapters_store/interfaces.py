"""The three stores as the server sees them: adapters, training files, and fine-tuning jobs.

Each protocol holds exactly what the server calls, so a second backend implements these and nothing more;
the embedded backend (SQLite in WAL mode plus blob files under ``--data-dir``) is
:class:`adapters_store.store.AdapterStore`, :class:`adapters_store.files.FileStore` and
:class:`adapters_store.jobs.JobStore`, built only by the composition root (``server/main.py``). Every
backend keeps the same contract:

- records are :mod:`adapters_store.records`, and failures are :mod:`adapters_store.errors` (plus
  :class:`adapters_store.ids.InvalidAdapterIdError`), never a driver's own exceptions;
- a write is durable when the call returns: the server acknowledges (201/200) only after it;
- stored bytes are checked against their sha256 on every read;
- adapter version numbers and file, job and checkpoint ids are never reused, even after a delete;
- every method is safe to call from any thread;
- a job's lease (``claim_jobs`` ... ``release_lease``) is held by one replica at a time, and a lease that was
  not renewed in time is free to claim: the store's clock decides, not the replicas'.

``visible_to`` filters for a caller's namespace (None: no filter): its own objects, the server's
un-namespaced ones, and public ones (jobs are never public).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from adapters_store.records import (
    AdapterChange,
    AdapterRecord,
    CheckpointRecord,
    EventRecord,
    FileRecord,
    GarbageReport,
    JobRecord,
)


@runtime_checkable
class AdapterCatalog(Protocol):
    """The adapter versions that exist: what the routes resolve ids against and the registry leases from."""

    def get(self, adapter_id: str, version: int | None = None) -> AdapterRecord | None:
        """A version, or the latest one (broken or not) when ``version`` is None."""

    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        """Every version of ``adapter_id``, oldest first."""

    def list_latest(
        self, *, prefix: str = "", after: str = "", limit: int = 100, visible_to: str | None = None
    ) -> list[AdapterRecord]:
        """The latest version of each id starting with ``prefix``, ids after the cursor ``after``, in id order;
        an id is visible when its latest version is."""

    def latest_ids(self, *, visible_to: str | None = None) -> list[str]:
        """Ids whose latest version is servable (not broken), in id order."""

    def count_ids(self) -> int:
        """Distinct ids with at least one version."""

    def pinned_records(self) -> list[AdapterRecord]:
        """Every pinned version, in id order: what the registry makes resident at start."""

    def mark_broken(self, adapter_id: str, version: int, reason: str | None) -> None:
        """Record why a version cannot be served (its bytes failed a check); None clears the mark."""


@runtime_checkable
class AdapterRepository(Protocol):
    """Adapter versions and their bytes (content-addressed: identical bytes are stored once)."""

    @property
    def index(self) -> AdapterCatalog: ...

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
        """Store validated native bytes as the next version of ``adapter_id`` (concurrent puts to one id get
        distinct numbers); the version is complete and durable when this returns, or does not exist."""

    def read(self, record: AdapterRecord) -> bytes:
        """The version's bytes: :class:`BlobCorruptError` when they fail their sha256, ``FileNotFoundError``
        when they are gone (the caller marks the version broken)."""

    def delete(self, adapter_id: str, version: int | None = None) -> list[AdapterRecord]:
        """Delete one version, or every version when ``version`` is None; returns what was deleted. Bytes go
        with the last version that refers to them."""


@runtime_checkable
class AdapterChangeFeed(Protocol):
    """The changes other replicas made to a shared adapter store, for the registry to follow (deletes, pins
    and broken marks reaching resident copies). Only shared backends have one: the embedded store has a
    single writer, the registry that made the change."""

    def last_seq(self) -> int:
        """The newest change's ``seq`` (0 when there is none): where a follower starting now begins."""

    def changes_after(self, seq: int, *, limit: int = 1000) -> list[AdapterChange]:
        """Changes with ``seq`` greater than ``seq``, oldest first; :class:`UnknownCursorError` when changes
        after ``seq`` were already pruned (the follower must resynchronise from the catalog)."""

    def wait(self, timeout: float) -> None:
        """Block until a change may have been committed, or ``timeout`` seconds pass."""

    def close(self) -> None: ...


@runtime_checkable
class StoreMaintenance(Protocol):
    """Garbage collection of a shared store: a singleton by lease, so no two replicas sweep at once, and never
    part of a start (a replica starting must not delete what another is writing)."""

    def collect_garbage(self, owner: str, *, lease_seconds: float, grace_seconds: float) -> GarbageReport | None:
        """Remove what is unreachable and older than ``grace_seconds`` while ``owner`` holds the lease
        (renewed by the call, good for ``lease_seconds``); None when another owner holds it."""


@runtime_checkable
class FileRepository(Protocol):
    """Uploaded training files (``/v1/files``): each upload its own id; identical bytes stored once."""

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
        """Store a validated file under a new ``file-`` id owned by ``namespace``; durable when this returns."""

    def get(self, file_id: str) -> FileRecord | None: ...

    def list(
        self, *, purpose: str | None = None, after: str | None = None, limit: int = 100, visible_to: str | None = None
    ) -> list[FileRecord]:
        """Newest first by upload order; ``after`` is the last id of the previous page
        (:class:`UnknownCursorError` when that file does not exist)."""

    def read(self, record: FileRecord) -> bytes:
        """The stored bytes; :class:`FileBrokenError` when the file is broken: marked so, or its bytes are
        missing or fail their sha256 now (which marks it)."""

    def delete(self, file_id: str) -> bool:
        """False when there is no such file."""

    def close(self) -> None: ...


@runtime_checkable
class JobRepository(Protocol):
    """Fine-tuning jobs, their events and their checkpoints; every change is committed before it returns, so
    a restart finds each job where its last acknowledged change left it."""

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
        """A new job in ``validating_files``."""

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        """Set ``fields`` (columns of :class:`JobRecord`; dicts for its dict fields) in one committed change."""

    def get_job(self, job_id: str) -> JobRecord | None: ...

    def list_jobs(self, *, after: str | None = None, limit: int = 20, visible_to: str | None = None) -> list[JobRecord]:
        """Newest first; ``after`` is the last job id of the previous page (:class:`UnknownCursorError` if none)."""

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        """Oldest first: the order queued jobs run in."""

    def count_by_status(self) -> dict[str, int]: ...

    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
    ) -> EventRecord: ...

    def events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> list[EventRecord]:
        """Newest first; ``after`` is the last event id of the previous page (:class:`UnknownCursorError` when it
        is not an event id)."""

    def add_checkpoint(
        self, job_id: str, *, step: int, adapter_version: int, metrics: dict[str, Any], state: bytes | None
    ) -> CheckpointRecord:
        """A checkpoint and, unless None, the optimizer state to resume from (opaque bytes), stored together."""

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """Newest (highest step) first."""

    def checkpoint_state(self, checkpoint_id: str) -> bytes | None:
        """The checkpoint's optimizer state; None when it holds none (or is gone). :class:`BlobCorruptError` when
        the bytes fail their sha256."""

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        """The checkpoint and its state."""

    def clear_states(self, job_id: str) -> None:
        """Drop the optimizer state of every checkpoint of the job (it finished: nothing will resume from them)."""

    # -- leases: which replica trains a job ------------------------------------------------------

    def claim_jobs(self, owner: str, *, lease_seconds: float, limit: int) -> list[JobRecord]:
        """Take the lease on up to ``limit`` unfinished jobs that no replica holds (never leased, released, or
        expired), for ``owner``: running jobs first, then queued, then validating, each oldest first. Replicas
        claiming at once get disjoint jobs."""

    def claim_job(self, job_id: str, owner: str, *, lease_seconds: float) -> JobRecord | None:
        """Take the lease on one unfinished job when no replica holds it (or ``owner`` does); None otherwise."""

    def renew_lease(self, job_id: str, owner: str, *, lease_seconds: float) -> JobRecord | None:
        """Extend ``owner``'s lease (the heartbeat); None when ``owner`` no longer holds it: it must stop."""

    def release_lease(self, job_id: str, owner: str) -> None:
        """Give the lease up, when ``owner`` holds it, so that another replica may claim the job at once."""
