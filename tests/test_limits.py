"""Request limits and overload over HTTP, on both API families, against real ``spectra serve`` processes.

Every limit is a flag with small values here, and every violation must name its limit and flag:
413 (body), 422 (prompt, new tokens, stop sequences), 429 with Retry-After (queue), 504 (request
timeout), and a stream whose client stops reading is cancelled (stream write timeout).

The model is the tiny test Llama with a 16k context whose special-token logits are zeroed, so greedy
decoding never ends on eos: a request for thousands of tokens runs for as long as it asked, and only
a limit can end it early. Generated-token and finish-reason counters on /metrics tell a cancelled
request from one that ran to its end, whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from safetensors.torch import load_file, save_file

from server.models.embedded import save_tiny_model, tiny_llama_config
from tests.conftest import TINY_LLAMA

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

CONTEXT = 16384
PROMPT = "Hello there"  # 12 tokens with bos (byte tokenizer)
REQUEST_TIMEOUT_S = 2
MAX_NEW_TOKENS = 8000
LONG_TOKENS = MAX_NEW_TOKENS - 100  # fits --max-total-tokens with any prompt used here (the chat one is 31 tokens)
# The tight server: one row, one queue place, and limits small enough to hit with small requests.
TIGHT_FLAGS = (
    "--max-batch-size", "1", "--max-queue", "1",
    "--max-total-tokens", str(MAX_NEW_TOKENS + 20), "--max-new-tokens", str(MAX_NEW_TOKENS),
    "--max-new-tokens-default", "4", "--max-stop-sequences", "2", "--max-stop-chars", "8",
    "--max-request-bytes", "4KiB", "--request-timeout", str(REQUEST_TIMEOUT_S),
)  # fmt: skip
STALL_NEW_TOKENS = 16000
BodyFor = Callable[["Server"], dict]


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a 16k context that never emits eos (nor any special token) greedily."""
    directory = save_tiny_model(
        tmp_path_factory.mktemp("endless-llama"), tiny_llama_config(**TINY_LLAMA, max_position_embeddings=CONTEXT)
    )
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"][256:] = 0  # byte tokens are ids 0-255; special tokens get logit 0, never the max
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def tight_server(endless_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server

    server = start_server(endless_model_dir, tmp_path_factory.mktemp("limits-tight"), {}, *TIGHT_FLAGS)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def stall_server(endless_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No request timeout and a 1 s stream write timeout, both set through their environment variables."""
    from tests.http_fixtures import start_server, stop_server

    with pytest.MonkeyPatch.context() as env:
        env.setenv("SPECTRA_REQUEST_TIMEOUT", "0")
        env.setenv("SPECTRA_STREAM_WRITE_TIMEOUT", "1")
        server = start_server(
            endless_model_dir, tmp_path_factory.mktemp("limits-stall"), {},
            "--max-total-tokens", str(CONTEXT), "--max-new-tokens", str(STALL_NEW_TOKENS),
        )  # fmt: skip
    yield server
    stop_server(server)


# -- helpers ---------------------------------------------------------------------------------------


def post(server: Server, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=timeout)


def tgi_body(inputs: str = PROMPT, **parameters: object) -> dict:
    return {"inputs": inputs, "parameters": parameters}


def completion_body(server: Server, prompt: str = PROMPT, **fields: object) -> dict:
    return {"model": server.model_name, "prompt": prompt, "temperature": 0, **fields}


def chat_body(server: Server, content: str = PROMPT, **fields: object) -> dict:
    return {"model": server.model_name, "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def assert_error(response: httpx.Response, status: int, error_type: str, param: str | None, *needles: str) -> str:
    """The standard error body with this status, type and param, and a message containing every needle."""
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (error_type, param, status), error
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error["message"]


def info(server: Server) -> dict:
    return httpx.get(f"{server.base_url}/info", timeout=5).json()


def wait_for(server: Server, predicate: Callable[[dict], bool], timeout: float) -> tuple[dict, float]:
    """The first /info that satisfies ``predicate`` and the seconds it took; fails past ``timeout``."""
    started = time.monotonic()
    while True:
        current = info(server)
        if predicate(current):
            return current, time.monotonic() - started
        assert time.monotonic() - started < timeout, f"/info never satisfied the condition: {current}"
        time.sleep(0.05)


def idle(current: dict) -> bool:
    return (current["running_requests"], current["queued_requests"]) == (0, 0)


def counters(server: Server) -> dict[str, float]:
    """Generated tokens and finished requests by reason, from /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    values = {"tokens": 0.0}
    for match in re.finditer(r'^spectra_requests_finished_total\{finish_reason="(\w+)"\} (\S+)$', text, re.M):
        values[match.group(1)] = float(match.group(2))
    if found := re.search(r"^spectra_generation_tokens_total (\S+)$", text, re.M):
        values["tokens"] = float(found.group(1))
    return values


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def sse_data(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data:").strip() for line in response.iter_lines() if line.startswith("data:")]


# -- 413: --max-request-bytes ----------------------------------------------------------------------


def test_body_over_max_request_bytes_is_413_on_both_families(tight_server: Server) -> None:
    big = "x" * 5000  # the limit is 4 KiB
    needles = ("4096 bytes", "--max-request-bytes")
    assert_error(post(tight_server, "/generate", tgi_body(big)), 413, "invalid_request_error", None, *needles)
    assert_error(post(tight_server, "/generate_stream", tgi_body(big)), 413, "invalid_request_error", None, *needles)
    response = post(tight_server, "/v1/completions", completion_body(tight_server, big))
    assert_error(response, 413, "invalid_request_error", None, *needles)
    response = post(tight_server, "/v1/chat/completions", chat_body(tight_server, big, stream=True))
    assert_error(response, 413, "invalid_request_error", None, *needles)
    # A chunked body declares no length: it is counted as it arrives.
    chunks = iter([b'{"inputs": "', big.encode(), b'"}'])
    response = httpx.post(f"{tight_server.base_url}/generate", content=chunks, timeout=30)
    assert_error(response, 413, "invalid_request_error", None, *needles)


# -- 422: prompt, new tokens, stop sequences -------------------------------------------------------


def test_prompt_over_max_input_tokens_is_422_naming_the_flag(tight_server: Server) -> None:
    long_prompt = "x" * 64  # 65 tokens with bos; the limit is 64
    needles = ("65 tokens", "the limit is 64", "--max-input-tokens")
    response = post(tight_server, "/generate", tgi_body(long_prompt, max_new_tokens=1))
    assert_error(response, 422, "invalid_request_error", "inputs", *needles)
    response = post(tight_server, "/v1/completions", completion_body(tight_server, long_prompt, stream=True))
    assert_error(response, 422, "invalid_request_error", "prompt", *needles)
    response = post(tight_server, "/v1/chat/completions", chat_body(tight_server, long_prompt))
    assert_error(response, 422, "invalid_request_error", "messages", "the limit is 64", "--max-input-tokens")


def test_max_new_tokens_over_the_limit_is_422_naming_field_and_flag(tight_server: Server) -> None:
    over = MAX_NEW_TOKENS + 1
    tail = f"is {over}; the limit is {MAX_NEW_TOKENS} (--max-new-tokens)"
    for path in ("/generate", "/generate_stream"):
        message = assert_error(
            post(tight_server, path, tgi_body(max_new_tokens=over)),
            422, "invalid_request_error", "parameters.max_new_tokens",
        )  # fmt: skip
        assert message == f"parameters.max_new_tokens {tail}"
    response = post(tight_server, "/v1/completions", completion_body(tight_server, max_tokens=over))
    assert assert_error(response, 422, "invalid_request_error", "max_tokens") == f"max_tokens {tail}"
    response = post(tight_server, "/v1/chat/completions", chat_body(tight_server, max_completion_tokens=over))
    message = assert_error(response, 422, "invalid_request_error", "max_completion_tokens")
    assert message == f"max_completion_tokens {tail}"
    # Under --max-new-tokens, prompt + new tokens still has to fit --max-total-tokens (8020 here).
    response = post(tight_server, "/generate", tgi_body("x" * 30, max_new_tokens=MAX_NEW_TOKENS))
    assert_error(response, 422, "invalid_request_error", "parameters.max_new_tokens", "--max-total-tokens")
    response = post(tight_server, "/v1/completions", completion_body(tight_server, "x" * 30, max_tokens=MAX_NEW_TOKENS))
    assert_error(response, 422, "invalid_request_error", "max_tokens", "--max-total-tokens")


def test_max_new_tokens_default_applies_when_unset(tight_server: Server) -> None:
    limits = info(tight_server)["limits"]
    assert (limits["max_new_tokens"], limits["max_new_tokens_default"]) == (MAX_NEW_TOKENS, 4)
    assert (limits["max_stop_sequences"], limits["max_stop_chars"]) == (2, 8)
    response = post(tight_server, "/generate", tgi_body(details=True))
    assert response.status_code == 200, response.text
    assert response.json()["details"]["generated_tokens"] == 4
    response = post(tight_server, "/v1/completions", completion_body(tight_server))
    assert response.json()["usage"]["completion_tokens"] == 4


def test_stop_sequences_over_the_limits_are_422_naming_the_flags(tight_server: Server) -> None:
    three, nine_chars = ["a", "b", "c"], "abcdefghi"
    count = ("has 3 sequences", "the limit is 2", "--max-stop-sequences")
    length = ("9 characters", "the limit is 8", "--max-stop-chars")
    response = post(tight_server, "/generate", tgi_body(stop=three))
    assert_error(response, 422, "invalid_request_error", "parameters.stop", *count)
    response = post(tight_server, "/generate_stream", tgi_body(stop=[nine_chars]))
    assert_error(response, 422, "invalid_request_error", "parameters.stop", *length)
    response = post(tight_server, "/v1/completions", completion_body(tight_server, stop=three))
    assert_error(response, 422, "invalid_request_error", "stop", *count)
    response = post(tight_server, "/v1/chat/completions", chat_body(tight_server, stop=nine_chars, stream=True))
    assert_error(response, 422, "invalid_request_error", "stop", *length)
    # At the limits: two stops of eight characters are fine.
    response = post(tight_server, "/generate", tgi_body(stop=["abcdefgh", "ABCDEFGH"], max_new_tokens=2))
    assert response.status_code == 200, response.text
    response = post(tight_server, "/v1/completions", completion_body(tight_server, stop=["abcdefgh", "AB"]))
    assert response.status_code == 200, response.text


# -- 429: --max-queue -------------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after_on_both_families(tight_server: Server) -> None:
    wait_for(tight_server, idle, 10)
    long = tgi_body(max_new_tokens=MAX_NEW_TOKENS)
    url = f"{tight_server.base_url}/generate_stream"
    # One row (running) and one queue place (queued), each for up to the 2 s request timeout.
    with httpx.Client(timeout=30) as client, client.stream("POST", url, json=long) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept alive: closing it would close the connection
        assert next(lines).startswith("data:")
        with client.stream("POST", url, json=long) as queued:
            assert queued.status_code == 200  # headers come once the engine accepted it
            needles = ("queue is full", "--max-queue")
            for path, body in [
                ("/generate", tgi_body(max_new_tokens=4)),
                ("/generate_stream", tgi_body(max_new_tokens=4)),
                ("/v1/completions", completion_body(tight_server, max_tokens=4)),
                ("/v1/chat/completions", chat_body(tight_server, max_tokens=4, stream=True)),
            ]:
                rejected = post(tight_server, path, body)
                assert_error(rejected, 429, "overloaded_error", None, *needles)
                assert int(rejected.headers["Retry-After"]) >= 1
    wait_for(tight_server, idle, 10)


# -- 504: --request-timeout ------------------------------------------------------------------------


def _assert_cut_by_the_timeout(server: Server, before: dict[str, float], elapsed: float) -> None:
    """Answered no sooner than the timeout, the row freed, and the request cancelled, not run to its end.

    That it was cut early is shown by its token count, not by a wall-clock bound that a loaded machine
    could miss: it asked for MAX_NEW_TOKENS and got fewer than half.
    """
    assert elapsed >= REQUEST_TIMEOUT_S - 0.2, elapsed
    wait_for(server, idle, 10)
    after = counters(server)
    assert delta(before, after, "cancelled") == 1
    assert delta(before, after, "length") == 0
    assert delta(before, after, "tokens") < MAX_NEW_TOKENS / 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", lambda server: tgi_body(max_new_tokens=LONG_TOKENS)),
        ("/v1/chat/completions", lambda server: chat_body(server, max_tokens=LONG_TOKENS)),
    ],
    ids=["tgi", "openai"],
)
def test_request_timeout_is_504_and_frees_the_row(tight_server: Server, path: str, body: BodyFor) -> None:
    wait_for(tight_server, idle, 10)
    before = counters(tight_server)
    started = time.monotonic()
    response = post(tight_server, path, body(tight_server))
    elapsed = time.monotonic() - started
    assert_error(response, 504, "timeout_error", None, f"{REQUEST_TIMEOUT_S} s", "--request-timeout")
    _assert_cut_by_the_timeout(tight_server, before, elapsed)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", lambda server: tgi_body(max_new_tokens=LONG_TOKENS)),
        ("/v1/completions", lambda server: completion_body(server, max_tokens=LONG_TOKENS, stream=True)),
    ],
    ids=["tgi", "openai"],
)
def test_stream_past_the_request_timeout_ends_with_an_error(tight_server: Server, path: str, body: BodyFor) -> None:
    wait_for(tight_server, idle, 10)
    before = counters(tight_server)
    started = time.monotonic()
    with httpx.stream("POST", f"{tight_server.base_url}{path}", json=body(tight_server), timeout=30) as response:
        assert response.status_code == 200
        events = sse_data(response)
    elapsed = time.monotonic() - started
    assert len(events) > 10  # tokens streamed until the timeout
    error = json.loads(events[-1])["error"]  # the last event; no [DONE] after it
    assert (error["type"], error["code"]) == ("timeout_error", 504)
    assert "--request-timeout" in error["message"]
    _assert_cut_by_the_timeout(tight_server, before, elapsed)


# -- --stream-write-timeout: a client that stops reading -----------------------------------------------


def _stalled_stream(server: Server, path: str, body: dict) -> socket.socket:
    """Send a streaming request and never read the response.

    Over loopback the kernel negotiates a 64 KiB segment size and sizes the server's send buffer from it
    (megabytes: whole generations fit); a real network's ~1.4 KB segments give it ~100 KB, as the
    client's TCP_MAXSEG does here. With a small receive buffer, the server's writes then block after
    roughly 100-200 KB of events.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    host, port = server.base_url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", lambda server: tgi_body(max_new_tokens=STALL_NEW_TOKENS)),
        ("/v1/chat/completions", lambda server: chat_body(server, max_tokens=STALL_NEW_TOKENS, stream=True)),
    ],
    ids=["tgi", "openai"],
)
def test_client_that_stops_reading_loses_its_row(stall_server: Server, path: str, body: BodyFor) -> None:
    wait_for(stall_server, idle, 10)
    before = counters(stall_server)
    log_lines = len(stall_server.log_path.read_text(errors="replace").splitlines())
    sock = _stalled_stream(stall_server, path, body(stall_server))
    try:
        _, started = wait_for(stall_server, lambda current: current["running_requests"] == 1, 5)
        # While it stalls, the server serves others.
        response = post(stall_server, "/generate", tgi_body(max_new_tokens=4))
        assert response.status_code == 200, response.text
        # The writes block after ~100-200 KB (about a thousand tokens), then 1 s of write timeout: a couple of
        # seconds, where the 16,000 tokens it asked for would take far longer.
        _, freed = wait_for(stall_server, lambda current: current["running_requests"] == 0, 8)
        after = counters(stall_server)
        assert delta(before, after, "cancelled") == 1
        assert delta(before, after, "length") == 1  # the 4-token request only
        assert delta(before, after, "tokens") < STALL_NEW_TOKENS / 2
        assert started + freed < 8
        response = post(stall_server, "/generate", tgi_body(max_new_tokens=4))
        assert response.status_code == 200, response.text
    finally:
        sock.close()
    new_lines = stall_server.log_path.read_text(errors="replace").splitlines()[log_lines:]
    assert any("WARNING" in line and "--stream-write-timeout" in line for line in new_lines), new_lines
    assert not any("ERROR" in line or "Traceback" in line for line in new_lines), new_lines
