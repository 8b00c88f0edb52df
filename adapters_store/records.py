"""What the stores hand out, whatever the backend: frozen dataclasses of plain values, no row or connection types.

Each backend decodes its own rows into these (SQLite keeps JSON columns as text and booleans as integers);
the server only ever sees the records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class AdapterRecord:
    """One immutable version of an adapter id; its bytes are the blob named by ``sha256``."""

    adapter_id: str
    version: int
    sha256: str
    method: str
    n_params: int
    size_bytes: int
    source_format: str
    base_model: str
    description: str
    metadata: dict[str, Any]
    created_at: float
    broken: str | None
    pinned: bool
    public: bool

    @property
    def namespace(self) -> str | None:
        """The owner of a ``namespace/name`` id; None for the server's own un-namespaced ids."""
        namespace, slash, _ = self.adapter_id.partition("/")
        return namespace if slash else None


AdapterChangeKind = Literal["put", "delete", "broken"]


@dataclass(frozen=True)
class AdapterChange:
    """One committed change to a shared store's adapter versions, in commit order (``seq`` increases with each
    commit and has no gaps a reader could skip): what another replica's resident copies must follow. ``broken``
    covers both setting and clearing the mark; the record says which."""

    seq: int
    adapter_id: str
    version: int
    kind: AdapterChangeKind


@dataclass(frozen=True)
class GarbageReport:
    """What one garbage collection of a shared store removed."""

    changes_pruned: int
    orphan_blobs: int


@dataclass(frozen=True)
class FileRecord:
    """One uploaded training file; its bytes are the blob named by ``sha256``."""

    id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: int
    examples: int
    broken: str | None
    namespace: str | None = None
    public: bool = False


@dataclass(frozen=True)
class JobRecord:
    """One fine-tuning job: ``request`` is what the client asked for, ``adapter`` and ``hyperparameters`` what
    that resolved to."""

    id: str
    created_at: int
    status: JobStatus
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    adapter_id: str
    request: dict[str, Any]
    hyperparameters: dict[str, Any] | None
    adapter: dict[str, Any] | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    error: dict[str, Any] | None
    started_at: int | None
    finished_at: int | None
    estimated_finish: int | None
    step: int
    namespace: str | None = None
    # The lease (docs/finetuning.md, "Leases"): the replica training the job, until when (seconds since the
    # epoch, by the store's clock), and whether a cancel was asked for on any replica.
    owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class EventRecord:
    """One event of a job; ``seq`` orders them and ``id`` is the cursor a listing's ``after`` takes."""

    seq: int
    job_id: str
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @property
    def id(self) -> str:
        return f"ftevent-{self.seq:012d}"


@dataclass(frozen=True)
class CheckpointRecord:
    """``adapter_version`` is a version of the job's adapter id; ``has_state`` whether the store holds the
    optimizer state to resume from (not for the final checkpoint, nor once the job's states are cleared)."""

    id: str
    job_id: str
    created_at: int
    step: int
    adapter_version: int
    metrics: dict[str, Any]
    has_state: bool
