"""``/v1/completions`` for evaluation harnesses: prompt lists, ``n``, ``best_of``, ``echo`` with prompt
logprobs, ``max_tokens: 0``, vLLM's ``min_tokens``/``ignore_eos``, multi-choice streams; chat logprobs.

A real ``spectra serve`` driven by raw httpx and the ``openai`` SDK. The oracles are the server
itself (a prompt alone against the same prompt in a list, a seed replayed), a plain ``transformers``
forward of the same tiny model (PEFT's ``PeftModel`` for an adapter) for prompt logprobs, and
``/generate`` for the token ids behind chat logprobs.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from tests.conftest import load_base
from tests.test_http_api import assert_error, openai_client, tgi

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

PROMPTS = ["ab", "cd", "ef"]
NEW_TOKENS = 6
SCORED_TEXT = "Hello world"  # ASCII: one token per character, so token strings and text line up


def completions(server: Server, **body: object) -> dict:
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def model_name(server: Server, model: str) -> str:
    return server.model_name if model == "base" else model


@pytest.fixture(scope="module")
def tokenizer(http_server: Server) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(http_server.model_dir)


@pytest.fixture(scope="module")
def solo_texts(http_server: Server) -> list[str]:
    """Each of PROMPTS alone, greedy: what its choice in a list must say."""
    texts = [
        completions(http_server, model=http_server.model_name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)[
            "choices"
        ][0]["text"]
        for prompt in PROMPTS
    ]
    assert len(set(texts)) == len(texts), "the prompts must answer differently for the order to be checked"
    return texts


def reference_logprobs(server: Server, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """log_softmax of one transformers forward over ``ids``: row i is the distribution of token i + 1."""
    model = load_base(server.model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, server.adapter_dirs[adapter]).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


# -- prompt lists -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["strings", "token-id-lists"])
def test_prompt_lists_give_one_choice_per_prompt_in_order(
    http_server: Server, tokenizer: AutoTokenizer, solo_texts: list[str], form: str
) -> None:
    prompt = PROMPTS if form == "strings" else [tokenizer.encode(text) for text in PROMPTS]
    body = completions(http_server, model=http_server.model_name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert [choice["text"] for choice in body["choices"]] == solo_texts
    prompt_tokens = sum(len(tokenizer.encode(text)) for text in PROMPTS)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] <= len(PROMPTS) * NEW_TOKENS


def test_token_id_prompt_equals_its_text(http_server: Server, tokenizer: AutoTokenizer, solo_texts: list[str]) -> None:
    completion = openai_client(http_server).completions.create(
        model=http_server.model_name, prompt=tokenizer.encode(PROMPTS[1]), max_tokens=NEW_TOKENS, temperature=0
    )
    assert [choice.text for choice in completion.choices] == [solo_texts[1]]
    assert completion.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[1]))


def test_prompt_list_with_n_numbers_choices_prompt_major(http_server: Server, solo_texts: list[str]) -> None:
    """``index`` = prompt_index * n + j, as vLLM numbers them."""
    completion = openai_client(http_server).completions.create(
        model=http_server.model_name, prompt=PROMPTS, n=2, max_tokens=NEW_TOKENS, temperature=0
    )
    assert [choice.index for choice in completion.choices] == list(range(2 * len(PROMPTS)))
    assert [choice.text for choice in completion.choices] == [text for text in solo_texts for _ in range(2)]


# -- n and best_of ----------------------------------------------------------------------------


def test_n_sampled_choices_differ_and_replay_with_the_seed(http_server: Server) -> None:
    client = openai_client(http_server)

    def sample() -> list[str]:
        completion = client.completions.create(
            model="alpha", prompt="Hello", n=3, seed=1234, temperature=1.0, max_tokens=NEW_TOKENS
        )
        assert [choice.index for choice in completion.choices] == [0, 1, 2]
        return [choice.text for choice in completion.choices]

    first = sample()
    assert len(set(first)) == 3, first
    assert sample() == first


def test_greedy_n_choices_are_identical(http_server: Server) -> None:
    completion = openai_client(http_server).completions.create(
        model="beta", prompt="Hello", n=2, temperature=0, max_tokens=NEW_TOKENS
    )
    assert len(completion.choices) == 2
    assert completion.choices[0].text == completion.choices[1].text
    assert completion.usage.completion_tokens == 2 * NEW_TOKENS or completion.choices[0].finish_reason == "stop"


def test_best_of_returns_the_n_with_the_highest_mean_logprob(http_server: Server) -> None:
    """best_of=4 draws the same 4 candidates as n=4 with the same seed; min_tokens = max_tokens keeps eos out
    so that every candidate's mean is over exactly the tokens it returns."""
    request = {"model": http_server.model_name, "prompt": "Hello", "temperature": 1.0, "seed": 21, "logprobs": 0}
    request |= {"max_tokens": 8, "min_tokens": 8}
    candidates = completions(http_server, **request, n=4)["choices"]
    assert all(len(choice["logprobs"]["token_logprobs"]) == 8 for choice in candidates), "no special tokens dropped"
    mean = {choice["text"]: sum(choice["logprobs"]["token_logprobs"]) / 8 for choice in candidates}
    assert len(mean) == 4
    best = completions(http_server, **request, n=2, best_of=4)
    assert [choice["index"] for choice in best["choices"]] == [0, 1]
    assert {choice["text"] for choice in best["choices"]} == set(sorted(mean, key=mean.get, reverse=True)[:2])
    assert best["usage"]["completion_tokens"] == 4 * 8, "every candidate is generated (and billed)"


def test_best_of_above_n_cannot_stream(http_server: Server) -> None:
    response = httpx.post(
        f"{http_server.base_url}/v1/completions",
        json={"model": "alpha", "prompt": "x", "n": 1, "best_of": 2, "stream": True, "max_tokens": 2},
    )
    assert "best_of" in assert_error(response, 422, "invalid_request_error", "body")


# -- echo and prompt logprobs -----------------------------------------------------------------


def test_echo_with_logprobs_on_token_ids(http_server: Server, tokenizer: AutoTokenizer) -> None:
    ids = tokenizer.encode(SCORED_TEXT)
    completion = openai_client(http_server).completions.create(
        model="alpha",
        prompt=ids,
        echo=True,
        logprobs=2,
        max_tokens=NEW_TOKENS,
        temperature=0,
        extra_body={"min_tokens": NEW_TOKENS},
    )
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.token_logprobs) == len(ids) + NEW_TOKENS
    assert len(logprobs.tokens) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == len(ids) + NEW_TOKENS
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(isinstance(value, float) for value in logprobs.token_logprobs[1:])
    assert choice.text.startswith(tokenizer.decode(ids))
    assert logprobs.tokens[: len(ids)] == [tokenizer.decode([token_id]) for token_id in ids]
    for chosen, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
        assert 1 <= len(top) <= 3
        assert any(value == pytest.approx(chosen, abs=1e-6) for value in top.values()), "the chosen token is in it"
        assert max(top.values()) >= chosen - 1e-6
    assert completion.usage.completion_tokens == NEW_TOKENS


def test_top_logprobs_key_the_chosen_token_by_its_token_string(http_server: Server) -> None:
    """``top_logprobs[i][tokens[i]] == token_logprobs[i]``: a client finds the chosen token under its own string.
    The base model's greedy answer to "Hey" starts with bytes that are not UTF-8 on their own."""
    logprobs = completions(
        http_server, model=http_server.model_name, prompt="Hey", logprobs=2, max_tokens=NEW_TOKENS, temperature=0
    )["choices"][0]["logprobs"]
    for position, (token, chosen, top) in enumerate(
        zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
    ):
        if chosen is not None:
            assert token in top, (position, token, top)
            assert top[token] == pytest.approx(chosen, abs=1e-6)


@pytest.mark.parametrize("adapter", [None, "alpha"], ids=["base", "alpha"])
def test_prompt_logprobs_equal_a_transformers_forward(
    http_server: Server, tokenizer: AutoTokenizer, adapter: str | None
) -> None:
    """What lm-evaluation-harness's loglikelihood requests read: echo, logprobs 1, one new token, greedy."""
    ids = tokenizer.encode("The spectral adapter scores this sentence.")
    body = completions(
        http_server,
        model=adapter or http_server.model_name,
        prompt=ids,
        echo=True,
        logprobs=1,
        max_tokens=1,
        temperature=0,
    )
    logprobs = body["choices"][0]["logprobs"]
    reference = reference_logprobs(http_server, adapter, ids)
    expected = reference[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = torch.tensor(logprobs["token_logprobs"][1 : len(ids)])
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # The one generated token is greedy: the argmax after the whole prompt, with that logprob.
    assert logprobs["token_logprobs"][len(ids)] == pytest.approx(reference[-1].max().item(), abs=1e-4)


def test_top_logprobs_hold_the_most_likely_alternatives(http_server: Server, tokenizer: AutoTokenizer) -> None:
    """With logprobs k, each prompt position's dict holds the k most likely tokens' logprobs (plus the chosen),
    so its largest value is the distribution's maximum; checked against a transformers forward."""
    ids = tokenizer.encode(SCORED_TEXT)
    logprobs = completions(http_server, model=http_server.model_name, prompt=ids, echo=True, logprobs=3, max_tokens=0)[
        "choices"
    ][0]["logprobs"]
    reference = reference_logprobs(http_server, None, ids)
    for position, top in enumerate(logprobs["top_logprobs"][1:], start=1):
        most_likely = reference[position - 1].max().item()
        assert max(top.values()) == pytest.approx(most_likely, abs=1e-4), (position, top)


@pytest.mark.parametrize("form", ["string", "token-ids"])
def test_echoed_text_offsets_index_the_text(http_server: Server, tokenizer: AutoTokenizer, form: str) -> None:
    """OpenAI's contract: offsets never go back, ``text[text_offset[i]:]`` starts with the echoed prompt's
    ``tokens[i]`` (an ASCII prompt: each token is its own text), and the answer's offsets start after the prompt.
    A string prompt is echoed as sent, so the bos token encoding added takes no characters of it."""
    prompt = SCORED_TEXT if form == "string" else tokenizer.encode(SCORED_TEXT)
    choice = completions(
        http_server, model=http_server.model_name, prompt=prompt, echo=True, logprobs=0, max_tokens=4, temperature=0
    )["choices"][0]
    offsets, tokens = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
    assert offsets == sorted(offsets), offsets
    prompt_length = len(tokenizer.encode(SCORED_TEXT))
    pairs = list(zip(offsets[:prompt_length], tokens[:prompt_length], strict=True))
    if form == "string":
        assert pairs[0] == (0, tokenizer.bos_token) and pairs[1][0] == 0, pairs[:2]
        pairs = pairs[1:]
    for offset, token in pairs:
        assert choice["text"][offset : offset + len(token)] == token, (choice["text"], offsets, tokens)
    echoed = choice["text"][: offsets[prompt_length]]
    assert echoed in (SCORED_TEXT, tokenizer.decode(tokenizer.encode(SCORED_TEXT))), (choice["text"], offsets)


def test_max_tokens_zero_with_echo_scores_the_prompt_only(http_server: Server, tokenizer: AutoTokenizer) -> None:
    client = openai_client(http_server)
    completion = client.completions.create(
        model="alpha", prompt=[SCORED_TEXT, "Bye"], echo=True, logprobs=1, max_tokens=0
    )
    assert [choice.text for choice in completion.choices] == [SCORED_TEXT, "Bye"]
    assert [len(choice.logprobs.token_logprobs) for choice in completion.choices] == [
        len(tokenizer.encode(SCORED_TEXT)),
        len(tokenizer.encode("Bye")),
    ]
    assert all(choice.finish_reason == "length" for choice in completion.choices)
    assert completion.usage.completion_tokens == 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens
    stream = client.completions.create(
        model="alpha",
        prompt=SCORED_TEXT,
        echo=True,
        logprobs=1,
        max_tokens=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == SCORED_TEXT
    streamed = [value for chunk in chunks if chunk.choices for value in chunk.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(completion.choices[0].logprobs.token_logprobs, abs=1e-6)
    assert chunks[-1].usage.completion_tokens == 0


def test_max_tokens_zero_without_echo_is_422(http_server: Server) -> None:
    response = httpx.post(
        f"{http_server.base_url}/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 0}
    )
    message = assert_error(response, 422, "invalid_request_error", "body")
    assert "max_tokens" in message and "echo" in message


# -- min_tokens and ignore_eos ----------------------------------------------------------------


@pytest.fixture(scope="module")
def early_eos_prompt(http_server: Server) -> tuple[str, int]:
    """A prompt whose greedy answer ends with eos within a few tokens, found by trying 64 in one request."""
    candidates = [f"p{index}" for index in range(64)]
    body = completions(http_server, model=http_server.model_name, prompt=candidates, max_tokens=8, temperature=0)
    for choice in body["choices"]:
        if choice["finish_reason"] == "stop":
            prompt = candidates[choice["index"]]
            alone = completions(http_server, model=http_server.model_name, prompt=prompt, max_tokens=8, temperature=0)
            assert alone["choices"][0]["finish_reason"] == "stop"
            if alone["usage"]["completion_tokens"] < 8:
                return prompt, alone["usage"]["completion_tokens"]
    pytest.fail("none of 64 prompts ends with eos within 7 greedy tokens")


def test_ignore_eos_runs_to_max_tokens(http_server: Server, early_eos_prompt: tuple[str, int]) -> None:
    prompt, _ = early_eos_prompt
    completion = openai_client(http_server).completions.create(
        model=http_server.model_name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 12


def test_min_tokens_holds_eos_back(http_server: Server, early_eos_prompt: tuple[str, int]) -> None:
    prompt, length = early_eos_prompt
    completion = openai_client(http_server).completions.create(
        model=http_server.model_name, prompt=prompt, max_tokens=20, temperature=0, extra_body={"min_tokens": length + 6}
    )
    assert completion.usage.completion_tokens >= length + 6


# -- streams with several choices -------------------------------------------------------------


def test_stream_with_n_interleaves_indexed_choices_and_reports_usage(http_server: Server) -> None:
    client = openai_client(http_server)
    request = {"model": "alpha", "prompt": ["Hello", "World"], "n": 2, "seed": 3, "temperature": 0.9, "max_tokens": 8}
    full = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason is not None:
            finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts == {choice.index: choice.text for choice in full.choices}
    assert finishes == {choice.index: [choice.finish_reason] for choice in full.choices}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == (
        full.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    )


# -- chat logprobs ----------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}]


def test_chat_top_logprobs_are_sorted_alternatives(http_server: Server) -> None:
    completion = openai_client(http_server).chat.completions.create(
        model="alpha", messages=CHAT, max_tokens=NEW_TOKENS, temperature=0, logprobs=True, top_logprobs=3
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens == NEW_TOKENS
    for entry in content:
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(entry.logprob, abs=1e-6), "greedy: the chosen token is the most likely"


def test_chat_logprob_bytes_are_the_token_bytes(http_server: Server, tokenizer: AutoTokenizer) -> None:
    """OpenAI's ``bytes``: the token's own UTF-8 bytes, which clients join where a character spans tokens.
    Token ids are bytes with this tokenizer; /generate on the rendered chat prompt gives the same greedy ids."""
    completion = openai_client(http_server).chat.completions.create(
        model="alpha", messages=CHAT, max_tokens=NEW_TOKENS, temperature=0, logprobs=True, top_logprobs=1
    )
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    details = tgi(http_server, rendered, adapter_id="alpha", max_new_tokens=NEW_TOKENS, details=True).json()["details"]
    assert details["prompt_tokens"] == completion.usage.prompt_tokens
    ids = [token["id"] for token in details["tokens"] if not token["special"]]
    assert [entry.bytes for entry in completion.choices[0].logprobs.content] == [[token_id] for token_id in ids]


def test_chat_n_choices_with_logprobs(http_server: Server) -> None:
    completion = openai_client(http_server).chat.completions.create(
        model=http_server.model_name, messages=CHAT, n=3, seed=5, temperature=1.0, max_tokens=4, logprobs=True
    )
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert all(len(choice.logprobs.content) >= 1 for choice in completion.choices)
    assert len({json.dumps([e.logprob for e in c.logprobs.content]) for c in completion.choices}) == 3


@pytest.mark.parametrize("adapter", [None, "alpha"], ids=["base", "alpha"])
def test_tgi_decoder_input_details_and_top_n_tokens(
    http_server: Server, tokenizer: AutoTokenizer, adapter: str | None
) -> None:
    """huggingface_hub's text_generation with TGI's ``decoder_input_details`` and ``top_n_tokens``: the prefill
    is the prompt scored by the model (PEFT for the adapter), and each token's alternatives are its top n."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=http_server.base_url)
    output = client.text_generation(
        SCORED_TEXT,
        max_new_tokens=4,
        details=True,
        decoder_input_details=True,
        top_n_tokens=3,
        adapter_id=adapter,
    )
    ids = tokenizer.encode(SCORED_TEXT)
    prefill = output.details.prefill
    assert [token.id for token in prefill] == ids
    assert prefill[0].logprob is None
    expected = reference_logprobs(http_server, adapter, ids)
    for position, token in enumerate(prefill[1:], start=1):
        assert token.logprob == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)
    assert len(output.details.top_tokens) == len(output.details.tokens) == 4
    for chosen, top in zip(output.details.tokens, output.details.top_tokens, strict=True):
        # huggingface_hub leaves the nested top_tokens lists as plain dicts.
        values = [alternative["logprob"] for alternative in top]
        assert len(top) == 3 and values == sorted(values, reverse=True)
        assert values[0] >= chosen.logprob - 1e-6
        assert top[0]["id"] == chosen.id, "greedy: the chosen token is the most likely one"
    streamed = list(
        client.text_generation(
            SCORED_TEXT, max_new_tokens=4, details=True, top_n_tokens=2, stream=True, adapter_id=adapter
        )
    )
    assert [event.token.id for event in streamed] == [token.id for token in output.details.tokens]
    assert all(len(event.top_tokens) == 2 for event in streamed)
