"""``X-Request-Id`` on every response and ``--log-format json``, against real ``spectra serve`` processes.

The shared ``http_server`` logs text (its access lines end ``request_id=...``); one more server in
this file runs with ``--log-format json`` and every line it writes, from startup to shutdown, is parsed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from server.logging_setup import JsonFormatter

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

GENERATED_ID = re.compile(r"[0-9a-f]{32}")
PROMPT = "Hello there"
GENERATE_BODY = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
ADAPTER_BODY = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "adapter_id": "alpha"}}


def request(server: Server, method: str, path: str, request_id: str | None, body: Any = None) -> httpx.Response:
    headers = {"X-Request-Id": request_id} if request_id is not None else {}
    return httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers, timeout=60)


def test_every_response_has_a_fresh_request_id(http_server: Server) -> None:
    first = request(http_server, "GET", "/health", None)
    second = request(http_server, "GET", "/health", None)
    ids = [first.headers["X-Request-Id"], second.headers["X-Request-Id"]]
    assert all(GENERATED_ID.fullmatch(request_id) for request_id in ids), ids
    assert ids[0] != ids[1]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/generate", GENERATE_BODY, 200),
        ("POST", "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}]}, 200),
        ("GET", "/v1/adapters/no-such-adapter", None, 404),
        ("POST", "/generate", {"parameters": {"max_new_tokens": 4}}, 422),
        ("POST", "/generate", {**GENERATE_BODY, "parameters": {"adapter_id": "no-such-adapter"}}, 404),
    ],
    ids=["generate", "chat", "404", "422", "engine-404"],
)
def test_a_valid_client_id_is_echoed(
    http_server: Server, method: str, path: str, body: dict | None, status: int
) -> None:
    request_id = f"client-{uuid.uuid4().hex[:8]}.{status}:A_b"
    response = request(http_server, method, path, request_id, body)
    assert response.status_code == status, response.text
    assert response.headers["X-Request-Id"] == request_id
    if path == "/v1/chat/completions":  # the engine got the same id: it names the completion
        assert response.json()["id"] == f"chatcmpl-{request_id}"
    if status >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    # The text log's access line for the request ends with the id.
    access = [line for line in http_server.log_path.read_text().splitlines() if f"request_id={request_id}" in line]
    assert any(f'"{method} {path} HTTP/1.1" {status}' in line and "uvicorn.access" in line for line in access), access


def test_a_valid_client_id_is_echoed_on_a_stream(http_server: Server) -> None:
    request_id = "stream-" + uuid.uuid4().hex
    url = f"{http_server.base_url}/generate_stream"
    with httpx.stream("POST", url, json=GENERATE_BODY, headers={"X-Request-Id": request_id}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["X-Request-Id"] == request_id
        events = [json.loads(line.removeprefix("data:")) for line in response.iter_lines() if line.startswith("data:")]
    assert len(events) == 4
    assert events[-1]["generated_text"] is not None


def test_the_longest_valid_id_is_kept(http_server: Server) -> None:
    request_id = "a" * 128
    assert request(http_server, "GET", "/health", request_id).headers["X-Request-Id"] == request_id


@pytest.mark.parametrize("request_id", ["a" * 129, "has space", "semi;colon", "slash/", "", "ünï"])
def test_an_invalid_client_id_is_replaced(http_server: Server, request_id: str) -> None:
    response = httpx.get(f"{http_server.base_url}/health", headers=[("X-Request-Id", request_id.encode())], timeout=30)
    assert response.status_code == 200  # a bad tracing header never fails the request
    assert GENERATED_ID.fullmatch(response.headers["X-Request-Id"])


def test_json_formatter_fields_and_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("server.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("ERROR", "server.x", "failed here")
    assert "request_id" not in line  # outside a request
    assert "Traceback" in line["exception"] and "ValueError: boom" in line["exception"]


def parse_log(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    assert lines
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line in the server log: {line!r}")
        assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= entry.keys(), line
        assert datetime.fromisoformat(entry["ts"]).utcoffset() == timedelta(0), entry["ts"]
        entries.append(entry)
    return entries


def test_json_log_format_writes_only_json_lines(
    tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from tests.http_fixtures import start_server, stop_server

    server = start_server(tiny_llama_dir, tmp_path, {"alpha": peft_adapter_dirs["alpha"]}, "--log-format", "json")
    try:
        sent = [
            ("json-generate-1", "POST", "/generate", GENERATE_BODY, 200),
            ("json-stream-1", "POST", "/generate_stream", ADAPTER_BODY, 200),
            ("json-404-1", "GET", "/v1/adapters/missing", None, 404),
        ]
        for request_id, method, path, body, status in sent:
            assert request(server, method, path, request_id, body).status_code == status
        anonymous = request(server, "GET", "/info", None).headers["X-Request-Id"]
        sent.append((anonymous, "GET", "/info", None, 200))
    finally:
        stop_server(server)

    entries = parse_log(server.log_path)  # startup, requests and shutdown: every line
    messages = [(entry["logger"], entry["message"]) for entry in entries]
    assert any(logger == "server" and message.startswith("serving model=") for logger, message in messages)
    assert any(logger == "uvicorn.error" and message.startswith("Uvicorn running on") for logger, message in messages)
    assert ("uvicorn.error", "Application shutdown complete.") in messages
    access = {entry.get("request_id"): entry for entry in entries if entry["logger"] == "uvicorn.access"}
    for request_id, method, path, _, status in sent:
        entry = access[request_id]
        assert (entry["method"], entry["path"], entry["status"]) == (method, path, status)
        assert entry["client"].startswith("127.0.0.1:")
    # Outside a request there is no id to report.
    started = messages.index(next(item for item in messages if item[1].startswith("Uvicorn running on")))
    assert all("request_id" not in entry for entry in entries[: started + 1])
