"""The job store: jobs, events, checkpoints with their optimizer states, and leases.

The tests taking ``jobs`` run against both backends: the embedded one (SQLite and state files in a temp dir) and
PostgreSQL (a fresh database on the session's throwaway cluster). The lease tests take two PostgreSQL stores on
one database, as two replicas see it; the embedded tests at the end poke its files and lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from adapters_store.errors import BlobCorruptError, StoreLockedError, UnknownCursorError
from adapters_store.ids import new_id
from adapters_store.interfaces import JobRepository
from adapters_store.jobs import JobStore
from adapters_store.postgres_jobs import PostgresJobStore
from adapters_store.records import JobRecord

pytest_plugins = ["tests.postgres_fixtures"]
LEASE = 30.0


@pytest.fixture
def database(postgres_url: str) -> str:
    from tests.postgres_fixtures import fresh_database

    return fresh_database(postgres_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def jobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobRepository]:
    if request.param == "sqlite":
        store: JobRepository = JobStore(tmp_path / "finetune" / "jobs.sqlite3")
    else:
        store = PostgresJobStore(request.getfixturevalue("database"))
    yield store
    store.close()  # type: ignore[attr-defined]


@pytest.fixture
def replicas(database: str) -> Iterator[tuple[PostgresJobStore, PostgresJobStore]]:
    a, b = PostgresJobStore(database), PostgresJobStore(database)
    yield a, b
    a.close()
    b.close()


def insert(store: JobRepository, namespace: str | None = None) -> JobRecord:
    job_id = new_id("ftjob")
    return store.insert_job(
        job_id=job_id,
        model="m",
        training_file="file-1",
        validation_file=None,
        suffix="s",
        seed=7,
        adapter_id=f"ft-s-{job_id[6:14]}",
        request={"hyperparameters": {"n_epochs": "auto"}, "metadata": None},
        adapter={"method": "fourierft", "target_modules": ["q_proj"]},
        namespace=namespace,
    )


def test_a_job_round_trips_and_updates(jobs: JobRepository) -> None:
    job = insert(jobs, namespace="team")
    assert job.status == "validating_files" and job.step == 0 and job.owner is None and not job.cancel_requested
    assert job.request == {"hyperparameters": {"n_epochs": "auto"}, "metadata": None}
    assert jobs.get_job(job.id) == job
    updated = jobs.update_job(job.id, status="running", hyperparameters={"total_steps": 4}, step=2, started_at=5)
    assert (updated.status, updated.hyperparameters, updated.step, updated.started_at) == (
        "running",
        {"total_steps": 4},
        2,
        5,
    )
    assert jobs.update_job(job.id, error={"code": "x", "message": "y", "param": None}).error == {
        "code": "x",
        "message": "y",
        "param": None,
    }
    assert jobs.get_job("ftjob-000000000000000000000000") is None


def test_listing_statuses_and_counts(jobs: JobRepository) -> None:
    records = [insert(jobs, namespace="me" if index % 2 else None) for index in range(5)]
    other = insert(jobs, namespace="them")
    newest_first = [job.id for job in sorted([*records, other], key=lambda job: (job.created_at, job.id))][::-1]
    assert [job.id for job in jobs.list_jobs(limit=100)] == newest_first
    page = jobs.list_jobs(limit=2)
    assert [job.id for job in page + jobs.list_jobs(after=page[-1].id, limit=100)] == newest_first
    assert other.id not in [job.id for job in jobs.list_jobs(limit=100, visible_to="me")]
    with pytest.raises(UnknownCursorError):
        jobs.list_jobs(after="ftjob-nope")
    jobs.update_job(records[1].id, status="queued")
    jobs.update_job(records[3].id, status="queued")
    assert [job.id for job in jobs.jobs_with_status("queued")] == [records[1].id, records[3].id]
    assert jobs.count_by_status() == {"validating_files": 4, "queued": 2}


def test_events_are_newest_first_and_paged(jobs: JobRepository) -> None:
    job = insert(jobs)
    added = [jobs.add_event(job.id, f"event {index}", data={"step": index} if index else None) for index in range(5)]
    assert [event.id for event in jobs.events(job.id, limit=100)] == [event.id for event in reversed(added)]
    assert jobs.events(job.id, limit=100)[0].data == {"step": 4}
    assert [event.message for event in jobs.events(job.id, after=added[2].id)] == ["event 1", "event 0"]
    with pytest.raises(UnknownCursorError):
        jobs.events(job.id, after="bogus")


def test_checkpoints_hold_their_optimizer_state(jobs: JobRepository) -> None:
    job = insert(jobs)
    state = bytes(range(256)) * 100
    first = jobs.add_checkpoint(job.id, step=2, adapter_version=1, metrics={"step": 2}, state=state)
    final = jobs.add_checkpoint(job.id, step=4, adapter_version=2, metrics={"step": 4}, state=None)
    assert [(c.id, c.step, c.has_state) for c in jobs.checkpoints(job.id)] == [
        (final.id, 4, False),
        (first.id, 2, True),
    ]
    assert jobs.checkpoint_state(first.id) == state and jobs.checkpoint_state(final.id) is None
    jobs.clear_states(job.id)
    assert [c.has_state for c in jobs.checkpoints(job.id)] == [False, False]
    assert jobs.checkpoint_state(first.id) is None
    jobs.delete_checkpoint(first.id)
    assert [c.id for c in jobs.checkpoints(job.id)] == [final.id]
    second = jobs.add_checkpoint(job.id, step=6, adapter_version=3, metrics={}, state=b"again")
    jobs.delete_checkpoint(second.id)
    assert jobs.checkpoint_state(second.id) is None


def test_one_owner_at_a_time_and_a_released_lease_is_claimable(jobs: JobRepository) -> None:
    job = insert(jobs)
    (claimed,) = jobs.claim_jobs("a", lease_seconds=LEASE, limit=5)
    assert claimed.id == job.id and claimed.owner == "a" and claimed.lease_expires_at > time.time()
    assert jobs.claim_jobs("b", lease_seconds=LEASE, limit=5) == []
    assert jobs.claim_job(job.id, "b", lease_seconds=LEASE) is None
    assert jobs.renew_lease(job.id, "b", lease_seconds=LEASE) is None
    assert jobs.renew_lease(job.id, "a", lease_seconds=LEASE).owner == "a"  # type: ignore[union-attr]
    jobs.release_lease(job.id, "b")
    assert jobs.get_job(job.id).owner == "a", "only the owner releases"  # type: ignore[union-attr]
    jobs.release_lease(job.id, "a")
    assert jobs.claim_job(job.id, "b", lease_seconds=LEASE).owner == "b"  # type: ignore[union-attr]


def test_claims_take_running_then_queued_then_validating_and_skip_finished_jobs(jobs: JobRepository) -> None:
    validating, queued, running, done = (insert(jobs) for _ in range(4))
    jobs.update_job(queued.id, status="queued")
    jobs.update_job(running.id, status="running")
    jobs.update_job(done.id, status="succeeded")
    assert [job.id for job in jobs.claim_jobs("a", lease_seconds=LEASE, limit=2)] == [running.id, queued.id]
    assert [job.id for job in jobs.claim_jobs("a", lease_seconds=LEASE, limit=5)] == [validating.id]
    assert jobs.claim_job(done.id, "a", lease_seconds=LEASE) is None


def test_a_cancel_request_is_seen_by_the_owner_at_its_renewal(jobs: JobRepository) -> None:
    job = insert(jobs)
    jobs.claim_job(job.id, "a", lease_seconds=LEASE)
    jobs.update_job(job.id, cancel_requested=True)
    assert jobs.renew_lease(job.id, "a", lease_seconds=LEASE).cancel_requested is True  # type: ignore[union-attr]


# -- Two replicas on one database -------------------------------------------------------------------


def test_only_one_replica_claims_a_job(replicas) -> None:
    a, b = replicas
    job = insert(a)
    assert b.get_job(job.id) == job
    won: list[tuple[str, list[JobRecord]]] = []
    barrier = threading.Barrier(2)

    def claim(store: PostgresJobStore, owner: str) -> None:
        barrier.wait()
        won.append((owner, store.claim_jobs(owner, lease_seconds=LEASE, limit=1)))

    threads = [threading.Thread(target=claim, args=(store, owner)) for store, owner in ((a, "a"), (b, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [owner for owner, claimed in won if claimed]
    assert len(winners) == 1
    assert a.get_job(job.id).owner == winners[0]  # type: ignore[union-attr]


def test_many_jobs_claimed_by_two_replicas_at_once_are_split_without_overlap(replicas) -> None:
    a, b = replicas
    created = {insert(a).id for _ in range(40)}
    claimed: dict[str, set[str]] = {"a": set(), "b": set()}
    barrier = threading.Barrier(2)

    def claim(store: PostgresJobStore, owner: str) -> None:
        barrier.wait()
        while batch := store.claim_jobs(owner, lease_seconds=LEASE, limit=3):
            claimed[owner] |= {job.id for job in batch}

    threads = [threading.Thread(target=claim, args=(store, owner)) for store, owner in ((a, "a"), (b, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert claimed["a"].isdisjoint(claimed["b"]) and claimed["a"] | claimed["b"] == created


def test_an_expired_lease_is_claimed_by_the_other_replica_and_the_old_owner_cannot_renew(replicas) -> None:
    a, b = replicas
    job = insert(a)
    assert a.claim_job(job.id, "a", lease_seconds=0.5) is not None
    assert b.claim_jobs("b", lease_seconds=LEASE, limit=1) == []
    time.sleep(0.7)
    (taken,) = b.claim_jobs("b", lease_seconds=LEASE, limit=1)
    assert taken.id == job.id and taken.owner == "b"
    assert a.renew_lease(job.id, "a", lease_seconds=LEASE) is None, "a heartbeat by a non-owner fails"
    assert b.renew_lease(job.id, "b", lease_seconds=LEASE) is not None


def test_a_checkpoint_state_written_by_one_replica_is_read_by_the_other_and_checked(replicas, database) -> None:
    a, b = replicas
    job = insert(a)
    checkpoint = a.add_checkpoint(job.id, step=3, adapter_version=1, metrics={"step": 3}, state=b"adam moments")
    assert b.checkpoint_state(checkpoint.id) == b"adam moments"
    with psycopg.connect(database, autocommit=True) as db:
        db.execute("UPDATE job_checkpoints SET state = %s WHERE id = %s", (b"adam momentz", checkpoint.id))
    with pytest.raises(BlobCorruptError, match="fails its sha256 check"):
        b.checkpoint_state(checkpoint.id)


# -- Embedded backend only ---------------------------------------------------------------------------


def test_embedded_states_are_files_next_to_the_database_and_leases_end_with_the_process(tmp_path: Path) -> None:
    path = tmp_path / "finetune" / "jobs.sqlite3"
    store = JobStore(path)
    job = insert(store)
    checkpoint = store.add_checkpoint(job.id, step=1, adapter_version=1, metrics={}, state=b"state")
    assert (tmp_path / "finetune" / "checkpoints" / job.id / "step-1.safetensors").read_bytes() == b"state"
    store.claim_job(job.id, "old process", lease_seconds=LEASE)
    with pytest.raises(StoreLockedError, match="in use by another process"):
        JobStore(path)
    store.close()
    store = JobStore(path)
    try:
        assert store.get_job(job.id).owner is None  # type: ignore[union-attr]
        assert [claimed.id for claimed in store.claim_jobs("new process", lease_seconds=LEASE, limit=5)] == [job.id]
        assert store.checkpoint_state(checkpoint.id) == b"state"
        store.clear_states(job.id)
        assert not (tmp_path / "finetune" / "checkpoints" / job.id).exists()
    finally:
        store.close()


def test_embedded_checkpoints_of_older_releases_keep_their_absolute_state_paths(tmp_path: Path) -> None:
    path = tmp_path / "finetune" / "jobs.sqlite3"
    store = JobStore(path)
    job = insert(store)
    legacy = tmp_path / "finetune" / "checkpoints" / job.id / "step-5.safetensors"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"old state")
    with store._lock:  # as an older release wrote it: an absolute path and no sha256
        store._connection.execute(
            "INSERT INTO job_checkpoints (id, job_id, created_at, step, adapter_version, metrics, state_path) "
            "VALUES ('ftckpt-old', ?, 0, 5, 1, '{}', ?)",
            (job.id, str(legacy)),
        )
    try:
        (checkpoint,) = store.checkpoints(job.id)
        assert checkpoint.has_state and store.checkpoint_state("ftckpt-old") == b"old state"
        store.delete_checkpoint("ftckpt-old")
        assert not legacy.exists()
    finally:
        store.close()
