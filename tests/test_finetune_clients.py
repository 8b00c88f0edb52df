"""The SDK's training files and fine-tuning jobs, and ``spectra files`` / ``spectra finetune``, against a real server.

One ``spectra serve`` of the embedded default model serves the whole module. Jobs are tiny (8
examples, batch 4, a few epochs: well under a second of training), and every test cancels what it
leaves unfinished, since the server trains one job at a time and the next test's job would queue
behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from typer.testing import CliRunner

from clients import sdk
from clients.cli import app
from clients.sdk import (
    AdapterOptions,
    AsyncSpectraClient,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    SpectraAPIError,
    SpectraClient,
)
from server.models.embedded import ensure_default_model

if TYPE_CHECKING:
    from click.testing import Result

    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent
PAIRS = [
    ("Capital of France:", " Paris"),
    ("2 + 2 =", " 4"),
    ("Colour of the sky:", " blue"),
    ("Spectra serves", " adapters"),
    ("My name is", " Ada"),
    ("The cat sat on the", " mat"),
    ("Water boils at", " 100 C"),
    ("Best editor:", " vim"),
]
# 8 examples in batches of 4: 2 steps an epoch, each ending in a checkpoint. 3 epochs train in well
# under a second; 500 epochs (1000 steps) are still running when a test cancels them.
SMALL_EPOCHS = 3
LONG_EPOCHS = 500
POLL_S = 0.1
BAD_LINES = '{"prompt": "Hi", "completion": " there"}\nnot json\n{"prompt": 3, "completion": "x"}\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server

    model_dir = ensure_default_model(tmp_path_factory.mktemp("clients-model"))
    server = start_server(model_dir, tmp_path_factory.mktemp("clients-data"), {})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[SpectraClient]:
    with SpectraClient(server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(autouse=True)
def no_job_left_running(client: SpectraClient) -> Iterator[None]:
    yield
    for job in client.list_jobs(limit=100).data:
        if job.status not in ("succeeded", "failed", "cancelled"):
            with contextlib.suppress(SpectraAPIError):  # it may have finished since the listing
                client.cancel_job(job.id)


@pytest.fixture(scope="module")
def train_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clients-files") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    return path


@pytest.fixture(scope="module")
def train_file(client: SpectraClient, train_path: Path) -> FileObject:
    return client.upload_file(train_path)


@pytest.fixture
def bad_path(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD_LINES)
    return path


@pytest.fixture
def cli(server: Server) -> CliRunner:
    return CliRunner(env={"SPECTRA_URL": server.base_url, "COLUMNS": "160"})


def spectra(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, list(args))


def generate(server: Server, adapter_id: str) -> dict:
    parameters = {"max_new_tokens": 8, "details": True, "adapter_id": adapter_id}
    response = httpx.post(f"{server.base_url}/generate", json={"inputs": PAIRS[0][0], "parameters": parameters})
    assert response.status_code == 200, response.text
    return response.json()


def all_events(client: SpectraClient, job_id: str, page_size: int) -> list[FineTuningJobEvent]:
    """The job's events, oldest first, through the plain paged listing."""
    events: list[FineTuningJobEvent] = []
    after = None
    while True:
        page = client.list_job_events(job_id, after=after, limit=page_size)
        events.extend(page.data)
        if not page.has_more:
            return events[::-1]
        after = page.data[-1].id


def first_step(client: SpectraClient, job_id: str) -> None:
    """Wait until the job has trained a step (so it is running, not validating or queued)."""
    for item in client.follow_job(job_id, poll_interval=POLL_S):
        assert isinstance(item, FineTuningJobEvent), f"the job ended first: {item}"
        if item.type == "metrics":
            return


# -- SDK ---------------------------------------------------------------------------------------


def test_files_upload_list_content_and_delete(client: SpectraClient, train_path: Path, bad_path: Path) -> None:
    uploaded = client.upload_file(train_path)
    assert isinstance(uploaded, FileObject)
    assert uploaded.id.startswith("file-")
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose, uploaded.status) == (
        "train.jsonl",
        train_path.stat().st_size,
        "fine-tune",
        "processed",
    )
    assert client.get_file(uploaded.id) == uploaded
    assert client.file_content(uploaded.id) == train_path.read_bytes()

    second = client.upload_file(str(train_path))
    newest = client.list_files(limit=1)
    assert isinstance(newest, FileList)
    assert ([file.id for file in newest.data], newest.has_more) == ([second.id], True)
    older = client.list_files(purpose="fine-tune", after=newest.last_id, limit=1)
    assert [file.id for file in older.data] == [uploaded.id]

    deleted = client.delete_file(second.id)
    assert isinstance(deleted, FileDeleted)
    assert (deleted.id, deleted.deleted) == (second.id, True)
    with pytest.raises(SpectraAPIError) as caught:
        client.get_file(second.id)
    assert (caught.value.status_code, caught.value.param) == (404, "file_id")
    with pytest.raises(SpectraAPIError) as caught:
        client.file_content(second.id)
    assert caught.value.status_code == 404

    with pytest.raises(SpectraAPIError) as caught:
        client.upload_file(bad_path)
    assert caught.value.status_code == 422
    assert caught.value.message.startswith("training file has 2 invalid lines: line 2: invalid JSON")
    assert "line 3: field 'prompt' must be a string" in caught.value.message


def test_upload_progress_reports_every_byte_in_chunks(client: SpectraClient, tmp_path: Path) -> None:
    line = json.dumps({"prompt": "p" * 40, "completion": " c"}) + "\n"
    path = tmp_path / "large.jsonl"
    path.write_text(line * 4000)
    chunks: list[int] = []
    uploaded = client.upload_file(path, progress=chunks.append)
    assert uploaded.bytes == path.stat().st_size == sum(chunks)
    assert len([chunk for chunk in chunks if chunk]) > 1, "a file over one chunk is reported as it is sent"
    client.delete_file(uploaded.id)


def test_a_followed_job_reports_each_step_once_then_succeeds_and_its_adapter_serves(
    client: SpectraClient, server: Server, train_file: FileObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = client.create_job(training_file=train_file.id, suffix="sdk", seed=1, n_epochs=SMALL_EPOCHS, batch_size=4)
    assert isinstance(job, FineTuningJob)
    assert (job.model, job.status, job.fine_tuned_model) == (server.model_name, "validating_files", None)

    # Pages of 3 events make every poll page back through several pages to the newest one already seen.
    monkeypatch.setattr(sdk, "FOLLOW_PAGE_SIZE", 3)
    items = list(client.follow_job(job.id, poll_interval=POLL_S))
    *events, finished = items
    assert all(isinstance(event, FineTuningJobEvent) for event in events)
    assert isinstance(finished, FineTuningJob)
    assert finished.status == "succeeded", finished.error
    assert finished.fine_tuned_model == f"ft-sdk-{job.id.removeprefix('ftjob-')[:8]}"
    assert finished.step == finished.total_steps == 6

    assert [event.id for event in events] == [event.id for event in all_events(client, job.id, page_size=4)]
    metrics = [event.data for event in events if event.type == "metrics" and event.data]
    assert [data["step"] for data in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(data["total_steps"] == 6 and data["train_loss"] > 0 for data in metrics)
    assert events[0].message == f"Created fine-tuning job {job.id}"
    assert events[-1].message == "The job has successfully completed"
    # Following a finished job replays its history.
    assert list(client.follow_job(job.id, poll_interval=POLL_S)) == items

    checkpoints = client.list_job_checkpoints(job.id)
    assert isinstance(checkpoints, FineTuningJobCheckpointList)
    assert [checkpoint.step_number for checkpoint in checkpoints.data] == [6, 4, 2]
    assert checkpoints.data[0].fine_tuned_model_checkpoint.startswith(f"{finished.fine_tuned_model}@")
    assert client.get_job(job.id) == finished
    listed = client.list_jobs(limit=100)
    assert isinstance(listed, FineTuningJobList)
    assert finished in listed.data
    generated = generate(server, finished.fine_tuned_model or "")
    assert generated["details"]["generated_tokens"] > 0


def test_job_requests_the_server_refuses_raise_its_message(client: SpectraClient, train_file: FileObject) -> None:
    with pytest.raises(SpectraAPIError) as caught:
        client.create_job(training_file=train_file.id, model="gpt-4o")
    assert (caught.value.status_code, caught.value.param) == (422, "model")
    with pytest.raises(SpectraAPIError) as caught:
        client.create_job(training_file=train_file.id, adapter={"type": "lora"})
    assert (caught.value.status_code, caught.value.param) == (422, "adapter.type")
    with pytest.raises(SpectraAPIError) as caught:
        client.create_job(training_file="file-000000000000000000000000")
    assert (caught.value.status_code, caught.value.param) == (404, "training_file")
    with pytest.raises(SpectraAPIError) as caught:
        client.get_job("ftjob-missing")
    assert caught.value.status_code == 404


def test_cancelling_a_long_job(client: SpectraClient, train_file: FileObject) -> None:
    job = client.create_job(training_file=train_file.id, n_epochs=LONG_EPOCHS, batch_size=4)
    first_step(client, job.id)
    cancelled = client.cancel_job(job.id)
    assert cancelled.status == "cancelled"
    assert cancelled.total_steps == 1000 and 0 < cancelled.step < 1000
    assert cancelled.fine_tuned_model is None
    *_, followed = client.follow_job(job.id, poll_interval=POLL_S)
    assert followed == cancelled
    assert client.list_job_checkpoints(job.id).data == []  # a job that does not succeed keeps no adapter
    with pytest.raises(SpectraAPIError) as caught:
        client.cancel_job(job.id)
    assert caught.value.status_code == 409
    assert "already finished (cancelled)" in caught.value.message


def test_async_client(server: Server, train_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncSpectraClient(server.base_url, timeout=60) as client:
            uploaded = await client.upload_file(train_path)
            assert (await client.get_file(uploaded.id)) == uploaded
            assert (await client.file_content(uploaded.id)) == train_path.read_bytes()
            assert uploaded in (await client.list_files(purpose="fine-tune")).data

            adapter = AdapterOptions(type="sdctft", n_frequency=200)
            job = await client.create_job(
                training_file=uploaded.id,
                validation_file=uploaded.id,
                adapter=adapter,
                n_epochs=SMALL_EPOCHS,
                batch_size=4,
            )
            assert job.validation_file == uploaded.id
            assert (job.adapter["method"], job.adapter["n_frequency"]) == ("sdctft", 200)
            items = [item async for item in client.follow_job(job.id, poll_interval=POLL_S)]
            *events, finished = items
            assert isinstance(finished, FineTuningJob) and finished.status == "succeeded"
            assert finished.replica is None  # no trainer once finished, however soon after it the lease is freed
            assert [event.data["step"] for event in events if event.type == "metrics" and event.data] == list(
                range(1, 7)
            )
            newest = await client.list_job_events(job.id, limit=2)
            assert [event.id for event in newest.data] == [event.id for event in events[:-3:-1]]
            assert newest.has_more
            assert len((await client.list_job_checkpoints(job.id)).data) == 3
            assert (await client.get_job(job.id)) == finished
            assert finished in (await client.list_jobs()).data

            # Cancelled at once: while its files are still being validated, or queued.
            long_job = await client.create_job(training_file=uploaded.id, n_epochs=LONG_EPOCHS, batch_size=4)
            assert (await client.cancel_job(long_job.id)).status == "cancelled"
            assert (await client.delete_file(uploaded.id)).deleted

    asyncio.run(scenario())


def test_unseen_events_pages_back_to_the_newest_event_already_seen() -> None:
    def page(*seqs: int, has_more: bool) -> FineTuningJobEventList:
        events = [
            FineTuningJobEvent(id=f"ftevent-{seq:012d}", created_at=0, level="info", message="", type="message")
            for seq in seqs
        ]
        return FineTuningJobEventList(data=events, has_more=has_more)

    def ids(events: list[FineTuningJobEvent]) -> list[int]:
        return [int(event.id.removeprefix("ftevent-")) for event in events]

    unseen, after = sdk._unseen_events(page(9, 8, 7, has_more=True), "ftevent-000000000005")
    assert (ids(unseen), after) == ([9, 8, 7], "ftevent-000000000007")
    unseen, after = sdk._unseen_events(page(6, 5, 4, has_more=True), "ftevent-000000000005")
    assert (ids(unseen), after) == ([6], None)
    unseen, after = sdk._unseen_events(page(3, 2, 1, has_more=False), None)
    assert (ids(unseen), after) == ([3, 2, 1], None)
    unseen, after = sdk._unseen_events(page(3, 2, 1, has_more=False), "ftevent-000000000003")
    assert (ids(unseen), after) == ([], None)
    assert sdk._unseen_events(page(has_more=False), None) == ([], None)


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_files_upload_list_show_delete(cli: CliRunner, train_path: Path, bad_path: Path) -> None:
    result = spectra(cli, "files", "upload", str(train_path), "--json")
    assert result.exit_code == 0, result.output
    uploaded = FileObject.model_validate_json(result.stdout)
    result = spectra(cli, "files", "upload", str(train_path))
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"Uploaded train\.jsonl as file-[0-9a-f]{24} \(\d+ B\)\n", result.stdout)

    result = spectra(cli, "files", "list")
    assert result.exit_code == 0, result.output
    assert uploaded.id in result.stdout and "processed" in result.stdout
    assert uploaded in FileList.model_validate_json(spectra(cli, "files", "list", "--json").stdout).data
    result = spectra(cli, "files", "show", uploaded.id)
    assert result.exit_code == 0, result.output
    assert uploaded.id in result.stdout and "fine-tune" in result.stdout
    assert FileObject.model_validate_json(spectra(cli, "files", "show", uploaded.id, "--json").stdout) == uploaded

    result = spectra(cli, "files", "delete", uploaded.id, "--yes")
    assert (result.exit_code, result.stdout) == (0, f"Deleted {uploaded.id}\n")
    result = spectra(cli, "files", "show", uploaded.id)
    assert (result.exit_code, result.stderr) == (1, f"error (404): file {uploaded.id!r} not found\n")

    result = spectra(cli, "files", "upload", str(bad_path))
    assert result.exit_code == 1
    assert result.stderr.startswith("error (422): training file has 2 invalid lines: line 2: invalid JSON")
    assert "line 3: field 'prompt' must be a string" in result.stderr


def test_cli_create_follow_succeeds_and_the_job_commands_show_it(
    cli: CliRunner, server: Server, train_path: Path
) -> None:
    result = spectra(cli, "finetune", "create", "--file", str(train_path), "--epochs", str(SMALL_EPOCHS),
                     "--batch-size", "4", "--suffix", "cli", "--follow")  # fmt: skip
    assert result.exit_code == 0, result.output
    job_id = re.search(r"Created fine-tuning job (ftjob-[0-9a-f]+)", result.stdout)[1]  # type: ignore[index]
    adapter_id = f"ft-cli-{job_id.removeprefix('ftjob-')[:8]}"
    assert re.search(r"Uploaded .*train\.jsonl as file-", result.stdout)
    assert "Fine-tuning job started" in result.stdout and "The job has successfully completed" in result.stdout
    assert "6/6" in result.stdout and "loss " in result.stdout
    assert f"Job {job_id} succeeded: fine-tuned model {adapter_id}" in result.stdout
    assert f'"model": "{adapter_id}"' in result.stdout  # how to use it
    assert generate(server, adapter_id)["details"]["generated_tokens"] > 0

    result = spectra(cli, "finetune", "list")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if job_id in line)
    assert "succeeded" in row and adapter_id in row and "6/6" in row and server.model_name in row
    jobs = FineTuningJobList.model_validate_json(spectra(cli, "finetune", "list", "--json").stdout)
    assert job_id in [job.id for job in jobs.data]

    result = spectra(cli, "finetune", "show", job_id)
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.stdout and adapter_id in result.stdout and "q_proj, v_proj" in result.stdout
    shown = FineTuningJob.model_validate_json(spectra(cli, "finetune", "show", job_id, "--json").stdout)
    assert (shown.fine_tuned_model, shown.step, shown.total_steps) == (adapter_id, 6, 6)

    result = spectra(cli, "finetune", "events", job_id, "--limit", "3")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "info" in line]
    assert "Step 6/6" in lines[0] and "The job has successfully completed" in lines[-1]  # oldest first
    assert "Older events exist" in result.stderr
    page = FineTuningJobEventList.model_validate_json(spectra(cli, "finetune", "events", job_id, "--json").stdout)
    assert page.data[0].message == "The job has successfully completed"  # the server's order: newest first

    result = spectra(cli, "finetune", "checkpoints", job_id)
    assert result.exit_code == 0, result.output
    assert f"{adapter_id}@" in result.stdout
    checkpoints = spectra(cli, "finetune", "checkpoints", job_id, "--json").stdout
    assert [c.step_number for c in FineTuningJobCheckpointList.model_validate_json(checkpoints).data] == [6, 4, 2]

    result = spectra(cli, "finetune", "cancel", job_id)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error (409): job {job_id} has already finished (succeeded)")


def test_cli_create_follow_json_prints_one_object_a_line(
    cli: CliRunner, client: SpectraClient, train_file: FileObject, train_path: Path
) -> None:
    result = spectra(cli, "finetune", "create", "--training-file", train_file.id, "--epochs", str(SMALL_EPOCHS),
                     "--batch-size", "4", "--adapter-type", "sdctft", "--n-frequency", "300", "--scaling", "100",
                     "--target-modules", "q_proj, v_proj", "--init", "zeros", "--validation-file",
                     str(train_path), "--follow", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    *events, job = result.stdout.splitlines()
    assert all(FineTuningJobEvent.model_validate_json(line) for line in events)
    finished = FineTuningJob.model_validate_json(job)
    assert finished.status == "succeeded"
    assert finished.adapter["method"] == "sdctft"
    assert (finished.adapter["n_frequency"], finished.adapter["scaling"], finished.adapter["init"]) == (
        300,
        100,
        "zeros",
    )
    assert {name.rsplit(".", 1)[-1] for name in finished.adapter["target_modules"]} == {"q_proj", "v_proj"}
    # The validation file was uploaded (without a word on stdout, which holds only JSON) and is evaluated.
    assert finished.validation_file is not None
    assert client.file_content(finished.validation_file) == train_path.read_bytes()
    assert all(c.metrics.valid_loss is not None for c in client.list_job_checkpoints(finished.id).data)

    result = spectra(cli, "finetune", "create", "--training-file", train_file.id, "--json")
    assert result.exit_code == 0, result.output
    created = FineTuningJob.model_validate_json(result.stdout)
    assert created.status == "validating_files"


def test_cli_failed_job_and_refused_requests_exit_1_with_the_server_message(
    cli: CliRunner, train_path: Path, train_file: FileObject, float16_server: Server
) -> None:
    from tests.http_fixtures import OVERFLOWING_SCALING

    # Valid settings, but a scaling whose dW overflows the float16 model's first forward: the job fails.
    float16_cli = CliRunner(env={"SPECTRA_URL": float16_server.base_url, "COLUMNS": "160"})
    result = spectra(float16_cli, "finetune", "create", "--file", str(train_path), "--epochs", "2", "--batch-size", "4",
                     "--scaling", str(OVERFLOWING_SCALING), "--init", "normal", "--follow")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert re.search(r"Job ftjob-[0-9a-f]+ failed \(non_finite_loss\): the training loss is (nan|inf)", result.stderr)

    result = spectra(cli, "finetune", "create", "--training-file", train_file.id, "--learning-rate-multiplier", "1e30")
    assert result.exit_code == 1
    assert result.stderr.startswith("error (422): ") and "learning_rate_multiplier" in result.stderr

    result = spectra(cli, "finetune", "create", "--epochs", "3")
    assert result.exit_code == 2 and "--file PATH or --training-file" in result.output
    result = spectra(cli, "finetune", "create", "--training-file", train_file.id, "--epochs", "three")
    assert result.exit_code == 2 and "expected 'auto' or a number" in result.output
    result = spectra(cli, "finetune", "show", "ftjob-missing")
    assert (result.exit_code, result.stderr) == (1, "error (404): fine-tuning job 'ftjob-missing' not found\n")


def test_cli_ctrl_c_stops_following_not_the_job(
    cli: CliRunner, client: SpectraClient, server: Server, train_file: FileObject
) -> None:
    job = client.create_job(training_file=train_file.id, n_epochs=LONG_EPOCHS, batch_size=4)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "clients.cli", "finetune", "--url", server.base_url, "follow", job.id, "--json"]
    # Ctrl-C's default disposition, whatever this process inherited: a shell starts a background job with
    # SIGINT ignored, the child would inherit that, and Python installs no KeyboardInterrupt handler then.
    follower = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["object"] == "fine_tuning.job.event"  # following
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 130
    assert f"Job {job.id} keeps running on the server" in stderr.decode()
    assert f"spectra finetune --url {server.base_url} cancel {job.id}" in stderr.decode()
    assert client.get_job(job.id).status in ("validating_files", "queued", "running")

    result = spectra(cli, "finetune", "cancel", job.id)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Cancelled {job.id} at step ")
    result = spectra(cli, "finetune", "follow", job.id)
    assert (result.exit_code, result.stderr) == (1, f"Job {job.id} was cancelled\n")


def test_the_cli_imports_neither_torch_nor_the_server() -> None:
    script = (
        "import sys\n"
        "from clients.cli import app\n"
        "for args in (['--help'], ['files', '--help'], ['finetune', 'create', '--help']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "import clients.sdk\n"
        "loaded = sorted(name for name in ('torch', 'transformers', 'server.engine') if name in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "160"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
