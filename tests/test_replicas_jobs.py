"""Two real ``spectra serve --store postgresql://...`` replicas sharing training files and fine-tuning jobs.

Each replica has its own ``--data-dir`` and a 2 s ``--job-lease-seconds``, so an orphaned job is picked up
quickly. The job's ``replica`` field (its lease holder) and ``/info``'s ``fine_tuning.replica`` say which
process trains it; the tests act on whichever that is, since either may claim a job first.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest

from server.models.embedded import ensure_default_model
from tests.test_finetune import PAIRS, create_job, events, finished, get_job, jsonl, upload_training_file

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures", "tests.postgres_fixtures"]
LEASE_SECONDS = 2
ROWS = [{"prompt": prompt, "completion": completion} for prompt, completion in PAIRS]
# 48 steps of 2 examples, a checkpoint every 4 (each epoch): cheap, and long enough to be killed between two.
RESUMED = {"n_epochs": 12, "batch_size": 2, "learning_rate_multiplier": 5}
WAIT_S = 120.0


@pytest.fixture(scope="module")
def database(postgres_url: str) -> str:
    from tests.postgres_fixtures import fresh_database

    return fresh_database(postgres_url)


@pytest.fixture(scope="module")
def replicas(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    from tests.http_fixtures import start_server, stop_server

    model_dir = ensure_default_model(tmp_path_factory.mktemp("replica-model"))
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            data_dir = tmp_path_factory.mktemp(f"jobs-replica-{name}")
            servers.append(
                start_server(model_dir, data_dir, {}, "--store", database, "--job-lease-seconds", str(LEASE_SECONDS))
            )
        yield servers
    finally:
        for server in servers:
            stop_server(server)


def replica_id(server: Server) -> str:
    return httpx.get(f"{server.base_url}/info", timeout=30).json()["fine_tuning"]["replica"]


def owner_and_other(servers: list[Server], job: dict[str, Any]) -> tuple[Server, Server]:
    (owner,) = [server for server in servers if replica_id(server) == job["replica"]]
    return owner, next(server for server in servers if server is not owner)


def wait_running(server: Server, job_id: str, ready) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = get_job(server, job_id)
        if job["status"] == "running" and job["replica"] and ready(job):
            return job
        assert job["status"] in ("validating_files", "queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not running in {WAIT_S:.0f}s: {get_job(server, job_id)}")


def checkpoints(server: Server, job_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{server.base_url}/v1/fine_tuning/jobs/{job_id}/checkpoints", timeout=30).json()["data"]


def adapter_sha(server: Server, adapter_id: str) -> str:
    download = httpx.get(f"{server.base_url}/v1/adapters/{adapter_id}/download", timeout=30)
    assert download.status_code == 200, download.text
    return hashlib.sha256(download.content).hexdigest()


def test_a_training_file_uploaded_on_one_replica_is_read_on_the_other(replicas: list[Server]) -> None:
    a, b = replicas
    file_id = upload_training_file(a, ROWS)
    shown = httpx.get(f"{b.base_url}/v1/files/{file_id}", timeout=30)
    assert shown.status_code == 200 and shown.json()["id"] == file_id
    content = httpx.get(f"{b.base_url}/v1/files/{file_id}/content", timeout=30)
    assert content.status_code == 200 and content.content == jsonl(ROWS)


def test_a_cancel_on_a_replica_that_does_not_own_the_job_ends_it_cancelled(replicas: list[Server]) -> None:
    a, _ = replicas
    job = create_job(a, upload_training_file(a, ROWS), hyperparameters={"n_epochs": 1000, "batch_size": 2})
    job = wait_running(a, job["id"], lambda j: j["step"] >= 2)
    owner, other = owner_and_other(replicas, job)
    started = time.monotonic()
    response = httpx.post(f"{other.base_url}/v1/fine_tuning/jobs/{job['id']}/cancel", timeout=60)
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and cancelled["fine_tuned_model"] is None
    assert time.monotonic() - started < 5 * LEASE_SECONDS, "the owner saw the cancel at a renewal"
    for server in replicas:
        assert get_job(server, job["id"])["status"] == "cancelled"
        assert httpx.get(f"{server.base_url}/v1/adapters/{job['adapter_id']}", timeout=30).status_code == 404
        assert checkpoints(server, job["id"]) == []
    assert httpx.get(f"{owner.base_url}/info", timeout=30).json()["fine_tuning"]["training_state_bytes"] == 0
    assert httpx.post(f"{other.base_url}/v1/fine_tuning/jobs/{job['id']}/cancel", timeout=30).status_code == 409


def test_a_replica_whose_lease_was_taken_stops_the_job_and_a_claimant_finishes_it(
    replicas: list[Server], database: str
) -> None:
    a, _ = replicas
    job = create_job(a, upload_training_file(a, ROWS), seed=4, hyperparameters=RESUMED)
    job = wait_running(a, job["id"], lambda j: checkpoints(a, j["id"]) != [])
    owner, _ = owner_and_other(replicas, job)
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(
            "UPDATE jobs SET owner = 'elsewhere', lease_expires_at = extract(epoch FROM clock_timestamp()) + %s "
            "WHERE id = %s",
            (LEASE_SECONDS, job["id"]),
        )
    stopped = f"finetune job stopped id={job['id']}: lease lost"
    deadline = time.monotonic() + 10 * LEASE_SECONDS
    while stopped not in owner.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stopped in owner.log_path.read_text(), owner.log_tail()
    held = get_job(owner, job["id"])
    assert held["status"] == "running" and held["replica"] == "elsewhere" and held["step"] < held["total_steps"]
    time.sleep(0.5)
    assert get_job(owner, job["id"])["step"] == held["step"], "no step after the lease was lost"

    done = finished(owner, job["id"], timeout=WAIT_S)
    assert done["status"] == "succeeded", done["error"]
    assert any("training resumed from the checkpoint" in event["message"] for event in events(owner, job["id"]))


@pytest.mark.timeout(240)
def test_the_owner_killed_mid_job_the_other_replica_finishes_it_with_the_same_bytes(replicas: list[Server]) -> None:
    a, _ = replicas
    training_file = upload_training_file(a, ROWS)
    job = create_job(a, training_file, seed=3, suffix="resumed", hyperparameters=RESUMED)
    job = wait_running(a, job["id"], lambda j: checkpoints(a, j["id"]) != [])
    owner, survivor = owner_and_other(replicas, job)
    owner.process.send_signal(signal.SIGKILL)
    owner.process.wait(timeout=15)
    killed_at = get_job(survivor, job["id"])
    assert killed_at["status"] == "running" and killed_at["step"] < killed_at["total_steps"], killed_at

    resumed = finished(survivor, job["id"], timeout=WAIT_S)
    assert resumed["status"] == "succeeded", resumed["error"]
    notes = [event["message"] for event in events(survivor, job["id"])]
    (note,) = [note for note in notes if "training resumed from the checkpoint at step" in note]
    assert note.endswith(f"on replica {replica_id(survivor)}")

    reference = create_job(survivor, training_file, seed=3, suffix="reference", hyperparameters=RESUMED)
    reference = finished(survivor, reference["id"], timeout=WAIT_S)
    assert reference["status"] == "succeeded", reference["error"]
    assert adapter_sha(survivor, resumed["fine_tuned_model"]) == adapter_sha(survivor, reference["fine_tuned_model"])
    assert resumed["trained_tokens"] == reference["trained_tokens"]
