"""``GET /metrics`` against a real server: names and types, values that follow the traffic, bounded
adapter labels, ``promtool check metrics``, and a real Prometheus scraping it.

promtool and prometheus come from Debian's ``prometheus`` package, which ``.ci/run`` installs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from server.spectral.formats import native
from server.spectral.model import routable_modules
from tests.conftest import load_base
from tests.engine_fixtures import random_adapter

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

LORA_INFO = "vllm:lora_requests_info"

EXPECTED_TYPES = {
    "spectra_http_requests": "counter",
    "spectra_http_request_duration_seconds": "histogram",
    "spectra_prompt_tokens": "counter",
    "spectra_generation_tokens": "counter",
    "spectra_requests_finished": "counter",
    "spectra_time_to_first_token_seconds": "histogram",
    "spectra_time_per_output_token_seconds": "histogram",
    "spectra_e2e_request_latency_seconds": "histogram",
    "spectra_request_queue_time_seconds": "histogram",
    "spectra_batch_size": "histogram",
    "spectra_adapter_loads": "counter",
    "spectra_adapter_evictions": "counter",
    "spectra_adapter_load_seconds": "histogram",
    "spectra_adapter_requests": "counter",
    "spectra_finetune_steps": "counter",
    "spectra_finetune_last_train_loss": "gauge",
    "spectra_queue_length": "gauge",
    "spectra_requests_running": "gauge",
    "spectra_adapters_registered": "gauge",
    "spectra_adapters_resident": "gauge",
    "spectra_adapter_bank_bytes": "gauge",
    "spectra_kv_cache_bytes": "gauge",
    "spectra_finetune_jobs": "gauge",
    "process_resident_memory_bytes": "gauge",
    "python_gc_collections": "counter",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: install Debian's 'prometheus' package (.ci/run does)")
    return path


@pytest.fixture(scope="module")
def metrics_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server

    server = start_server(tiny_llama_dir, tmp_path_factory.mktemp("metrics-data"), {}, "--metrics-adapter-labels", "2")
    shapes = routable_modules(load_base(tiny_llama_dir))
    for index in range(3):
        adapter = native.to_bytes(random_adapter(shapes, 40 + index))
        response = httpx.post(
            f"{server.base_url}/v1/adapters",
            data={"adapter_id": f"m{index}"},
            files={"file": ("a.safetensors", adapter)},
            timeout=30,
        )
        assert response.status_code == 201, response.text
    yield server
    stop_server(server)


def scrape(server: Server) -> tuple[str, dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text, {family.name: family for family in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    family = families[name]
    wanted = sample or (name + ("_total" if family.type == "counter" else ""))
    return sum(
        sample.value
        for sample in family.samples
        if sample.name == wanted and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def generate(server: Server, adapter_id: str | None, max_new_tokens: int) -> dict[str, Any]:
    parameters = {"max_new_tokens": max_new_tokens, "details": True, "adapter_id": adapter_id}
    response = httpx.post(f"{server.base_url}/generate", json={"inputs": "Hello", "parameters": parameters}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_metric_is_exposed_with_its_type(metrics_server: Server) -> None:
    _, families = scrape(metrics_server)
    assert {name: families[name].type for name in EXPECTED_TYPES if name in families} == EXPECTED_TYPES
    assert not [name for name in families if name.endswith("_created")]
    statuses = {s.labels["status"] for s in families["spectra_finetune_jobs"].samples}
    assert statuses == {"validating_files", "queued", "running", "succeeded", "failed", "cancelled"}
    assert value(families, "spectra_adapters_registered") == 3


def test_values_follow_the_traffic(metrics_server: Server) -> None:
    _, before = scrape(metrics_server)
    results = [generate(metrics_server, adapter, 7) for adapter in (None, "m0", "m0")]
    generated = sum(result["details"]["generated_tokens"] for result in results)
    unknown = {"inputs": "x", "parameters": {"adapter_id": "nope"}}
    assert httpx.post(f"{metrics_server.base_url}/generate", json=unknown, timeout=30).status_code == 404
    httpx.get(f"{metrics_server.base_url}/no/such/path")
    _, after = scrape(metrics_server)

    def delta(name: str, sample: str | None = None, **labels: str) -> float:
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    assert delta("spectra_generation_tokens") == generated
    prompt_tokens = len(AutoTokenizer.from_pretrained(metrics_server.model_dir).encode("Hello"))
    assert delta("spectra_prompt_tokens") == 3 * prompt_tokens
    assert delta("spectra_time_to_first_token_seconds", "spectra_time_to_first_token_seconds_count") == 3
    assert delta("spectra_e2e_request_latency_seconds", "spectra_e2e_request_latency_seconds_count") == 3
    assert delta("spectra_request_queue_time_seconds", "spectra_request_queue_time_seconds_count") == 3
    assert delta("spectra_time_per_output_token_seconds", "spectra_time_per_output_token_seconds_count") == 3
    assert delta("spectra_requests_finished", finish_reason="length") == 3
    assert delta("spectra_http_requests", route="/generate", method="POST", status="200") == 3
    assert delta("spectra_http_requests", route="/generate", method="POST", status="404") == 1
    assert delta("spectra_http_requests", route="unmatched", method="GET", status="404") == 1
    assert delta("spectra_adapter_requests", adapter="m0") == 2
    assert delta("spectra_adapter_requests", adapter="__base__") == 1
    assert delta("spectra_batch_size", "spectra_batch_size_count") >= 6 * 3
    assert value(after, "spectra_adapters_resident") >= 1
    assert value(after, "spectra_adapter_bank_bytes") > 0
    assert value(after, "spectra_kv_cache_bytes") > 0
    assert value(after, "spectra_adapter_loads") >= 1
    assert value(after, "spectra_adapter_load_seconds", "spectra_adapter_load_seconds_count") >= 1


def test_adapter_labels_are_bounded(metrics_server: Server) -> None:
    for adapter in ("m0", "m1", "m2"):
        generate(metrics_server, adapter, 1)
    _, families = scrape(metrics_server)
    labels = {s.labels["adapter"] for s in families["spectra_adapter_requests"].samples}
    assert labels <= {"__base__", "m0", "m1", "__other__"}
    assert "m2" not in labels and value(families, "spectra_adapter_requests", adapter="__other__") >= 1


def test_promtool_accepts_the_exposition(metrics_server: Server) -> None:
    generate(metrics_server, "m1", 3)
    text, _ = scrape(metrics_server)
    checked = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    # vLLM's router-facing gauge keeps vLLM's name, colon included (GIE endpoint pickers look for it): that
    # one lint finding is expected; any other, or a parse error, fails.
    findings = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    assert findings == [f"{LORA_INFO} metric names should not contain ':'"], findings

    lone = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input="\n".join(line for line in text.splitlines() if LORA_INFO not in line) + "\n",
        capture_output=True,
        text=True,
    )
    assert lone.returncode == 0, lone.stdout + lone.stderr


def _lora_info(server: Server) -> dict[str, str]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    (family,) = [family for family in text_string_to_metric_families(text) if family.name == LORA_INFO]
    return family.samples[0].labels


def test_lora_requests_info_names_running_and_waiting_adapters(single_slot_server: Server) -> None:
    """One row, one queue place: a long stream on alpha runs while a request for beta waits."""
    base = single_slot_server.base_url
    assert _lora_info(single_slot_server) == {
        "max_lora": "1",
        "running_lora_adapters": "",
        "waiting_lora_adapters": "",
    }
    long_stream = {
        "inputs": "Hello",
        "parameters": {"adapter_id": "alpha", "max_new_tokens": 4000, "ignore_eos_token": True},
    }
    queued = {"inputs": "x", "parameters": {"adapter_id": "beta", "max_new_tokens": 1}}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{base}/generate_stream", json=long_stream) as stream,
    ):
        lines = stream.iter_lines()  # kept: a dropped iterator closes the stream, which cancels the request
        assert next(lines).startswith("data:")
        waiter = threading.Thread(target=lambda: httpx.post(f"{base}/generate", json=queued, timeout=60))
        waiter.start()
        deadline = time.monotonic() + 10
        while not (labels := _lora_info(single_slot_server))["waiting_lora_adapters"] and time.monotonic() < deadline:
            time.sleep(0.05)
    waiter.join(timeout=60)  # closing the stream cancels alpha's request; beta then runs
    assert labels == {"max_lora": "1", "running_lora_adapters": "alpha", "waiting_lora_adapters": "beta"}


def test_a_real_prometheus_scrapes_and_answers_a_query(metrics_server: Server, tmp_path: Path) -> None:
    from tests.http_fixtures import free_port

    port = free_port()
    target = metrics_server.base_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: spectra\n    static_configs:\n      - targets: ['{target}']\n"
    )
    generate(metrics_server, None, 4)
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 60
        result: list[Any] = []
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/api/v1/query",
                    params={"query": 'spectra_generation_tokens_total{job="spectra"}'},
                    timeout=5,
                ).json()
            except httpx.TransportError:
                continue
            result = answer.get("data", {}).get("result", [])
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert float(result[0]["value"][1]) > 0
        targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()
        assert json.dumps(targets).count('"health": "up"') >= 1
    finally:
        process.terminate()
        process.wait(timeout=15)
