"""``/tokenize`` (vLLM's and TGI's shapes), ``/detokenize`` and ``/v1/models``' vLLM fields, on a real server.

The oracle is the model directory's own tokenizer loaded with ``transformers``; chat counts are
checked against what /v1/chat/completions reports for the same messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

# Multi-byte characters: the byte-level tokenizer gives them several tokens each.
PROMPT = "Hello, wörld 🙂!"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]


def post(server: Server, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=30)


def ok(response: httpx.Response) -> dict | list:
    assert response.status_code == 200, response.text
    return response.json()


def error(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["param"] == param
    return body["message"]


@pytest.fixture(scope="module")
def tokenizer(http_server: Server) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(http_server.model_dir)


@pytest.fixture(scope="module")
def max_total_tokens(http_server: Server) -> int:
    return ok(httpx.get(f"{http_server.base_url}/info", timeout=10))["limits"]["max_total_tokens"]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_detokenize_roundtrip(
    http_server: Server, tokenizer: AutoTokenizer, max_total_tokens: int, add_special_tokens: bool
) -> None:
    body = {"prompt": PROMPT, "add_special_tokens": add_special_tokens}
    tokenized = ok(post(http_server, "/tokenize", body))
    expected = tokenizer.encode(PROMPT, add_special_tokens=add_special_tokens)
    assert tokenized == {
        "count": len(expected),
        "max_model_len": max_total_tokens,
        "tokens": expected,
        "token_strs": None,
    }
    detokenized = ok(post(http_server, "/detokenize", {"tokens": tokenized["tokens"]}))
    assert detokenized == {"prompt": (tokenizer.bos_token if add_special_tokens else "") + PROMPT}


def test_token_strs_and_model_names(http_server: Server, tokenizer: AutoTokenizer) -> None:
    base = ok(post(http_server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}))
    assert base["token_strs"] == tokenizer.convert_ids_to_tokens(base["tokens"])
    for model in (http_server.model_name, "alpha"):  # adapters share the base tokenizer
        assert ok(post(http_server, "/tokenize", {"model": model, "prompt": PROMPT, "return_token_strs": True})) == base
        assert ok(post(http_server, "/detokenize", {"model": model, "tokens": base["tokens"]}))["prompt"].endswith(
            PROMPT
        )
    for path, body in (("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [1]})):
        message = error(post(http_server, path, {**body, "model": "no-such-model"}), 404, "model")
        assert "'no-such-model' not found" in message and "GET /v1/models" in message


def test_chat_count_equals_chat_completions_prompt_tokens(http_server: Server) -> None:
    chat = ok(post(http_server, "/tokenize", {"model": "beta", "messages": MESSAGES}))
    client = OpenAI(base_url=f"{http_server.base_url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=1, temperature=0)
    assert chat["count"] == len(chat["tokens"]) == completion.usage.prompt_tokens
    without_bos = ok(post(http_server, "/tokenize", {"messages": MESSAGES, "add_special_tokens": False}))
    assert without_bos["tokens"] == chat["tokens"][1:]
    no_prompt = ok(post(http_server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}))
    assert no_prompt["count"] < chat["count"] and chat["tokens"][: no_prompt["count"]] == no_prompt["tokens"]
    assert ok(post(http_server, "/detokenize", {"tokens": chat["tokens"]}))["prompt"].endswith("assistant\n")


@pytest.mark.parametrize("inputs", ["plain ascii, text", PROMPT])
def test_tgi_tokens_carry_character_offsets(http_server: Server, tokenizer: AutoTokenizer, inputs: str) -> None:
    tokens = ok(post(http_server, "/tokenize", {"inputs": inputs, "parameters": {"max_new_tokens": 4}}))
    assert [token["id"] for token in tokens] == tokenizer.encode(inputs)
    assert tokens[0] == {"id": tokenizer.bos_token_id, "text": "", "start": 0, "stop": 0}
    assert all(inputs[token["start"] : token["stop"]] == token["text"] for token in tokens)
    if inputs.isascii():
        assert "".join(token["text"] for token in tokens) == inputs
    bare = ok(post(http_server, "/tokenize", {"inputs": inputs, "add_special_tokens": False}))
    assert bare == tokens[1:]


def test_bodies_the_tokenizer_refuses(http_server: Server, tokenizer: AutoTokenizer) -> None:
    for body in ({}, {"text": PROMPT}, {"prompt": PROMPT, "messages": MESSAGES}, [PROMPT]):
        message = error(post(http_server, "/tokenize", body), 422, "body")
        assert all(field in message for field in ("`inputs`", "`prompt`", "`messages`")), message
    vocab = len(tokenizer)
    message = error(post(http_server, "/detokenize", {"tokens": [72, vocab]}), 422, "tokens[1]")
    assert f"{vocab} is not a token id" in message and f"0 to {vocab - 1}" in message
    error(post(http_server, "/detokenize", {"tokens": [-1]}), 422, "tokens[0]")
    error(post(http_server, "/tokenize", {"messages": [{"role": "robot", "content": "x"}]}), 422, "messages[0].role")
    no_function = {"messages": MESSAGES, "tools": [{"type": "function"}]}
    error(post(http_server, "/tokenize", no_function), 422, "tools[0].function")
    body = {"inputs": PROMPT, "parameters": {"adapter_source": "hub"}}
    error(post(http_server, "/tokenize", body), 422, "parameters.adapter_source")


def test_models_carry_root_parent_and_max_model_len(http_server: Server, max_total_tokens: int) -> None:
    info = ok(httpx.get(f"{http_server.base_url}/info", timeout=10))
    cards = {card["id"]: card for card in ok(httpx.get(f"{http_server.base_url}/v1/models", timeout=10))["data"]}
    base = cards.pop(http_server.model_name)
    assert (base["root"], base["parent"], base["max_model_len"]) == (info["model_path"], None, max_total_tokens)
    assert set(cards) == {"alpha", "beta"}
    for adapter_id, card in cards.items():
        expected = (adapter_id, http_server.model_name, max_total_tokens)
        assert (card["root"], card["parent"], card["max_model_len"]) == expected
