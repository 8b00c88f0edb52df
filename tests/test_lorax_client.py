"""lorax-client, unchanged, against a real ``spectra serve``; and the wire format of TGI's ``POST /`` it relies on.

lorax-client posts every request to the base URL (``stream`` decides the mode), sends every
parameter it knows (mostly null), reads ``[0]`` of the answer and requires ``details.prompt_tokens``.
The oracle is ``/generate`` with the same greedy request.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import httpx
import pytest
from lorax import AsyncClient, Client
from lorax.errors import NotFoundError, UnprocessableEntityError
from transformers import AutoTokenizer

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

PROMPT = "Hello there"
NEW_TOKENS = 12


def tgi_generate(server: Server, adapter_id: str | None = None, **parameters: object) -> dict:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, "details": True, **parameters}}
    response = httpx.post(f"{server.base_url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def prompt_tokens(server: Server) -> int:
    return len(AutoTokenizer.from_pretrained(server.model_dir).encode(PROMPT))


@pytest.mark.parametrize("adapter_id", [None, "alpha"])
def test_generate_matches_generate_route(http_server: Server, adapter_id: str | None) -> None:
    expected = tgi_generate(http_server, adapter_id, max_new_tokens=NEW_TOKENS)
    response = Client(http_server.base_url).generate(PROMPT, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS)
    assert response.generated_text == expected["generated_text"]
    details = response.details
    assert [token.id for token in details.tokens] == [token["id"] for token in expected["details"]["tokens"]]
    assert [token.text for token in details.tokens] == [token["text"] for token in expected["details"]["tokens"]]
    assert (details.finish_reason, details.generated_tokens) == ("length", NEW_TOKENS)
    assert details.prompt_tokens == prompt_tokens(http_server)
    assert details.prefill == []


def test_adapter_changes_the_text(http_server: Server) -> None:
    client = Client(http_server.base_url)
    texts = {client.generate(PROMPT, adapter_id=a, max_new_tokens=NEW_TOKENS).generated_text for a in (None, "alpha")}
    assert len(texts) == 2


def test_stop_sequences_and_seeded_sampling(http_server: Server) -> None:
    client = Client(http_server.base_url)
    full = client.generate(PROMPT, max_new_tokens=NEW_TOKENS).generated_text
    stop = full[3:5]
    stopped = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_sequences=[stop])
    assert stopped.generated_text == full[: full.index(stop) + len(stop)]
    assert stopped.details.finish_reason == "stop_sequence"

    def sample() -> object:
        return client.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.3, seed=7)

    first, again = sample(), sample()
    assert first.generated_text == again.generated_text
    assert first.details.seed == 7


@pytest.mark.parametrize("adapter_id", [None, "alpha"])
def test_generate_stream_matches_generate(http_server: Server, adapter_id: str | None) -> None:
    client = Client(http_server.base_url)
    full = client.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS)
    events = list(client.generate_stream(PROMPT, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS))
    assert "".join(event.token.text for event in events) == full.generated_text
    assert [event.token.id for event in events] == [token.id for token in full.details.tokens]
    assert all(event.generated_text is None and event.details is None for event in events[:-1])
    last = events[-1]
    assert last.generated_text == full.generated_text
    assert (last.details.finish_reason, last.details.generated_tokens) == ("length", NEW_TOKENS)
    assert last.details.prompt_tokens == full.details.prompt_tokens


def test_unknown_adapter_is_lorax_not_found(http_server: Server) -> None:
    client = Client(http_server.base_url)
    with pytest.raises(NotFoundError, match="adapter 'no-such-adapter' not found"):
        client.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)
    with pytest.raises(NotFoundError, match="adapter 'no-such-adapter' not found"):
        list(client.generate_stream(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2))


def test_lorax_parameters_spectra_lacks_are_refused(http_server: Server) -> None:
    with pytest.raises(UnprocessableEntityError, match=r"parameters\.adapter_source"):
        Client(http_server.base_url).generate(PROMPT, max_new_tokens=2, adapter_source="s3")


def test_ignore_eos_token_generates_to_the_limit(http_server: Server) -> None:
    response = Client(http_server.base_url).generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    assert response.details.generated_tokens == NEW_TOKENS
    assert response.details.finish_reason == "length"


def test_async_client_generate(http_server: Server) -> None:
    expected = tgi_generate(http_server, "alpha", max_new_tokens=NEW_TOKENS)
    response = asyncio.run(AsyncClient(http_server.base_url).generate(PROMPT, adapter_id="alpha", max_new_tokens=12))
    assert response.generated_text == expected["generated_text"]
    assert response.details.generated_tokens == NEW_TOKENS


def test_root_route_answers_a_list_or_the_stream(http_server: Server) -> None:
    """TGI's and LoRAX's ``POST /``: a one-element list, or with ``stream`` the events of /generate_stream."""
    expected = tgi_generate(http_server, max_new_tokens=NEW_TOKENS)
    body = {"inputs": PROMPT, "parameters": {"details": True, "max_new_tokens": NEW_TOKENS}}
    answer = httpx.post(f"{http_server.base_url}/", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json() == [expected]
    streamed = httpx.post(f"{http_server.base_url}/", json={**body, "stream": True}, timeout=60)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line.removeprefix("data:")) for line in streamed.text.splitlines() if line.startswith("data:")]
    assert [event["token"]["id"] for event in events] == [token["id"] for token in expected["details"]["tokens"]]
    assert events[-1]["generated_text"] == expected["generated_text"]
