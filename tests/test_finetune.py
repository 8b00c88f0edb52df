"""Fine-tuning jobs against real ``spectra serve`` processes on the embedded default model.

The memorisation test is the issue's acceptance test: 8 prompt/completion pairs, trained with
each method, are reproduced exactly by greedy generation with the job's ``fine_tuned_model``
and by none of them with the base model. The loss threshold is what training reliably reaches:
over seeds 1-3 of both methods, the final loss was 1.88-2.05 nats with 8/8 pairs reproduced,
against 5.66 at step 0 (uniform over 264 ids is 5.58); see docs/finetuning.md.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.models.embedded import ensure_default_model
from server.spectral.formats import native
from server.spectral.model import routable_modules
from tests.conftest import load_base
from tests.engine_fixtures import random_adapter

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

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
MEMORISE = {"n_epochs": 100, "batch_size": 8, "learning_rate_multiplier": 5}
LOSS_THRESHOLD = 2.5
JOB_TIMEOUT_S = 240.0


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("default-model"))


@pytest.fixture(scope="module")
def ft_server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server

    server = start_server(default_model_dir, tmp_path_factory.mktemp("ft-data"), {})
    yield server
    stop_server(server)


def upload_training_file(server: Server, rows: list[dict[str, Any]]) -> str:
    response = httpx.post(
        f"{server.base_url}/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("train.jsonl", jsonl(rows), "application/jsonl")},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(server: Server, training_file: str, **fields: Any) -> dict[str, Any]:
    hyperparameters = fields.pop("hyperparameters", MEMORISE)
    body = {
        "model": server.model_name,
        "training_file": training_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        **fields,
    }
    response = httpx.post(f"{server.base_url}/v1/fine_tuning/jobs", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def get_job(server: Server, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/v1/fine_tuning/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(server: Server, job_id: str, done, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(server, job_id)
        if done(job):
            return job
        if job["status"] in ("failed", "cancelled", "succeeded"):
            raise AssertionError(f"job ended {job['status']} ({job['error']}):\n{server.log_tail()}")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not done in {timeout:.0f}s: {get_job(server, job_id)}")


def finished(server: Server, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(server, job_id)
        if job["status"] in ("failed", "cancelled", "succeeded"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not finished in {timeout:.0f}s:\n{server.log_tail()}")


def events(server: Server, job_id: str) -> list[dict[str, Any]]:
    """All of the job's events, oldest first."""
    collected: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"limit": 1000, **({"after": after} if after else {})}
        page = httpx.get(f"{server.base_url}/v1/fine_tuning/jobs/{job_id}/events", params=params, timeout=30).json()
        collected.extend(page["data"])
        if not page["has_more"]:
            return collected[::-1]
        after = page["data"][-1]["id"]


def generate(server: Server, prompt: str, adapter_id: str | None, max_new_tokens: int = 16) -> dict[str, Any]:
    parameters = {"max_new_tokens": max_new_tokens, "details": True, "adapter_id": adapter_id}
    response = httpx.post(f"{server.base_url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def reproduced(server: Server, adapter_id: str | None) -> int:
    """How many pairs greedy generation completes exactly: the completion, then the end-of-sequence token."""
    count = 0
    for prompt, completion in PAIRS:
        result = generate(server, prompt, adapter_id)
        count += result["generated_text"] == completion and result["details"]["finish_reason"] == "eos_token"
    return count


@pytest.mark.parametrize("method", ["fourierft", "sdctft"])
def test_a_job_memorises_eight_pairs_that_the_base_model_does_not_know(ft_server: Server, method: str) -> None:
    assert reproduced(ft_server, None) == 0
    training_file = upload_training_file(ft_server, [{"prompt": p, "completion": c} for p, c in PAIRS])
    validation = {"validation_file": training_file} if method == "fourierft" else {}
    job = create_job(ft_server, training_file, suffix=method, seed=1, adapter={"type": method}, **validation)
    assert job["status"] == "validating_files"
    assert job["adapter"]["method"] == method and job["fine_tuned_model"] is None

    job = finished(ft_server, job["id"])
    assert job["status"] == "succeeded", job["error"]
    adapter_id = job["fine_tuned_model"]
    assert adapter_id == f"ft-{method}-{job['id'].removeprefix('ftjob-')[:8]}"
    assert job["trained_tokens"] > 0 and job["step"] == job["total_steps"] == 100

    history = events(ft_server, job["id"])
    metrics = [event["data"] for event in history if event["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 101))
    assert metrics[0]["train_loss"] > 5.0
    assert metrics[-1]["train_loss"] < LOSS_THRESHOLD
    assert all(m["learning_rate"] > 0 and m["tokens_per_second"] > 0 for m in metrics)
    messages = [event["message"] for event in history if event["type"] == "message"]
    assert messages[-1] == "The job has successfully completed"
    assert "Fine-tuning job started" in messages

    checkpoints = httpx.get(f"{ft_server.base_url}/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [100, 90, 80]
    if validation:
        assert checkpoints[0]["metrics"]["valid_loss"] == pytest.approx(metrics[-1]["train_loss"], rel=0.05)
    detail = httpx.get(f"{ft_server.base_url}/v1/adapters/{adapter_id}").json()
    assert "versions" in detail, detail
    assert checkpoints[0]["fine_tuned_model_checkpoint"] == f"{adapter_id}@{detail['version']}"
    assert detail["method"] == method and len(detail["versions"]) == 3

    assert reproduced(ft_server, adapter_id) >= 7


def test_a_job_whose_loss_is_not_finite_fails_with_that_reason_and_leaves_no_adapter(float16_server: Server) -> None:
    """Valid data and settings, but a scaling whose dW overflows the float16 model's activations."""
    from tests.http_fixtures import OVERFLOWING_SCALING

    server = float16_server
    training_file = upload_training_file(server, [{"prompt": p, "completion": c} for p, c in PAIRS])
    job = create_job(
        server,
        training_file,
        hyperparameters={"n_epochs": 2, "batch_size": 4},
        adapter={"scaling": OVERFLOWING_SCALING, "init": "normal"},
    )
    job = finished(server, job["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "non_finite_loss"
    assert job["error"]["message"].startswith(("the training loss is nan at step 1", "the training loss is inf"))
    assert job["fine_tuned_model"] is None
    assert httpx.get(f"{server.base_url}/v1/adapters/{job['adapter_id']}").status_code == 404
    assert events(server, job["id"])[-1]["level"] == "error"
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert _info(server)["fine_tuning"]["training_state_bytes"] == 0


def _info(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.base_url}/info", timeout=30).json()


def _memory(info: dict[str, Any]) -> tuple:
    adapters = info["adapters"]
    return (
        adapters["registered"],
        adapters["resident"],
        adapters["resident_bytes"],
        info["fine_tuning"]["training_state_bytes"],
    )


def test_serving_during_a_job_is_batch_invariant_and_cancel_frees_its_memory(
    ft_server: Server, default_model_dir: Path
) -> None:
    shapes = routable_modules(load_base(default_model_dir))
    for seed in (1, 2):
        upload = httpx.post(
            f"{ft_server.base_url}/v1/adapters",
            data={"adapter_id": f"serve-{seed}"},
            files={"file": ("a.safetensors", native.to_bytes(random_adapter(shapes, seed, n=500, scaling=2000.0)))},
            timeout=30,
        )
        assert upload.status_code == 201, upload.text
    requests = [(prompt, adapter) for prompt, _ in PAIRS[:4] for adapter in (None, "serve-1", "serve-2")]
    alone_before = [generate(ft_server, prompt, adapter, 24)["generated_text"] for prompt, adapter in requests]
    before = _memory(_info(ft_server))

    training_file = upload_training_file(ft_server, [{"prompt": p, "completion": c} for p, c in PAIRS])
    job = create_job(
        ft_server, training_file, hyperparameters={"n_epochs": 1000, "batch_size": 2}, adapter={"type": "sdctft"}
    )
    wait_for(ft_server, job["id"], lambda j: j["status"] == "running" and j["step"] >= 2)
    assert _info(ft_server)["fine_tuning"]["training_state_bytes"] > 0

    with ThreadPoolExecutor(len(requests)) as pool:
        batched = list(pool.map(lambda r: generate(ft_server, r[0], r[1], 24)["generated_text"], requests))
    alone_during = [generate(ft_server, prompt, adapter, 24)["generated_text"] for prompt, adapter in requests]
    running = get_job(ft_server, job["id"])
    assert running["status"] == "running" and running["step"] > 2, "the job stalled while requests were served"
    assert batched == alone_before
    assert alone_during == alone_before

    cancelled = httpx.post(f"{ft_server.base_url}/v1/fine_tuning/jobs/{job['id']}/cancel", timeout=60).json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["fine_tuned_model"] is None
    assert httpx.get(f"{ft_server.base_url}/v1/adapters/{job['adapter_id']}").status_code == 404
    checkpoints = httpx.get(f"{ft_server.base_url}/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
    assert checkpoints["data"] == []
    assert _memory(_info(ft_server)) == before
    again = httpx.post(f"{ft_server.base_url}/v1/fine_tuning/jobs/{job['id']}/cancel", timeout=30)
    assert again.status_code == 409


@pytest.mark.parametrize(
    ("change", "status", "fragment"),
    [
        ({"model": "gpt-4o-mini"}, 422, "not served here"),
        ({"training_file": "file-000000000000000000000000"}, 404, "not found"),
        ({"adapter": {"type": "lora"}}, 422, "adapter.type"),
        ({"adapter": {"target_modules": ["nonexistent"]}}, 422, "match no linear layer"),
        ({"adapter": {"n_frequency": 10**9}}, 422, "exceeds"),
        ({"adapter": {"scaling": 1e39}}, 422, "scaling must be a non-zero number of magnitude at most 3.403e+38"),
        ({"adapter": {"scaling": 0}}, 422, "scaling must be a non-zero number"),
        ({"adapter": {"type": "fourierft", "delta": 0.5}}, 422, "sdctft"),
        ({"suffix": "bad suffix!"}, 422, "suffix"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, 422, "n_epochs"),
        ({"method": {"type": "dpo"}}, 422, "method.type"),
        (
            {"method": {"supervised": {"hyperparameters": {"learning_rate_multiplier": 1e30}}}},
            422,
            "learning_rate_multiplier must be 'auto' or in (0, 1000]",
        ),
    ],
)
def test_invalid_job_requests_say_what_to_fix(ft_server: Server, change: dict, status: int, fragment: str) -> None:
    training_file = upload_training_file(ft_server, [{"prompt": "a", "completion": "b"}])
    body = {"model": ft_server.model_name, "training_file": training_file, **change}
    jobs_before = httpx.get(f"{ft_server.base_url}/v1/fine_tuning/jobs", params={"limit": 1000}).json()["data"]
    response = httpx.post(f"{ft_server.base_url}/v1/fine_tuning/jobs", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    jobs_after = httpx.get(f"{ft_server.base_url}/v1/fine_tuning/jobs", params={"limit": 1000}).json()["data"]
    assert len(jobs_after) == len(jobs_before)


def test_a_batch_larger_than_the_file_fails_the_job_at_validation(ft_server: Server) -> None:
    training_file = upload_training_file(ft_server, [{"prompt": "a", "completion": "b"}] * 3)
    job = create_job(ft_server, training_file, hyperparameters={"batch_size": 8})
    job = finished(ft_server, job["id"])
    assert job["status"] == "failed"
    assert job["error"]["param"] == "method.supervised.hyperparameters.batch_size"
    assert "larger than the 3 training examples" in job["error"]["message"]


def _adapter_sha(server: Server, ref: str) -> str:
    return hashlib.sha256(httpx.get(f"{server.base_url}/v1/adapters/{ref}/download", timeout=30).content).hexdigest()


def test_kill_9_mid_job_resumes_from_the_last_checkpoint_with_the_same_result(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """A resumed job ends with the bytes an uninterrupted job with the same seed produces; a queued job runs."""
    from tests.http_fixtures import start_server, stop_server

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    hyperparameters = {"n_epochs": 60, "batch_size": 8, "learning_rate_multiplier": 5}
    server = start_server(default_model_dir, data_dir, {})
    training_file = upload_training_file(server, rows)
    interrupted = create_job(server, training_file, seed=3, suffix="resumed", hyperparameters=hyperparameters)
    queued = create_job(server, training_file, seed=3, suffix="reference", hyperparameters=hyperparameters)
    wait_for(server, interrupted["id"], lambda j: j["status"] == "running" and j["step"] >= 10)
    assert get_job(server, queued["id"])["status"] == "queued"
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=15)

    server = start_server(default_model_dir, data_dir, {})
    try:
        resumed = finished(server, interrupted["id"])
        reference = finished(server, queued["id"])
        assert resumed["status"] == reference["status"] == "succeeded"
        notes = [event["message"] for event in events(server, interrupted["id"])]
        assert any(
            note.startswith("The server restarted; training resumed from the checkpoint at step") for note in notes
        )
        assert _adapter_sha(server, resumed["fine_tuned_model"]) == _adapter_sha(server, reference["fine_tuned_model"])
        assert resumed["trained_tokens"] == reference["trained_tokens"]
    finally:
        stop_server(server)


def test_unknown_list_cursors_are_404_naming_the_cursor(ft_server: Server) -> None:
    training_file = upload_training_file(ft_server, [{"prompt": "a", "completion": "b"}])
    job = create_job(ft_server, training_file, hyperparameters={"n_epochs": 1, "batch_size": 1})
    finished(ft_server, job["id"])
    base = f"{ft_server.base_url}/v1/fine_tuning/jobs"
    for url, cursor in [
        (base, "ftjob-nope"),
        (f"{base}/{job['id']}/events", "bogus"),
        (f"{base}/{job['id']}/events", "ftevent-x"),
        (f"{base}/{job['id']}/checkpoints", "ftckpt-nope"),
    ]:
        response = httpx.get(url, params={"after": cursor}, timeout=30)
        assert response.status_code == 404, (url, response.text)
        assert response.json()["error"]["param"] == "after" and cursor in response.json()["error"]["message"]


def test_the_openai_sdk_drives_a_job_end_to_end(ft_server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{ft_server.base_url}/v1", api_key="unused", max_retries=0)
    uploaded = client.files.create(
        file=("train.jsonl", jsonl([{"prompt": p, "completion": c} for p, c in PAIRS])), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=ft_server.model_name,
        training_file=uploaded.id,
        suffix="sdk",
        seed=2,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 4}}},
        extra_body={"adapter": {"type": "sdctft", "n_frequency": 500}},
    )
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 4
    done = finished(ft_server, job.id)
    assert done["status"] == "succeeded"
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.fine_tuned_model == done["fine_tuned_model"] and job.trained_tokens == done["trained_tokens"]
    assert job.id in [listed.id for listed in client.fine_tuning.jobs.list(limit=100).data]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"
    assert [event.data["step"] for event in events if event.type == "metrics"] == list(range(8, 0, -1))
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [checkpoint.step_number for checkpoint in checkpoints] == [8, 6, 4]
    completion = client.completions.create(model=job.fine_tuned_model, prompt="2 + 2 =", max_tokens=4, temperature=0)
    assert completion.model == job.fine_tuned_model
    with pytest.raises(openai.ConflictError, match="has already finished"):
        client.fine_tuning.jobs.cancel(job.id)

    exposition = httpx.get(f"{ft_server.base_url}/metrics", timeout=30).text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    assert samples[("spectra_finetune_steps_total", ())] >= 8
    assert samples[("spectra_finetune_jobs", (("status", "succeeded"),))] >= 1
    assert samples[("spectra_finetune_last_train_loss", ())] > 0
