"""Chat messages -> prompt token ids, one way for ``/v1/chat/completions`` and ``/tokenize``.

Shared so that ``/tokenize`` counts exactly the tokens the chat route feeds the model (its
``usage.prompt_tokens``).
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from server.api.generation import encode
from server.api.schemas.openai import ChatMessage
from server.api.schemas.tools import Tool, ToolCall
from server.engine.engine import Engine
from server.engine.types import InvalidRequestError


async def chat_prompt_ids(
    engine: Engine,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    add_special_tokens: bool | None = None,
    tools: list[Tool] | None = None,
) -> list[int]:
    """The model's chat template rendered, then encoded.

    ``add_special_tokens`` None (what the chat route uses) adds the tokenizer's special tokens
    unless the template wrote the bos token itself, so a prompt never gets a second one.
    ``tools`` go to the template as transformers documents them; assistant tool calls carry
    their arguments as objects, which is what templates index into.
    """
    rendered = [_template_message(message) for message in messages]
    tool_definitions = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
    try:
        text = await run_in_threadpool(
            engine.tokenizer.apply_chat_template,
            rendered,
            tools=tool_definitions,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except TemplateError as exc:
        raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}", param="messages") from exc
    if add_special_tokens is None:
        bos = engine.tokenizer.bos_token
        add_special_tokens = not (bos and text.startswith(bos))
    return await encode(engine, text, add_special_tokens=add_special_tokens, param="messages")


def _template_message(message: ChatMessage) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": _arguments(call)}}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"tool call {call.id!r}: function.arguments is not JSON ({exc})", param="messages"
        ) from exc
