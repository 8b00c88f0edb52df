"""``spectra serve --replicas 2``: two replicas behind Ray Serve's HAProxy front, a real local Ray cluster on loopback.

One module-scoped cluster serves every test: real clients (the openai SDK, httpx) through HAProxy, the
adapter affinity header (HAProxy asks SpectraRouter with the body), and a replica killed with SIGKILL under
load. The cluster keeps its session files in
a temporary ``RAY_TMPDIR`` of its own, so parallel runs do not meet, and the last check is that stopping the
server (SIGTERM) leaves none of its Ray processes behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from server.cluster.affinity import adapter_key
from tests.test_adapters_api import peft_files, upload

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures", "tests.postgres_fixtures"]

REPLICAS = 2
REPLICA_TITLE = "ray::ServeReplica:spectra:SpectraReplica"
RECOVERY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 45.0
HAPROXY_ERROR_PAGE = "Internal Server Error"


def _processes_with_env(variable: str, value: str) -> dict[int, str]:
    """pid -> command line of this user's processes whose environment has ``variable=value``."""
    wanted = f"{variable}={value}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return found


@pytest.fixture(scope="module")
def ray_tmpdir() -> Iterator[str]:
    # Short, under /tmp: Ray puts unix sockets in it, and their paths are limited to ~100 bytes.
    path = tempfile.mkdtemp(prefix="spectra-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def replica_pids(ray_tmpdir: str) -> set[int]:
    return {pid for pid, cmdline in _processes_with_env("RAY_TMPDIR", ray_tmpdir).items() if REPLICA_TITLE in cmdline}


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path, postgres_url: str, tmp_path_factory, ray_tmpdir: str) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server
    from tests.postgres_fixtures import fresh_database

    started = time.monotonic()
    server = start_server(
        tiny_llama_dir,
        tmp_path_factory.mktemp("ray-serve"),
        {},
        "--store",
        fresh_database(postgres_url),
        "--replicas",
        str(REPLICAS),
        env={"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    print(f"2 replicas healthy through HAProxy in {time.monotonic() - started:.1f}s")  # noqa: T201
    try:
        yield server
    finally:
        stopping = time.monotonic()
        server.process.terminate()
        try:
            server.process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            stop_server(server)  # kills it if it is still there
        print(f"stopped in {time.monotonic() - stopping:.1f}s")  # noqa: T201
        deadline = time.monotonic() + 30
        while (left := _processes_with_env("RAY_TMPDIR", ray_tmpdir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == {}, f"Ray processes left running: {left}\n{server.log_tail()}"


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"inputs": "x", "parameters": {"adapter_id": "team/a"}}, "team/a"),
        ({"inputs": "x", "parameters": {"adapters": {"b": 0.3, "c": 0.7}}}, "b"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 4}}, None),
        ({"model": "team/a", "prompt": "x"}, "team/a"),
        ({"model": "base", "messages": []}, None),
        ({"model": "base", "adapters": {"d": 1.0}}, "d"),
        ([{"model": "team/a"}], None),
        ("not json", None),
        ('--boundary\r\nContent-Disposition: form-data; name="file"\r\n\r\n\x00\xff', None),
    ],
)
def test_the_affinity_key_is_the_first_adapter_a_body_names(body: object, key: str | None) -> None:
    raw = body.encode("latin-1") if isinstance(body, str) else json.dumps(body).encode()
    assert adapter_key(raw, base_model="base") == key


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _completion(server: Server, prompt: str, tokens: int, *, stream: bool) -> str:
    """The greedy completion's text; raises unless the answer is whole (a finish reason was sent)."""
    client = _client(server)
    if not stream:
        response = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=tokens, temperature=0)
        assert response.choices[0].finish_reason is not None
        return response.choices[0].text
    text, finished = [], False
    for chunk in client.completions.create(
        model=server.model_name, prompt=prompt, max_tokens=tokens, temperature=0, stream=True
    ):
        text.append(chunk.choices[0].text)
        finished = finished or chunk.choices[0].finish_reason is not None
    assert finished, "a stream ended without a finish reason"
    return "".join(text)


def test_openai_completions_and_chat_through_the_proxy_stream_and_match(cluster: Server) -> None:
    client = _client(cluster)
    texts = {_completion(cluster, "Spectral", 12, stream=stream) for stream in (False, True, False, True)}
    assert len(texts) == 1 and next(iter(texts))
    messages = [{"role": "user", "content": "Say something spectral"}]
    whole = client.chat.completions.create(model=cluster.model_name, messages=messages, max_tokens=12, temperature=0)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=cluster.model_name, messages=messages, max_tokens=12, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert whole.choices[0].message.content == streamed


def test_both_replicas_answer_the_base_model_identically(cluster: Server) -> None:
    answers: dict[str, set[str]] = {}
    body = {"model": cluster.model_name, "prompt": "Spectral", "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=cluster.base_url, timeout=60) as client:
        for _ in range(12):
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            answers.setdefault(response.headers["x-spectra-replica"], set()).add(response.json()["choices"][0]["text"])
    assert len(answers) == REPLICAS, f"the base model is not balanced: {answers}"
    assert len(set().union(*answers.values())) == 1


def test_an_uploaded_adapter_is_served_and_its_requests_stay_on_one_replica(
    cluster: Server, peft_adapter_dirs: dict[str, Path]
) -> None:
    response = upload(cluster, "team/alpha", peft_files(peft_adapter_dirs["alpha"]))
    assert response.status_code == 201, response.text
    listed = httpx.get(f"{cluster.base_url}/v1/adapters", timeout=10).json()["data"]
    assert [item["id"] for item in listed] == ["team/alpha"]

    def generate() -> httpx.Response:
        body = {"inputs": "Spectral", "parameters": {"max_new_tokens": 8, "adapter_id": "team/alpha", "details": True}}
        response = httpx.post(f"{cluster.base_url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response

    first = generate()
    assert first.headers["x-spectra-affinity"] == "miss"
    time.sleep(1.0)  # the replica reports its new id to the routers in the background
    later = [generate() for _ in range(6)]
    assert {response.headers["x-spectra-replica"] for response in later} == {first.headers["x-spectra-replica"]}
    assert {response.headers["x-spectra-affinity"] for response in later} == {"hit"}
    tokens = {tuple(token["id"] for token in r.json()["details"]["tokens"]) for r in [first, *later]}
    base = httpx.post(
        f"{cluster.base_url}/generate", json={"inputs": "Spectral", "parameters": {"max_new_tokens": 8}}, timeout=60
    ).json()
    assert len(tokens) == 1 and base["generated_text"] != first.json()["generated_text"]


def test_a_killed_replica_costs_clean_errors_or_right_answers_and_comes_back(cluster: Server, ray_tmpdir: str) -> None:
    prompts = [f"Spectral number {index}" for index in range(8)]
    reference = {prompt: _completion(cluster, prompt, 32, stream=False) for prompt in prompts}
    before = replica_pids(ray_tmpdir)
    assert len(before) == REPLICAS, before

    def attempt(prompt: str, stream: bool) -> str:
        try:
            text = _completion(cluster, prompt, 32, stream=stream)
        except openai.APIStatusError as error:
            # The API's JSON error from a replica, or HAProxy's own page for a connection the killed replica
            # dropped before answering (Ray's HAProxy config serves 502/503/504 as a plain-text 500).
            assert error.status_code >= 500, error
            haproxy_page = error.response.text == HAPROXY_ERROR_PAGE
            assert haproxy_page or (isinstance(error.body, dict) and error.body.get("message")), error.body
            return "error"
        except (openai.APIConnectionError, httpx.HTTPError):  # a stream cut mid-response: no final chunk
            return "error"
        assert text == reference[prompt], f"wrong tokens for {prompt!r}: {text!r} != {reference[prompt]!r}"
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(attempt, prompt, index % 2 == 1) for index, prompt in enumerate(prompts * 3)]
        time.sleep(0.5)
        os.kill(sorted(before)[0], signal.SIGKILL)
        outcomes = [future.result(timeout=120) for future in futures]
    assert "ok" in outcomes, outcomes
    print(f"under the kill: {outcomes.count('ok')} right answers, {outcomes.count('error')} clean errors")  # noqa: T201

    # Until Ray notices the death, /health may still say 200; it must say 503 while the replacement builds its
    # engine, and 200 again once both replicas (one of them new) are running.
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    unready_seen = False
    while time.monotonic() < deadline:
        status = None
        with contextlib.suppress(httpx.TransportError):
            status = httpx.get(f"{cluster.base_url}/health", timeout=5).status_code
        unready_seen |= status != 200
        after = replica_pids(ray_tmpdir)
        if status == 200 and len(after) == REPLICAS and after != before:
            break
        time.sleep(0.5)
    else:
        pytest.fail(
            f"not back to {REPLICAS} healthy replicas {RECOVERY_TIMEOUT_S:.0f}s after the kill:\n{cluster.log_tail()}"
        )
    assert unready_seen, "/health said 200 throughout the replacement"
    assert _completion(cluster, prompts[0], 32, stream=True) == reference[prompts[0]]
