"""The SDK's generation methods and ``spectra generate`` against a real ``spectra serve``.

The oracle is the raw HTTP API: the same greedy request sent with httpx must give the same tokens
and text, with an adapter and without. The server is the session's shared ``http_server``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from typer.testing import CliRunner

from clients.cli import app
from clients.sdk import (
    AsyncSpectraClient,
    ChatCompletion,
    ChatMessage,
    Completion,
    GenerateResponse,
    SpectraAPIError,
    SpectraClient,
    StreamResponse,
    _Stream,
    _stream_event,
)

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

PROMPT = "Hello there"
NEW_TOKENS = 12
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture
def client(http_server: Server) -> Iterator[SpectraClient]:
    with SpectraClient(http_server.base_url, timeout=60) as client:
        yield client


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=60)
    response.raise_for_status()
    return response


def raw_generate(server: Server, adapter_id: str | None, **parameters: Any) -> dict[str, Any]:
    parameters = {"max_new_tokens": NEW_TOKENS, "details": True, **parameters}
    if adapter_id is not None:
        parameters["adapter_id"] = adapter_id
    return post(server, "/generate", {"inputs": PROMPT, "parameters": parameters}).json()


def raw_stream(server: Server, adapter_id: str | None) -> list[dict[str, Any]]:
    parameters: dict[str, Any] = {"max_new_tokens": NEW_TOKENS, "adapter_id": adapter_id}
    url = f"{server.base_url}/generate_stream"
    with httpx.stream("POST", url, json={"inputs": PROMPT, "parameters": parameters}, timeout=60) as response:
        response.raise_for_status()
        return [json.loads(line.removeprefix("data:")) for line in response.iter_lines() if line.startswith("data:")]


def tokens(details: list[dict[str, Any]]) -> list[tuple[int, str, bool]]:
    return [(token["id"], token["text"], token["special"]) for token in details]


@pytest.mark.parametrize("adapter_id", [None, "alpha"])
def test_generate_equals_the_raw_api(client: SpectraClient, http_server: Server, adapter_id: str | None) -> None:
    raw = raw_generate(http_server, adapter_id)
    got = client.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS, details=True)
    assert isinstance(got, GenerateResponse) and got.details is not None
    assert got.generated_text == raw["generated_text"]
    assert got.details.finish_reason == raw["details"]["finish_reason"]
    assert tokens([token.model_dump() for token in got.details.tokens]) == tokens(raw["details"]["tokens"])
    plain = client.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS)
    assert (plain.generated_text, plain.details) == (raw["generated_text"], None)


def test_an_adapter_changes_what_the_sdk_gets(client: SpectraClient) -> None:
    base = client.generate(PROMPT, max_new_tokens=NEW_TOKENS).generated_text
    assert client.generate(PROMPT, adapter_id="alpha", max_new_tokens=NEW_TOKENS).generated_text != base
    blend = client.generate(PROMPT, adapters={"alpha": 1.0}, max_new_tokens=NEW_TOKENS).generated_text
    assert blend == client.generate(PROMPT, adapter_id="alpha", max_new_tokens=NEW_TOKENS).generated_text


@pytest.mark.parametrize("adapter_id", [None, "alpha"])
def test_generate_stream_equals_the_raw_stream(
    client: SpectraClient, http_server: Server, adapter_id: str | None
) -> None:
    raw = raw_stream(http_server, adapter_id)
    events = list(client.generate_stream(PROMPT, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS))
    assert all(isinstance(event, StreamResponse) for event in events)
    assert [event.model_dump(mode="json") for event in events] == raw
    assert events[-1].generated_text == raw_generate(http_server, adapter_id)["generated_text"]


@pytest.mark.parametrize("adapter_id", [None, "alpha"])
def test_completions_and_chat_equal_the_raw_api(
    client: SpectraClient, http_server: Server, adapter_id: str | None
) -> None:
    model = adapter_id or http_server.model_name
    sampling = {"max_tokens": NEW_TOKENS, "temperature": 0}
    raw = post(http_server, "/v1/completions", {"model": model, "prompt": PROMPT, **sampling}).json()
    got = client.completions(PROMPT, model=adapter_id, max_tokens=NEW_TOKENS, temperature=0)
    assert isinstance(got, Completion)
    assert (got.model, got.choices[0].text, got.choices[0].finish_reason) == (
        model,
        raw["choices"][0]["text"],
        raw["choices"][0]["finish_reason"],
    )
    assert got.usage is not None and got.usage.model_dump() == raw["usage"]

    raw_chat = post(http_server, "/v1/chat/completions", {"model": model, "messages": MESSAGES, **sampling}).json()
    messages = [MESSAGES[0], ChatMessage(role="user", content="Hi")]  # dicts and models both go
    chat = client.chat(messages, model=adapter_id, max_tokens=NEW_TOKENS, temperature=0)
    assert isinstance(chat, ChatCompletion)
    assert (chat.model, chat.choices[0].message.content) == (model, raw_chat["choices"][0]["message"]["content"])
    assert chat.usage.model_dump() == raw_chat["usage"]


def raw_error(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=60)
    assert response.status_code == 404, response.text
    return response.json()["error"]


def test_unknown_adapter_raises_with_the_server_message_and_request_id(
    client: SpectraClient, http_server: Server
) -> None:
    tgi = raw_error(http_server, "/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "missing"}})
    openai = raw_error(http_server, "/v1/completions", {"model": "missing", "prompt": PROMPT})
    calls: list[tuple[Callable[[], object], dict[str, Any]]] = [
        (lambda: client.generate(PROMPT, adapter_id="missing"), tgi),
        (lambda: list(client.generate_stream(PROMPT, adapter_id="missing")), tgi),
        (lambda: client.completions(PROMPT, model="missing"), openai),
        (lambda: client.chat(MESSAGES, model="missing"), openai),
    ]
    for call, expected in calls:
        with pytest.raises(SpectraAPIError) as caught:
            call()
        error = caught.value
        assert (error.status_code, error.message, error.type, error.param) == (
            404,
            expected["message"],
            expected["type"],
            expected["param"],
        )
        assert error.request_id is not None and GENERATED_ID.fullmatch(error.request_id)
        # The id users quote is the one the server logged the request under.
        assert f"request_id={error.request_id}" in http_server.log_path.read_text()


def test_a_misspelt_option_is_refused_before_sending(client: SpectraClient) -> None:
    with pytest.raises(TypeError, match="unexpected option"):
        client.generate(PROMPT, adaptr_id="alpha")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected option"):
        client.completions(PROMPT, max_new_tokens=3)  # type: ignore[call-arg]


def test_an_error_event_ends_a_stream_with_the_server_message() -> None:
    request = httpx.Request("POST", "http://x/generate_stream")
    response = httpx.Response(200, headers={"X-Request-Id": "abc"}, request=request)
    stream = _Stream("/generate_stream", {}, StreamResponse)
    assert _stream_event(stream, response, "") is None
    assert _stream_event(stream, response, ": ping - 2025-01-01") is None
    error = {
        "error": {"message": "generation was interrupted", "type": "unavailable_error", "param": None, "code": 503}
    }
    with pytest.raises(SpectraAPIError) as caught:
        _stream_event(stream, response, f"data: {json.dumps(error)}")
    assert (caught.value.status_code, caught.value.message, caught.value.type) == (
        503,
        "generation was interrupted",
        "unavailable_error",
    )
    assert caught.value.request_id == "abc"


def test_async_client(http_server: Server) -> None:
    async def scenario() -> None:
        async with AsyncSpectraClient(http_server.base_url, timeout=60) as client:
            got = await client.generate(PROMPT, adapter_id="alpha", max_new_tokens=NEW_TOKENS)
            assert got.generated_text == raw_generate(http_server, "alpha")["generated_text"]
            events = [event async for event in client.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS)]
            assert events[-1].generated_text == raw_generate(http_server, None)["generated_text"]
            completion = await client.completions(PROMPT, max_tokens=4, temperature=0)
            assert completion.model == http_server.model_name
            chat = await client.chat(MESSAGES, model="alpha", max_tokens=4, temperature=0)
            assert chat.model == "alpha"
            with pytest.raises(SpectraAPIError) as caught:
                await client.generate(PROMPT, adapter_id="missing")
            assert caught.value.status_code == 404 and caught.value.request_id is not None
            with pytest.raises(SpectraAPIError) as caught:
                [event async for event in client.generate_stream(PROMPT, adapter_id="missing")]
            assert caught.value.status_code == 404

    asyncio.run(scenario())


# -- CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_id", [None, "alpha"])
@pytest.mark.parametrize("stream", [False, True])
def test_cli_generate_prints_the_generated_text(http_server: Server, adapter_id: str | None, stream: bool) -> None:
    expected = raw_generate(http_server, adapter_id)["generated_text"]
    args = ["generate", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]
    args += ["--adapter", adapter_id] if adapter_id else []
    args += ["--stream"] if stream else []
    result = CliRunner(env={"SPECTRA_URL": http_server.base_url}).invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_cli_generate_json_and_errors(http_server: Server) -> None:
    runner = CliRunner(env={"SPECTRA_URL": http_server.base_url})
    args = ["generate", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    response = GenerateResponse.model_validate_json(result.stdout)
    raw = raw_generate(http_server, None)
    assert response.details is not None and response.generated_text == raw["generated_text"]
    assert [token.id for token in response.details.tokens] == [token["id"] for token in raw["details"]["tokens"]]

    result = runner.invoke(app, [*args, "--stream", "--json"])
    assert result.exit_code == 0, result.output
    events = [StreamResponse.model_validate_json(line) for line in result.stdout.splitlines()]
    assert len(events) == NEW_TOKENS and events[-1].generated_text == raw["generated_text"]

    result = runner.invoke(app, [*args, "--adapter", "missing"])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "error (404): adapter 'missing' not found\n"
