"""Tool calls in chat: the grammar that makes every call parse, and the parser that reads calls back.

The tools go to the model through its chat template (``apply_chat_template(tools=...)``); the
model answers a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes
convention that Qwen and many fine-tunes share, and that the embedded template renders). With
``tool_choice`` other than ``none`` the output is constrained:

- ``auto``: free text, or text followed by calls; once ``<tool_call>`` is written, the call must be a
  known tool's name with arguments matching its JSON schema;
- ``required``: one or more calls and nothing else; a named function: exactly that one call.

``parallel_tool_calls: false`` allows one call. Whatever the model, the arguments therefore always
parse and match their schema; a call cut off by ``max_tokens`` is not reported (finish_reason
``length``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from server.api.schemas.tools import FunctionCall, NamedToolChoice, Tool, ToolCall, ToolChoice
from server.engine.types import Grammar, InvalidRequestError

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


def _envelope(tool: Tool) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_grammar(tools: list[Tool], choice: ToolChoice, parallel: bool) -> Grammar | None:
    """The constraint for ``tool_choice``; ``None`` for ``none``."""
    if choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        named = [tool for tool in tools if tool.function.name == choice.function.name]
        if not named:
            raise InvalidRequestError(
                f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice"
            )
        tools, parallel = named, False
    schema = _envelope(tools[0]) if len(tools) == 1 else {"anyOf": [_envelope(tool) for tool in tools]}
    # Compact JSON, as in response_format: whitespace would let a model spend its budget on indentation.
    schema["x-guidance"] = {"whitespace_flexible": False}
    more = f'("\\n{OPEN}" body)*' if parallel else ""
    rules = [
        f"calls: body {more}",
        f'body: %json {json.dumps(schema)} "{CLOSE}"',
    ]
    if choice == "auto":
        # A lazy lexeme that ends where the model writes the opening tag; plain text never contains it.
        rules += [
            "start: TEXT | head calls",
            f'head[stop="{OPEN}"]: /(?s:.*)/',
            f"TEXT: /(?s:.*)/ & ~/(?s:.*{re.escape(OPEN)}.*)/",
        ]
    else:
        rules.append(f'start: "{OPEN}" calls')
    return Grammar("lark", "\n".join(rules), param="tools")


def check_tools(tools: list[Tool] | None, choice: ToolChoice | None) -> None:
    if tools:
        names = [tool.function.name for tool in tools]
        if len(set(names)) < len(names):
            raise InvalidRequestError("tools must have distinct function names", param="tools")
    elif choice not in (None, "none"):
        raise InvalidRequestError("tool_choice requires tools", param="tool_choice")


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def new_call(name: str, arguments: object) -> ToolCall:
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=json.dumps(arguments))
    )


def _call(body: str) -> ToolCall | None:
    try:
        document = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("name"), str):
        return None
    return new_call(document["name"], document.get("arguments", {}))


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split a finished answer into its text before the first call and its complete calls."""
    start = text.find(OPEN)
    if start < 0:
        return ParsedOutput(text, [])
    calls = [call for match in _CALL.finditer(text, start) if (call := _call(match.group(1))) is not None]
    content = text[:start].strip()
    return ParsedOutput(content or None, calls)


class ToolCallStream:
    """Incremental :func:`parse_tool_calls`: text is released as content until a call may begin (text
    that could be the start of ``<tool_call>`` is held back), and each call once it is closed."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_calls = False

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        if not self._in_calls:
            start = self._buffer.find(OPEN)
            if start < 0:
                cut = len(self._buffer) - _partial_prefix(self._buffer, OPEN)
                released, self._buffer = self._buffer[:cut], self._buffer[cut:]
                return released, []
            released, self._buffer = self._buffer[:start], self._buffer[start:]
            self._in_calls = True
            return released, self._closed_calls()
        return "", self._closed_calls()

    def finish(self) -> str:
        """Text left over at the end: a held-back prefix that never became a call (calls cut off are dropped)."""
        rest, self._buffer = ("" if self._in_calls else self._buffer), ""
        return rest

    @property
    def saw_calls(self) -> bool:
        return self._in_calls

    def _closed_calls(self) -> list[ToolCall]:
        calls = []
        while (match := _CALL.search(self._buffer)) is not None:
            if (call := _call(match.group(1))) is not None:
                calls.append(call)
            self._buffer = self._buffer[match.end() :]
        return calls


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
