"""The HTTP API end to end: real ``spectra serve`` processes driven by the clients users run.

``openai`` and ``huggingface_hub`` parse every response, PEFT's own ``generate`` is the oracle for
greedy outputs, and raw httpx checks error bodies, SSE disconnects and queueing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import NotFoundError, OpenAI, RateLimitError
from peft import PeftModel
from transformers import AutoTokenizer

from server.models.tokenizer import EOS_TOKEN, IM_END_TOKEN, special_token_id
from tests.conftest import greedy_continuation, load_base

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

PROMPT = "Hello there"
NEW_TOKENS = 24
# Greedy decoding of PROMPT on the tiny base model runs for thousands of tokens before its first eos
# (about 90 s on two CPU cores), so a request for LONG_TOKENS is still running whenever a test looks.
LONG_TOKENS = 4000
PROMPT_TIMEOUT_S = 10.0


def openai_client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def tgi(server: Server, inputs: str, timeout: float = 60, **parameters: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/generate", json={"inputs": inputs, "parameters": parameters}, timeout=timeout)


def assert_error(response: httpx.Response, status: int, error_type: str, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (error_type, param, status)
    return error["message"]


def wait_until_idle(server: Server, timeout: float = PROMPT_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = httpx.get(f"{server.base_url}/info", timeout=5).json()
        if (info["running_requests"], info["queued_requests"]) == (0, 0) or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def peft_greedy(model_dir: Path, adapter_dir: Path | None, prompt: str, max_new_tokens: int) -> list[int]:
    prompt_ids = AutoTokenizer.from_pretrained(model_dir).encode(prompt)
    model = load_base(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return greedy_continuation(model, prompt_ids, max_new_tokens)


def read_sse_events(lines: Iterator[str], count: int) -> list[dict]:
    """The next ``count`` events. The caller keeps ``lines`` alive: closing that generator closes the connection."""
    events = []
    for line in lines:
        if line.startswith("data:"):
            events.append(json.loads(line.removeprefix("data:")))
            if len(events) == count:
                break
    return events


# -- health, info, models ---------------------------------------------------------------------


def test_health_and_info(http_server: Server) -> None:
    health = httpx.get(f"{http_server.base_url}/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    info = httpx.get(f"{http_server.base_url}/info").json()
    assert info["model_id"] == http_server.model_name
    assert info["limits"]["max_input_tokens"] > 0
    assert {"running_requests", "queued_requests", "version"} <= set(info)


def test_models_list_base_and_adapters(http_server: Server) -> None:
    cards = {card.id: card for card in openai_client(http_server).models.list()}
    assert set(cards) == {http_server.model_name, "alpha", "beta"}
    assert cards["alpha"].owned_by == "spectra"
    assert cards["alpha"].model_extra["parent"] == http_server.model_name
    assert cards[http_server.model_name].object == "model"


# -- TGI / LoRAX ------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_id", [None, "alpha", "beta"])
def test_greedy_tokens_equal_peft_generate(http_server: Server, adapter_id: str | None) -> None:
    client = InferenceClient(base_url=http_server.base_url)
    output = client.text_generation(PROMPT, adapter_id=adapter_id, details=True, max_new_tokens=NEW_TOKENS)
    adapter_dir = http_server.adapter_dirs[adapter_id] if adapter_id else None
    expected = peft_greedy(http_server.model_dir, adapter_dir, PROMPT, NEW_TOKENS)
    assert [token.id for token in output.details.tokens] == expected
    assert output.details.generated_tokens == len(expected)
    stops_on_eos = expected[-1] in (special_token_id(EOS_TOKEN), special_token_id(IM_END_TOKEN))
    assert output.details.finish_reason == ("eos_token" if stops_on_eos else "length")


def test_adapters_change_the_output(http_server: Server) -> None:
    texts = {
        tgi(http_server, PROMPT, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS).json()["generated_text"]
        for adapter_id in (None, "alpha", "beta")
    }
    assert len(texts) == 3


def test_text_generation_stream_matches_non_stream(http_server: Server) -> None:
    client = InferenceClient(base_url=http_server.base_url)
    full = client.text_generation(PROMPT, adapter_id="alpha", details=True, max_new_tokens=NEW_TOKENS)
    events = list(
        client.text_generation(PROMPT, adapter_id="alpha", details=True, stream=True, max_new_tokens=NEW_TOKENS)
    )
    assert [event.token.id for event in events] == [token.id for token in full.details.tokens]
    assert [event.token.logprob for event in events] == pytest.approx([t.logprob for t in full.details.tokens])
    assert all(event.generated_text is None and event.details is None for event in events[:-1])
    last = events[-1]
    assert last.generated_text == full.generated_text
    assert (last.details.finish_reason, last.details.generated_tokens) == ("length", NEW_TOKENS)
    assert last.details.input_length == len(AutoTokenizer.from_pretrained(http_server.model_dir).encode(PROMPT))
    plain = client.text_generation(PROMPT, adapter_id="alpha", stream=True, max_new_tokens=NEW_TOKENS)
    assert "".join(plain) == full.generated_text


def test_return_full_text_and_blend_of_one(http_server: Server) -> None:
    single = tgi(http_server, PROMPT, adapter_id="alpha", max_new_tokens=NEW_TOKENS).json()["generated_text"]
    blended = tgi(http_server, PROMPT, adapters={"alpha": 1.0}, max_new_tokens=NEW_TOKENS, return_full_text=True)
    assert blended.json()["generated_text"] == PROMPT + single


def test_seeded_sampling_is_reproducible(http_server: Server) -> None:
    def sample(seed: int | None) -> dict:
        return tgi(http_server, PROMPT, temperature=1.5, seed=seed, details=True, max_new_tokens=NEW_TOKENS).json()

    first, again = sample(1234), sample(1234)
    assert first["generated_text"] == again["generated_text"]
    assert first["details"]["seed"] == 1234
    assert sample(None)["details"]["seed"] is not None, "an unseeded sampler reports the seed it drew"


# -- OpenAI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["base", "alpha"])
def test_completions_stream_and_not(http_server: Server, model: str) -> None:
    model = http_server.model_name if model == "base" else model
    client = openai_client(http_server)
    adapter_id = None if model == http_server.model_name else model
    expected = tgi(http_server, PROMPT, adapter_id=adapter_id, details=True, max_new_tokens=NEW_TOKENS).json()
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, logprobs=0)
    choice = completion.choices[0]
    assert (completion.model, choice.text, choice.finish_reason) == (model, expected["generated_text"], "length")
    assert choice.logprobs.token_logprobs == pytest.approx([t["logprob"] for t in expected["details"]["tokens"]])
    prompt_tokens = len(AutoTokenizer.from_pretrained(http_server.model_dir).encode(PROMPT))
    assert completion.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": NEW_TOKENS,
        "total_tokens": prompt_tokens + NEW_TOKENS,
    }
    stream = client.completions.create(
        model=model,
        prompt=[PROMPT],
        max_tokens=NEW_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(chunk.object == "text_completion" and chunk.model == model for chunk in chunks)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == choice.text
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == prompt_tokens + NEW_TOKENS


@pytest.mark.parametrize("model", ["base", "beta"])
def test_chat_completions_stream_and_not(http_server: Server, model: str) -> None:
    model = http_server.model_name if model == "base" else model
    client = openai_client(http_server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    completion = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    tokenizer = AutoTokenizer.from_pretrained(http_server.model_dir)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert completion.usage.prompt_tokens == len(tokenizer.encode(rendered))
    assert "<|im_end|>" not in choice.message.content and "<|eos|>" not in choice.message.content
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=NEW_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == choice.message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_openai_text_excludes_the_stop_sequence_tgi_keeps_it(http_server: Server, stream: bool) -> None:
    free_text = tgi(http_server, PROMPT, max_new_tokens=NEW_TOKENS).json()["generated_text"]
    stop = free_text[10:12]
    cut = free_text.find(stop)
    kept = tgi(http_server, PROMPT, max_new_tokens=NEW_TOKENS, stop=[stop], details=True).json()
    assert kept["generated_text"] == free_text[: cut + len(stop)]
    assert kept["details"]["finish_reason"] == "stop_sequence"
    client = openai_client(http_server)
    request = {"model": http_server.model_name, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
    if stream:
        chunks = list(client.completions.create(**request, stop=stop, stream=True))
        text = "".join(chunk.choices[0].text for chunk in chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**request, stop=stop).choices[0]
        text, finish_reason = choice.text, choice.finish_reason
    assert (text, finish_reason) == (free_text[:cut], "stop")


# -- errors -----------------------------------------------------------------------------------


def test_unknown_adapter_is_404_naming_it(http_server: Server) -> None:
    message = assert_error(tgi(http_server, PROMPT, adapter_id="nope"), 404, "not_found_error", "parameters.adapter_id")
    assert "nope" in message
    response = httpx.post(f"{http_server.base_url}/v1/completions", json={"model": "ghost", "prompt": PROMPT})
    assert "ghost" in assert_error(response, 404, "not_found_error", "model")
    with pytest.raises(NotFoundError, match="ghost"):
        openai_client(http_server).chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])


def test_negative_temperature_is_422_naming_the_field(http_server: Server) -> None:
    response = tgi(http_server, PROMPT, temperature=-1)
    message = assert_error(response, 422, "invalid_request_error", "parameters.temperature")
    assert message == "parameters.temperature: Input should be greater than or equal to 0"
    response = httpx.post(
        f"{http_server.base_url}/v1/chat/completions",
        json={"model": "alpha", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
    )
    assert "temperature" in assert_error(response, 422, "invalid_request_error", "temperature")


def test_invalid_parameter_combinations_are_422(http_server: Server) -> None:
    both = tgi(http_server, PROMPT, adapter_id="alpha", adapters={"beta": 1.0})
    assert "mutually exclusive" in assert_error(both, 422, "invalid_request_error", "parameters.adapters")
    n = httpx.post(f"{http_server.base_url}/v1/completions", json={"model": "alpha", "prompt": PROMPT, "n": 17})
    assert_error(n, 422, "invalid_request_error", "n")
    stops = tgi(http_server, PROMPT, stop=["a", "b", "c", "d", "e"])
    assert_error(stops, 422, "invalid_request_error", "parameters.stop")


def test_prompt_over_max_input_tokens_is_422(http_server: Server) -> None:
    limit = httpx.get(f"{http_server.base_url}/info").json()["limits"]["max_input_tokens"]
    assert tgi(http_server, "x" * (limit - 1), max_new_tokens=1).status_code == 200  # one token per byte, plus bos
    long_prompt = "x" * limit
    assert str(limit) in assert_error(tgi(http_server, long_prompt), 422, "invalid_request_error", "inputs")
    response = httpx.post(f"{http_server.base_url}/v1/completions", json={"model": "alpha", "prompt": long_prompt})
    assert_error(response, 422, "invalid_request_error", "prompt")


# -- cancellation and queueing (one batch row, one queue place) -------------------------------


def _long_stream_request(server: Server) -> tuple[str, dict]:
    return f"{server.base_url}/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG_TOKENS}}


def _assert_next_request_runs_promptly(server: Server) -> None:
    """The disconnected requests give their row and queue place back promptly, and the next one runs.

    The server learns of a disconnect asynchronously, so it first gets until the deadline to go idle.
    """
    started = time.monotonic()
    freed = wait_until_idle(server)
    assert (freed["running_requests"], freed["queued_requests"]) == (0, 0)
    response = tgi(server, PROMPT, max_new_tokens=4, timeout=60)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < PROMPT_TIMEOUT_S
    info = wait_until_idle(server)
    assert (info["running_requests"], info["queued_requests"]) == (0, 0)


def test_stream_disconnect_cancels_the_request(single_slot_server: Server) -> None:
    url, body = _long_stream_request(single_slot_server)
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as response:
        lines = response.iter_lines()
        assert len(read_sse_events(lines, 2)) == 2
        assert httpx.get(f"{single_slot_server.base_url}/info").json()["running_requests"] == 1
    _assert_next_request_runs_promptly(single_slot_server)


def test_non_stream_disconnect_cancels_the_request(single_slot_server: Server) -> None:
    with pytest.raises(httpx.ReadTimeout):
        tgi(single_slot_server, PROMPT, max_new_tokens=LONG_TOKENS, timeout=1.0)
    _assert_next_request_runs_promptly(single_slot_server)


def test_queue_full_is_429_with_retry_after(single_slot_server: Server) -> None:
    url, body = _long_stream_request(single_slot_server)
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as running:
        running_lines = running.iter_lines()
        assert len(read_sse_events(running_lines, 1)) == 1
        # Its response headers arrive after the engine accepted it: it now holds the one queue place.
        with client.stream("POST", url, json=body) as queued:
            assert queued.status_code == 200
            rejected = tgi(single_slot_server, PROMPT, max_new_tokens=4)
            assert_error(rejected, 429, "overloaded_error", None)
            assert int(rejected.headers["Retry-After"]) >= 1
            with pytest.raises(RateLimitError):
                openai_client(single_slot_server).completions.create(model="alpha", prompt=PROMPT, max_tokens=4)
    _assert_next_request_runs_promptly(single_slot_server)
