"""Fine-tuning JSONL: every line checked, every valid line tokenised exactly as serving would see it.

A line is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content", "weight"?}, ...]}``
(OpenAI's chat format); extra keys are ignored and blank lines skipped. All lines are checked
before anything is rejected, so one 422 lists every problem (up to ``max_errors`` of them).

Token layout (``loss_mask[i]`` is True when token ``i`` is a training target, predicted from the
tokens before it; position 0 never is, since nothing precedes it):

- prompt/completion: ``encode(prompt)`` with special tokens (the bos ``/generate`` adds), then
  ``encode(completion)`` without, then eos. Trained: the completion and the eos.
- messages: for each assistant message ``i`` with weight 1, ``prefix = template(messages[:i],
  add_generation_prompt=True)`` is context and ``template(messages[:i + 1])[len(prefix):]`` the
  trained segment. The first context piece is encoded as ``/v1/chat/completions`` encodes a
  prompt (bos unless the template wrote it); later pieces and segments without special tokens.
  A segment is trained through its last end token (``end_token_ids``: eos and, for the embedded
  model, ``<|im_end|>``), because generation stops there and never produces what the template
  writes after it (the ``\\n`` after ``<|im_end|>``), which stays as untrained context for the
  next turn. A segment without an end token gets eos appended and trained.
- An example ends at its last trained token: what follows would train nothing.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from jinja2.exceptions import TemplateError

ROLES = ("system", "user", "assistant")
PREFIX_PROBLEM = "the chat template does not render messages as a prefix of the conversation"
_REPR_CHARS = 40


@dataclass(frozen=True)
class TrainingExample:
    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str


class TrainingFileError(ValueError):
    """The file as a whole is rejected: ``errors`` holds the first invalid lines (none for a file-level problem)."""

    status_code = 422

    def __init__(self, message: str, errors: list[LineError] | None = None, total_errors: int = 0):
        super().__init__(message)
        self.message = message
        self.errors = errors or []
        self.total_errors = total_errors

    @classmethod
    def from_lines(cls, errors: list[LineError], total_errors: int) -> TrainingFileError:
        listed = "; ".join(f"line {error.line}: {error.reason}" for error in errors)
        more = f"; ... and {total_errors - len(errors)} more" if total_errors > len(errors) else ""
        plural = "line" if total_errors == 1 else "lines"
        return cls(f"training file has {total_errors} invalid {plural}: {listed}{more}", errors, total_errors)


class _InvalidLineError(Exception):
    """Why one line is not a training example; becomes a :class:`LineError` with the line's number."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."


def _string(container: dict[str, Any], key: str, name: str) -> str:
    if key not in container:
        raise _InvalidLineError(f"missing field {name!r}")
    value = container[key]
    if not isinstance(value, str):
        raise _InvalidLineError(f"field {name!r} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        # JSON escapes can spell a lone surrogate (\ud800), which no tokenizer can encode.
        raise _InvalidLineError(
            f"field {name!r} holds an unpaired surrogate (\\u{ord(value[error.start]):04x}), which is not text"
        ) from error
    return value


def _no_constant(name: str) -> NoReturn:
    raise _InvalidLineError(f"invalid JSON ({name} is not a JSON value)")


class _Tokenizer:
    """The parts of a Hugging Face tokenizer the layout needs, with the end tokens resolved once."""

    def __init__(self, tokenizer: Any, end_token_ids: Collection[int] | None):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.end_ids = {self.eos, *(end_token_ids or ())}
        self.bos = tokenizer.bos_token

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        if self.tokenizer.chat_template is None:
            raise _InvalidLineError("the model has no chat template; use prompt/completion lines")
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        # transformers raises ValueError for an empty conversation (a trained assistant message first).
        except (TemplateError, ValueError) as error:
            raise _InvalidLineError(f"the chat template rejected the messages: {error}") from error


def _example(ids: list[int], mask: list[bool]) -> TrainingExample:
    end = max(index for index, trained in enumerate(mask) if trained) + 1
    # Nothing precedes the first token, so no prediction of it exists to train (a tokenizer without bos).
    mask[0] = False
    return TrainingExample(tuple(ids[:end]), tuple(mask[:end]))


def _prompt_completion(line: dict[str, Any], tokens: _Tokenizer) -> TrainingExample:
    prompt = _string(line, "prompt", "prompt")
    completion = _string(line, "completion", "completion")
    if not completion.strip():
        raise _InvalidLineError("empty completion")
    prompt_ids = tokens.encode(prompt, add_special_tokens=True)
    completion_ids = [*tokens.encode(completion, add_special_tokens=False), tokens.eos]
    return _example(prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids))


def _messages(value: Any) -> tuple[list[dict[str, str]], list[int]]:
    """The messages as the template sees them (role and content only) and the indices to train on."""
    if not isinstance(value, list):
        raise _InvalidLineError("field 'messages' must be a list")
    if not value:
        raise _InvalidLineError("empty messages")
    messages, trained = [], []
    for index, message in enumerate(value):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _InvalidLineError(f"{name} must be a JSON object")
        role = _string(message, "role", f"{name}.role")
        if role not in ROLES:
            raise _InvalidLineError(f"unknown role {_short(role)} in {name} (expected system, user or assistant)")
        content = _string(message, "content", f"{name}.content")
        weight = message.get("weight", 1)
        if "weight" in message and role != "assistant":
            raise _InvalidLineError(f"{name}.weight is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _InvalidLineError(f"field '{name}.weight' must be 0 or 1")
        if role == "assistant" and weight == 1:
            if not content.strip():
                raise _InvalidLineError(f"empty completion in {name}.content")
            trained.append(index)
        messages.append({"role": role, "content": content})
    if not trained:
        raise _InvalidLineError("no assistant message to train on")
    return messages, trained


def _chat(line: dict[str, Any], tokens: _Tokenizer) -> TrainingExample:
    messages, trained = _messages(line["messages"])
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for index in trained:
        prefix = tokens.render(messages[:index], add_generation_prompt=True)
        full = tokens.render(messages[: index + 1], add_generation_prompt=False)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise _InvalidLineError(PREFIX_PROBLEM)
        context = prefix[len(rendered) :]
        # The first piece is a prompt as /v1/chat/completions encodes one: bos unless the template wrote it.
        bos = not rendered and not (tokens.bos and context.startswith(tokens.bos))
        context_ids = tokens.encode(context, add_special_tokens=bos)
        segment = tokens.encode(full[len(prefix) :], add_special_tokens=False)
        ends = [position for position, token in enumerate(segment) if token in tokens.end_ids]
        if ends:
            trained_length = ends[-1] + 1
        else:
            segment.append(tokens.eos)
            trained_length = len(segment)
        ids += context_ids + segment
        mask += [False] * len(context_ids) + [True] * trained_length + [False] * (len(segment) - trained_length)
        rendered = full
    return _example(ids, mask)


def _parse_line(text: str, tokens: _Tokenizer) -> TrainingExample:
    try:
        # Python's json reads NaN and Infinity, which JSON does not have: refused like any other syntax error.
        line = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise _InvalidLineError(f"invalid JSON ({error.msg} at column {error.colno})") from error
    except RecursionError as error:
        raise _InvalidLineError("invalid JSON (nested too deeply)") from error
    except ValueError as error:  # an integer over sys.get_int_max_str_digits() digits
        raise _InvalidLineError("invalid JSON (a number has too many digits)") from error
    if not isinstance(line, dict):
        raise _InvalidLineError("not a JSON object")
    chat = "messages" in line
    completion = "prompt" in line or "completion" in line
    if chat and completion:
        raise _InvalidLineError("both 'messages' and 'prompt'/'completion'; a line is one or the other")
    if chat:
        return _chat(line, tokens)
    if completion:
        return _prompt_completion(line, tokens)
    raise _InvalidLineError("neither 'prompt'/'completion' nor 'messages'")


def _lines(data: bytes) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each non-blank line; split on ``\\n`` only, as JSON strings may hold U+2028."""
    try:
        text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise TrainingFileError(f"the training file is not UTF-8 text (invalid byte at line {line})") from error
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def _scan(
    data: bytes, tokenizer: Any, *, max_tokens: int, max_errors: int, end_token_ids: Collection[int] | None
) -> Iterator[TrainingExample]:
    """The valid examples in order (none once a line failed); raises when the file is done if any line failed."""
    tokens = _Tokenizer(tokenizer, end_token_ids)
    errors: list[LineError] = []
    total_errors = examples = 0
    for number, text in _lines(data):
        try:
            example = _parse_line(text, tokens)
            if example.n_tokens > max_tokens:
                raise _InvalidLineError(f"{example.n_tokens} tokens; the limit is {max_tokens}")
        except _InvalidLineError as problem:
            total_errors += 1
            if len(errors) < max_errors:
                errors.append(LineError(number, str(problem)))
            continue
        examples += 1
        if not total_errors:
            yield example
    if total_errors:
        raise TrainingFileError.from_lines(errors, total_errors)
    if not examples:
        raise TrainingFileError("the training file has no examples (it is empty or only blank lines)")


def parse_training_file(
    data: bytes,
    tokenizer: Any,
    *,
    max_tokens: int,
    max_errors: int = 20,
    end_token_ids: Collection[int] | None = None,
) -> list[TrainingExample]:
    """Every example of a fine-tuning JSONL file, or :class:`TrainingFileError` listing the invalid lines.

    ``end_token_ids`` are the tokens generation stops at (the engine's ``runner.eos_token_ids``);
    the tokenizer's eos is always one of them.
    """
    return list(_scan(data, tokenizer, max_tokens=max_tokens, max_errors=max_errors, end_token_ids=end_token_ids))


def count_training_examples(
    data: bytes,
    tokenizer: Any,
    *,
    max_tokens: int,
    max_errors: int = 20,
    end_token_ids: Collection[int] | None = None,
) -> int:
    """:func:`parse_training_file`'s checks without keeping the tokens (an upload holds one example at a time)."""
    scan = _scan(data, tokenizer, max_tokens=max_tokens, max_errors=max_errors, end_token_ids=end_token_ids)
    return sum(1 for _ in scan)
