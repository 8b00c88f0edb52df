"""Chat tool calls end to end: ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``tool_calls`` in messages
and in streamed deltas, and a follow-up turn carrying the tool's result, with the real ``openai`` SDK.

The model is a random tiny Llama: only the grammar makes its calls name a tool and carry arguments that
parse and match the tool's schema, so every valid call here is the constraint's doing. The tools are
rendered into the prompt by the chat template (a few hundred byte tokens), hence a server of its own
with a larger input limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema_rs
import pytest
from transformers import AutoTokenizer

from tests.http_fixtures import start_server, stop_server
from tests.test_http_api import assert_error, openai_client

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from pathlib import Path

    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

MAX_TOKENS = 160
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
VALIDATORS = {tool["function"]["name"]: jsonschema_rs.validator_for(tool["function"]["parameters"]) for tool in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLINGS = {"greedy": {"temperature": 0}, "sampled": {"temperature": 1.2, "seed": 4}}


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.fixture(scope="module")
def tools_server(
    tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("tools-data")
    server = start_server(tiny_llama_dir, data_dir, peft_adapter_dirs, "--max-input-tokens", "2048")
    yield server
    stop_server(server)


def model_name(server: Server, model: str) -> str:
    return server.model_name if model == "base" else model


def chat(server: Server, model: str = "base", **kwargs: Any) -> Any:
    request = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": MAX_TOKENS, **kwargs}
    return openai_client(server).chat.completions.create(model=model_name(server, model), **request)


def assert_valid_call(call: Any, name: str | None = None) -> dict:
    assert call.type == "function" and call.id
    assert call.function.name in VALIDATORS
    if name is not None:
        assert call.function.name == name
    arguments = json.loads(call.function.arguments)
    VALIDATORS[call.function.name].validate(arguments)
    return arguments


def post_chat(server: Server, **body: Any) -> httpx.Response:
    body = {"model": server.model_name, "messages": MESSAGES, "max_tokens": 4, **body}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)


# -- tool_choice ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("model", ["base", "alpha"])
@pytest.mark.parametrize("tool_choice", ["required", "add", "get_weather"])
def test_one_call_matches_its_schema(tools_server: Server, tool_choice: str, model: str, sampling: str) -> None:
    choice = tool_choice if tool_choice == "required" else named(tool_choice)
    completion = chat(tools_server, model, tool_choice=choice, parallel_tool_calls=False, **SAMPLINGS[sampling])
    (answer,) = completion.choices
    assert answer.finish_reason == "tool_calls"
    assert answer.message.content is None
    (call,) = answer.message.tool_calls
    assert_valid_call(call, None if tool_choice == "required" else tool_choice)


def test_parallel_calls_are_all_valid_with_unique_ids(tools_server: Server) -> None:
    completion = chat(tools_server, tool_choice="required", temperature=1.2, seed=0, n=4, max_tokens=400)
    calls = [call for choice in completion.choices for call in choice.message.tool_calls]
    assert all(choice.finish_reason == "tool_calls" for choice in completion.choices)
    assert any(len(choice.message.tool_calls) > 1 for choice in completion.choices), "parallel calls were made"
    for call in calls:
        assert_valid_call(call)
    assert len({call.id for call in calls}) == len(calls)


def test_tool_choice_none_makes_no_calls(tools_server: Server) -> None:
    completion = chat(tools_server, "alpha", tool_choice="none", temperature=0, max_tokens=40)
    (answer,) = completion.choices
    assert not answer.message.tool_calls
    assert isinstance(answer.message.content, str)
    assert answer.finish_reason in ("stop", "length")


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("model", ["base", "alpha"])
def test_auto_answers_text_or_valid_calls(tools_server: Server, model: str, sampling: str) -> None:
    (answer,) = chat(tools_server, model, tool_choice="auto", max_tokens=60, **SAMPLINGS[sampling]).choices
    if answer.message.tool_calls:
        assert answer.finish_reason in ("tool_calls", "length")
        for call in answer.message.tool_calls:
            assert_valid_call(call)
    else:
        assert isinstance(answer.message.content, str) and "<tool_call>" not in answer.message.content
        assert answer.finish_reason in ("stop", "length")


# -- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["base", "alpha"])
def test_streamed_call_equals_the_non_streamed_one(tools_server: Server, model: str) -> None:
    request = {"tool_choice": "required", "parallel_tool_calls": False, "temperature": 0}
    (expected,) = chat(tools_server, model, **request).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish_reasons = []
    for chunk in chat(tools_server, model, stream=True, **request):
        for choice in chunk.choices:
            # Accumulated as the openai SDK documents: by index, id and name once, arguments concatenated.
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or delta.id
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    assert list(calls) == [0]
    streamed = calls[0]
    assert streamed["id"]
    assert (streamed["name"], json.loads(streamed["arguments"])) == (
        expected.function.name,
        json.loads(expected.function.arguments),
    )
    assert finish_reasons == ["tool_calls"]


# -- a follow-up turn -------------------------------------------------------------------------


def test_follow_up_turn_carries_the_tool_result(tools_server: Server) -> None:
    (call,) = chat(tools_server, tool_choice=named("get_weather"), temperature=0).choices[0].message.tool_calls
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call.id, "type": "function", "function": call.function.model_dump()}],
    }
    result = "sunny, 21 degrees"
    tool = {"role": "tool", "tool_call_id": call.id, "content": result}
    client = openai_client(tools_server)

    def prompt_tokens(messages: list[dict]) -> int:
        completion = client.chat.completions.create(
            model=tools_server.model_name, messages=messages, tools=TOOLS, max_tokens=2, temperature=0
        )
        return completion.usage.prompt_tokens

    without = prompt_tokens([*MESSAGES, assistant])
    with_result = prompt_tokens([*MESSAGES, assistant, tool])
    tokenizer = AutoTokenizer.from_pretrained(tools_server.model_dir)
    tool_turn = tokenizer.encode(f"<|im_start|>tool\n{result}<|im_end|>\n", add_special_tokens=False)
    assert with_result - without == len(tool_turn)
    # Templates index into a call's arguments: transformers takes them as an object, as the server passes them.
    template_call = {"id": call.id, "type": "function", "function": {"name": call.function.name}}
    template_call["function"]["arguments"] = json.loads(call.function.arguments)
    messages = [*MESSAGES, {**assistant, "tool_calls": [template_call]}, tool]
    rendered = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert result in rendered
    assert with_result == len(tokenizer.encode(rendered))


# -- 422s -------------------------------------------------------------------------------------


def test_named_tool_choice_outside_tools_is_422(tools_server: Server) -> None:
    response = post_chat(tools_server, tools=TOOLS, tool_choice=named("send_email"))
    assert "send_email" in assert_error(response, 422, "invalid_request_error", "tool_choice")


@pytest.mark.parametrize("tool_choice", ["required", named("add")], ids=["required", "named"])
def test_tool_choice_without_tools_is_422(tools_server: Server, tool_choice: Any) -> None:
    response = post_chat(tools_server, tool_choice=tool_choice)
    assert "tools" in assert_error(response, 422, "invalid_request_error", "tool_choice")


def test_duplicate_function_names_are_422(tools_server: Server) -> None:
    response = post_chat(tools_server, tools=[*TOOLS, TOOLS[0]])
    assert "distinct" in assert_error(response, 422, "invalid_request_error", "tools")


def test_assistant_call_arguments_that_are_not_json_are_422(tools_server: Server) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{a: 1"}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    response = post_chat(tools_server, messages=messages, tools=TOOLS)
    message = assert_error(response, 422, "invalid_request_error", "messages")
    assert "call_1" in message and "not JSON" in message


def test_tools_and_response_format_together_are_422(tools_server: Server) -> None:
    response = post_chat(tools_server, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert "one output constraint" in assert_error(response, 422, "invalid_request_error", "tools")


def test_unusable_parameters_schema_is_422(tools_server: Server) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    response = post_chat(tools_server, tools=tools, tool_choice="required")
    assert "objekt" in assert_error(response, 422, "invalid_request_error", "tools[0].function.parameters")
