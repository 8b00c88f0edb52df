"""Structured outputs end to end: OpenAI ``response_format``, vLLM ``structured_outputs`` and ``guided_*``,
TGI's ``parameters.grammar`` and LoRAX's ``parameters.response_format``, on a real ``spectra serve``.

The served model is a random tiny Llama with a byte-level tokenizer: left alone it writes random bytes,
so every answer that parses and matches its constraint is the grammar's doing. Schemas are bounded
(maxLength, minimum/maximum, enums, maxItems) so that the random model runs out of choices and ends
well within max_tokens. ``json_object`` (any object) is not bounded: those tests sample several choices
and check every one that finished. The clients are the real ``openai`` SDK (vLLM's fields in
``extra_body``), ``huggingface_hub`` and ``lorax-client``; raw httpx reads the error bodies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema_rs
import pytest
from huggingface_hub import InferenceClient
from lorax import Client as LoraxClient
from openai import UnprocessableEntityError

from tests.test_http_api import assert_error, openai_client, tgi

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

MAX_TOKENS = 160
PROMPT = "Answer:"
MESSAGES = [{"role": "user", "content": "Answer in kind."}]
# Declared out of alphabetical order, so that the order of the output's keys says which one the grammar used.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["x", "yy", "zzz"]}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {
        "y": {"type": "integer", "minimum": -9, "maximum": 9},
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "label": {"type": "string", "maxLength": 4},
        "ok": {"type": "boolean"},
    },
    "required": ["y", "x", "label", "ok"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe so"]
LARK = 'start: "(" NUM ("," NUM)? ("," NUM)? ")"\nNUM: /[1-9][0-9]?/'
LARK_MATCH = r"\([1-9][0-9]?(,[1-9][0-9]?){0,2}\)"
GBNF = 'root ::= greeting " " name\ngreeting ::= "hi" | "hello"\nname ::= [A-Z] [a-z] [a-z]?\n'
GBNF_MATCH = r"(hi|hello) [A-Z][a-z]{1,2}"

Check = Callable[[str], None]


def matches_schema(schema: dict) -> Check:
    validator = jsonschema_rs.validator_for(schema)

    def check(text: str) -> None:
        validator.validate(json.loads(text))

    return check


def matches_regex(pattern: str) -> Check:
    def check(text: str) -> None:
        assert re.fullmatch(pattern, text), (pattern, text)

    return check


def one_of(choices: list[str]) -> Check:
    def check(text: str) -> None:
        assert text in choices, text

    return check


def rf_schema(schema: dict) -> dict:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    }


# id -> (request fields, checker). The same fields go to chat and to completions.
CONSTRAINTS: dict[str, tuple[dict, Check]] = {
    "guided_json": ({"guided_json": POINT}, matches_schema(POINT)),
    "guided_json-string": ({"guided_json": json.dumps(POINT)}, matches_schema(POINT)),
    "guided_regex": ({"guided_regex": REGEX}, matches_regex(REGEX)),
    "guided_choice": ({"guided_choice": CHOICES}, one_of(CHOICES)),
    "guided_grammar-lark": ({"guided_grammar": LARK}, matches_regex(LARK_MATCH)),
    "guided_grammar-gbnf": ({"guided_grammar": GBNF}, matches_regex(GBNF_MATCH)),
    "structured_outputs-json": ({"structured_outputs": {"json": PERSON}}, matches_schema(PERSON)),
    "structured_outputs-regex": ({"structured_outputs": {"regex": "[a-f]{4}"}}, matches_regex("[a-f]{4}")),
    "structured_outputs-choice": ({"structured_outputs": {"choice": ["A", "B"]}}, one_of(["A", "B"])),
    "structured_outputs-grammar": ({"structured_outputs": {"grammar": GBNF}}, matches_regex(GBNF_MATCH)),
}
SAMPLINGS = {"greedy": {"temperature": 0}, "sampled": {"temperature": 1.2, "seed": 7}}


def model_name(server: Server, model: str) -> str:
    return server.model_name if model == "base" else model


def ask(server: Server, route: str, model: str, fields: dict, **kwargs: Any) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice, through the openai SDK; response_format is a named argument in chat
    only (completions have none in the SDK: it goes in extra_body there, like vLLM's fields)."""
    client = openai_client(server)
    fields = dict(fields)
    request = {"model": model_name(server, model), "max_tokens": MAX_TOKENS, **kwargs}
    if route == "chat":
        if "response_format" in fields:
            request["response_format"] = fields.pop("response_format")
        completion = client.chat.completions.create(messages=MESSAGES, extra_body=fields, **request)
        return [(choice.message.content, choice.finish_reason) for choice in completion.choices]
    completion = client.completions.create(prompt=PROMPT, extra_body=fields, **request)
    return [(choice.text, choice.finish_reason) for choice in completion.choices]


def stream_text(server: Server, route: str, model: str, fields: dict, **kwargs: Any) -> tuple[str, str]:
    client = openai_client(server)
    fields = dict(fields)
    request = {"model": model_name(server, model), "max_tokens": MAX_TOKENS, "stream": True, **kwargs}
    if route == "chat":
        if "response_format" in fields:
            request["response_format"] = fields.pop("response_format")
        chunks = [
            chunk.choices[0]
            for chunk in client.chat.completions.create(messages=MESSAGES, extra_body=fields, **request)
        ]
        return "".join(choice.delta.content or "" for choice in chunks), chunks[-1].finish_reason
    chunks = [chunk.choices[0] for chunk in client.completions.create(prompt=PROMPT, extra_body=fields, **request)]
    return "".join(choice.text for choice in chunks), chunks[-1].finish_reason


# -- OpenAI response_format -------------------------------------------------------------------


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("model", ["base", "alpha"])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_json_schema_answers_parse_and_match(http_server: Server, route: str, model: str, sampling: str) -> None:
    n = 1 if sampling == "greedy" else 3
    answers = ask(http_server, route, model, rf_schema(PERSON), n=n, **SAMPLINGS[sampling])
    assert len(answers) == n
    check = matches_schema(PERSON)
    for text, finish_reason in answers:
        check(text)
        assert finish_reason == "stop"
    if sampling == "sampled":
        assert len({text for text, _ in answers}) > 1, "each choice samples its own answer"


def test_output_keys_follow_the_schema_order(http_server: Server) -> None:
    """As OpenAI documents for Structured Outputs: keys come in the order the schema declares them."""
    for fields in (rf_schema(PERSON), {"guided_json": POINT}):
        schema = fields.get("guided_json") or PERSON
        ((text, _),) = ask(http_server, "chat", "base", fields, temperature=0)
        assert list(json.loads(text)) == list(schema["properties"]), text


@pytest.mark.parametrize(
    ("route", "fields"),
    [
        ("chat", {"response_format": {"type": "json_object"}}),
        ("completions", {"response_format": {"type": "json_object"}}),
        ("completions", {"structured_outputs": {"json_object": True}}),
    ],
    ids=["chat-response_format", "completions-response_format", "completions-structured_outputs"],
)
def test_json_object_answers_are_objects(http_server: Server, route: str, fields: dict) -> None:
    answers = ask(http_server, route, "alpha", fields, n=8, temperature=1.2, seed=1, max_tokens=120)
    finished = [text for text, finish_reason in answers if finish_reason == "stop"]
    assert finished, answers
    for text in finished:
        assert isinstance(json.loads(text), dict), text
    assert all(text.startswith("{") for text, _ in answers)


# -- vLLM structured_outputs and guided_* -----------------------------------------------------


@pytest.mark.parametrize(
    ("route", "model", "sampling"),
    [("chat", "base", "greedy"), ("completions", "alpha", "sampled")],
    ids=["chat-base-greedy", "completions-alpha-sampled"],
)
@pytest.mark.parametrize("constraint", list(CONSTRAINTS))
def test_vllm_constraints(http_server: Server, constraint: str, route: str, model: str, sampling: str) -> None:
    fields, check = CONSTRAINTS[constraint]
    ((text, finish_reason),) = ask(http_server, route, model, fields, **SAMPLINGS[sampling])
    check(text)
    assert finish_reason == "stop"


def test_mixed_batch_of_concurrent_requests(http_server: Server) -> None:
    """Eight requests in flight together: different constraints (and none), adapters, routes and samplings;
    each row's mask is its own, so every answer matches its own constraint and the free row is free text."""
    requests = [
        ("chat", "base", rf_schema(PERSON), SAMPLINGS["greedy"], matches_schema(PERSON)),
        ("completions", "alpha", {"guided_json": POINT}, SAMPLINGS["sampled"], matches_schema(POINT)),
        ("chat", "beta", {"guided_regex": REGEX}, SAMPLINGS["sampled"], matches_regex(REGEX)),
        ("completions", "base", {"structured_outputs": {"choice": CHOICES}}, SAMPLINGS["greedy"], one_of(CHOICES)),
        ("chat", "alpha", {"guided_grammar": LARK}, SAMPLINGS["greedy"], matches_regex(LARK_MATCH)),
        ("completions", "beta", rf_schema(PERSON), {"temperature": 1.2, "seed": 99}, matches_schema(PERSON)),
        ("chat", "alpha", {"structured_outputs": {"grammar": GBNF}}, SAMPLINGS["sampled"], matches_regex(GBNF_MATCH)),
        ("completions", "base", {}, {"temperature": 0, "max_tokens": 40}, None),
    ]

    def run(request: tuple) -> list[tuple[str, str]]:
        route, model, fields, sampling, _ = request
        return ask(http_server, route, model, fields, **sampling)

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(run, requests))
    for request, ((text, finish_reason),) in zip(requests, answers, strict=True):
        check = request[-1]
        if check is None:
            with pytest.raises(ValueError):  # json.JSONDecodeError, or a schema violation
                matches_schema(PERSON)(text)
            continue
        check(text)
        assert finish_reason == "stop", (request, text)


@pytest.mark.parametrize(("route", "model"), [("chat", "alpha"), ("completions", "base")])
def test_stream_equals_the_greedy_answer(http_server: Server, route: str, model: str) -> None:
    ((text, finish_reason),) = ask(http_server, route, model, rf_schema(PERSON), temperature=0)
    streamed, streamed_finish = stream_text(http_server, route, model, rf_schema(PERSON), temperature=0)
    assert (streamed, streamed_finish) == (text, finish_reason) == (streamed, "stop")
    matches_schema(PERSON)(streamed)


# -- 422s -------------------------------------------------------------------------------------

OBJEKT = {"type": "objekt"}
INVALID = [
    ("chat", rf_schema(OBJEKT), "response_format.json_schema.schema", ["JSON schema", "objekt"]),
    ("completions", rf_schema(OBJEKT), "response_format.json_schema.schema", ["JSON schema", "objekt"]),
    ("completions", {"guided_json": OBJEKT}, "guided_json", ["objekt"]),
    ("chat", {"structured_outputs": {"json": OBJEKT}}, "structured_outputs.json", ["objekt"]),
    ("completions", {"guided_json": "{not json"}, "guided_json", ["not valid JSON"]),
    ("chat", {"guided_regex": "a(b"}, "guided_regex", ["regular expression", "unclosed group"]),
    (
        "completions",
        {"structured_outputs": {"regex": "[a-z"}},
        "structured_outputs.regex",
        ["unclosed character class"],
    ),
    ("chat", {"guided_grammar": "start: missing_rule"}, "guided_grammar", ["missing_rule"]),
    ("completions", {"structured_outputs": {"grammar": "start: foo\nfoo: bar"}}, "structured_outputs.grammar", ["bar"]),
    ("completions", {"guided_grammar": 'root ::= "a" undefined'}, "guided_grammar", ["undefined"]),
    (
        "chat",
        {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
        "guided_regex",
        ["one output constraint", "response_format", "guided_regex"],
    ),
    (
        "completions",
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        "structured_outputs.choice",
        ["one output constraint", "structured_outputs.regex"],
    ),
    ("completions", {"guided_json": POINT, "guided_choice": ["a"]}, "guided_choice", ["one output constraint"]),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format", ["json_schema object"]),
    ("chat", {"guided_choice": []}, "guided_choice", ["at least 1"]),
]


@pytest.mark.parametrize(("route", "fields", "param", "fragments"), INVALID, ids=[case[2] for case in INVALID])
def test_invalid_constraints_are_422_naming_the_field(
    http_server: Server, route: str, fields: dict, param: str, fragments: list[str]
) -> None:
    path, body = ("chat/completions", {"messages": MESSAGES}) if route == "chat" else ("completions", {"prompt": "x"})
    response = httpx.post(
        f"{http_server.base_url}/v1/{path}", json={"model": "alpha", "max_tokens": 4, **body, **fields}, timeout=30
    )
    message = assert_error(response, 422, "invalid_request_error", param)
    for fragment in fragments:
        assert fragment in message, message


def test_the_sdk_raises_unprocessable_entity_with_the_error_object(http_server: Server) -> None:
    with pytest.raises(UnprocessableEntityError) as raised:
        openai_client(http_server).chat.completions.create(
            model="alpha",
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": OBJEKT}},
        )
    assert raised.value.body["param"] == "response_format.json_schema.schema"


# -- TGI and LoRAX /generate ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter_id", "sampling"),
    [(None, {}), ("alpha", {"temperature": 1.2, "seed": 3})],
    ids=["base-greedy", "alpha-sampled"],
)
def test_tgi_json_grammar(http_server: Server, adapter_id: str | None, sampling: dict) -> None:
    output = InferenceClient(base_url=http_server.base_url).text_generation(
        PROMPT,
        grammar={"type": "json", "value": PERSON},
        adapter_id=adapter_id,
        max_new_tokens=MAX_TOKENS,
        details=True,
        **sampling,
    )
    matches_schema(PERSON)(output.generated_text)
    assert output.details.finish_reason == "eos_token"


def test_tgi_regex_grammar_and_stream(http_server: Server) -> None:
    client = InferenceClient(base_url=http_server.base_url)
    grammar = {"type": "regex", "value": REGEX}
    text = client.text_generation(PROMPT, grammar=grammar, max_new_tokens=MAX_TOKENS)
    matches_regex(REGEX)(text)
    assert "".join(client.text_generation(PROMPT, grammar=grammar, max_new_tokens=MAX_TOKENS, stream=True)) == text
    schema_grammar = {"type": "json", "value": POINT}
    full = client.text_generation(PROMPT, grammar=schema_grammar, max_new_tokens=MAX_TOKENS, adapter_id="beta")
    streamed = client.text_generation(
        PROMPT, grammar=schema_grammar, max_new_tokens=MAX_TOKENS, adapter_id="beta", stream=True
    )
    assert "".join(streamed) == full
    matches_schema(POINT)(full)


@pytest.mark.parametrize("adapter_id", [None, "alpha"])
def test_lorax_response_format_json_object_with_schema(http_server: Server, adapter_id: str | None) -> None:
    response = LoraxClient(http_server.base_url).generate(
        PROMPT,
        adapter_id=adapter_id,
        response_format={"type": "json_object", "schema": POINT},
        max_new_tokens=MAX_TOKENS,
        do_sample=True,
        temperature=1.2,
        seed=5,
    )
    matches_schema(POINT)(response.generated_text)


TGI_INVALID = [
    ({"grammar": {"type": "json", "value": OBJEKT}}, "parameters.grammar.value", ["objekt"]),
    ({"grammar": {"type": "regex", "value": "a(b"}}, "parameters.grammar.value", ["unclosed group"]),
    ({"grammar": {"type": "regex", "value": {"a": 1}}}, "parameters.grammar.value", ["string"]),
    ({"response_format": {"type": "json_object", "schema": OBJEKT}}, "parameters.response_format", ["objekt"]),
    (
        {"grammar": {"type": "regex", "value": "a"}, "response_format": {"type": "json_object"}},
        "parameters.response_format",
        ["one output constraint"],
    ),
]


@pytest.mark.parametrize(("parameters", "param", "fragments"), TGI_INVALID, ids=range(len(TGI_INVALID)))
def test_tgi_invalid_grammars_are_422(http_server: Server, parameters: dict, param: str, fragments: list[str]) -> None:
    message = assert_error(
        tgi(http_server, PROMPT, max_new_tokens=4, **parameters), 422, "invalid_request_error", param
    )
    for fragment in fragments:
        assert fragment in message, message
