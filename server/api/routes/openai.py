"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

``model`` is an adapter id, or the base model's name for no adapter. Unlike TGI, returned text
excludes the stop sequence and special tokens (eos, ``<|im_end|>``), as OpenAI's does.

Each prompt x choice (``n``, or ``best_of``) is one engine request; they run in the same
continuous batch. With ``echo`` and ``logprobs`` the prompt's tokens are scored in the prefill
(``SamplingParams.prompt_logprobs``), which is what lm-evaluation-harness's log-likelihood
tasks read. ``top_logprobs`` dicts hold the k most likely tokens plus the chosen one, as vLLM's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from adapters_store.interfaces import AdapterCatalog
from server.api.auth import Principal
from server.api.chat_prompt import chat_prompt_ids
from server.api.deps import AdapterIndexDep, EngineDep, PrincipalDep
from server.api.generation import (
    check_finished,
    client_closed_response,
    compile_grammar,
    default_max_new_tokens,
    encode,
    sampling_params,
    sse_response,
    submit,
    wait_for_results,
)
from server.api.routes.responses import ERROR_RESPONSES, stream_responses
from server.api.schemas.common import MAX_SEED
from server.api.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIFinishReason,
    TopLogprob,
    Usage,
)
from server.api.schemas.tools import FunctionCallDelta, ToolCall, ToolCallDelta
from server.api.structured_outputs import json_schema_grammar, only_one, request_grammar
from server.api.tenancy import resolve_blend
from server.api.tool_calls import ToolCallStream, check_tools, parse_tool_calls, tool_grammar
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine
from server.engine.handle import RequestHandle
from server.engine.types import (
    FinishEvent,
    FinishReason,
    Grammar,
    InvalidRequestError,
    PromptToken,
    SamplingParams,
    TokenEvent,
    UnknownAdapterError,
)

router = APIRouter(prefix="/v1", tags=["OpenAI"], responses=ERROR_RESPONSES)

DONE = "[DONE]"


def _finish_reason(reason: FinishReason) -> OpenAIFinishReason:
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True)
class Piece:
    """A token's share of the returned text (its text, clipped where a stop sequence starts). ``token`` is
    ``None`` for text the detokeniser held back to the end (an incomplete UTF-8 character)."""

    token: TokenEvent | None
    text: str
    offset: int


class StopTrimmer:
    """Turns engine tokens into OpenAI text: special tokens dropped, text cut where the first stop begins.

    Text that could be the start of a stop sequence is held back until it is known not to be, so a
    stream never sends text that the final answer then leaves out.
    """

    def __init__(self, stops: list[str]):
        self._stops = stops
        self._text = ""
        self._pending: list[tuple[TokenEvent | None, int, str]] = []

    def push(self, token: TokenEvent) -> list[Piece]:
        if token.special:
            return []
        self._add(token, token.text)
        cut = self._cut()
        safe_end = cut if cut < len(self._text) else len(self._text) - self._partial_stop_length()
        released = []
        while self._pending and self._pending[0][1] + len(self._pending[0][2]) <= safe_end:
            token_or_none, offset, text = self._pending.pop(0)
            released.append(Piece(token_or_none, text, offset))
        return released

    def finish(self, held_back: str = "") -> list[Piece]:
        """The rest, with ``FinishEvent.held_back`` (text no token event carried) at the end."""
        if held_back:
            self._add(None, held_back)
        cut = self._cut()
        pending, self._pending = self._pending, []
        return [
            Piece(token, self._text[offset:cut][: len(text)], offset) for token, offset, text in pending if offset < cut
        ]

    def _add(self, token: TokenEvent | None, text: str) -> None:
        self._pending.append((token, len(self._text), text))
        self._text += text

    def _cut(self) -> int:
        found = [index for index in (self._text.find(stop) for stop in self._stops) if index >= 0]
        return min(found, default=len(self._text))

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def trimmed(finish: FinishEvent, stops: list[str]) -> list[Piece]:
    trimmer = StopTrimmer(stops)
    pieces = [piece for token in finish.tokens for piece in trimmer.push(token)]
    return pieces + trimmer.finish(finish.held_back)


def _usage(prompt_tokens: int, finishes: list[FinishEvent], hidden_tokens: int = 0) -> Usage:
    """Prompt tokens count once per prompt (as OpenAI counts them), completion tokens per choice."""
    completion = sum(finish.generated_tokens for finish in finishes) - hidden_tokens
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _adapters(engine: Engine, body: CompletionRequest | ChatCompletionRequest) -> tuple[dict[str, float], str]:
    """The blend ``model``/``adapters`` ask for, and the field to blame if an adapter is unknown."""
    if body.adapters is not None:
        if body.model != engine.model_name:
            raise InvalidRequestError(
                f"adapters blends adapters of the base model: model must be {engine.model_name!r}", param="adapters"
            )
        return dict(body.adapters), "adapters"
    return ({} if body.model == engine.model_name else {body.model: 1.0}), "model"


def _base_params(
    engine: Engine,
    body: CompletionRequest | ChatCompletionRequest,
    prompt_tokens: int,
    max_new_tokens: int | None,
    **extensions,
) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    return sampling_params(
        max_new_tokens=max_new_tokens or default_max_new_tokens(engine, prompt_tokens),
        do_sample=temperature > 0,
        temperature=temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        stop=body.stop_list(),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        **extensions,
    )


def _choice_params(
    params: SamplingParams, choice: int, body: CompletionRequest | ChatCompletionRequest
) -> SamplingParams:
    """Choice ``choice`` of a prompt: its own seed, so ``n`` sampled choices differ (and replay with ``seed``)."""
    if choice == 0 or params.greedy:
        return params
    seed = (body.seed + choice) % (MAX_SEED + 1) if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    return dataclasses.replace(params, seed=seed)


def _submit_all(
    engine: Engine,
    index: AdapterCatalog,
    principal: Principal,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[tuple[list[int], SamplingParams]],
    per_prompt: int,
    names: dict[str, str],
) -> list[RequestHandle]:
    """One engine request per prompt and choice, in that order; all or none are queued."""
    adapters, adapter_field = _adapters(engine, body)
    try:
        adapters = resolve_blend(principal, index, adapters, param=adapter_field)
    except UnknownAdapterError as exc:
        if adapter_field != "model":
            raise
        raise UnknownAdapterError(
            f"model {body.model!r} not found: it is neither the base model {engine.model_name!r} nor a served "
            "adapter (see GET /v1/models)",
            param="model",
        ) from exc
    handles: list[RequestHandle] = []
    try:
        for prompt_ids, params in prompts:
            for choice in range(per_prompt):
                handles.append(
                    submit(
                        engine,
                        prompt_ids,
                        _choice_params(params, choice, body),
                        adapters,
                        {**names, "adapter_id": adapter_field},
                    )
                )
    except Exception:
        for handle in handles:
            handle.cancel()
        raise
    return handles


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _merged(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The chunks of several choices' streams as they come (each chunk names its choice's index)."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield chunk
        return
    queue: asyncio.Queue[tuple[int, str | Exception | None]] = asyncio.Queue()

    async def pump(position: int, stream: AsyncIterator[str]) -> None:
        try:
            async for chunk in stream:
                await queue.put((position, chunk))
            await queue.put((position, None))
        except Exception as error:  # handed to the consumer, which raises it in the response's task
            await queue.put((position, error))

    tasks = [asyncio.create_task(pump(position, stream)) for position, stream in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            _, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


# -- /v1/completions ---------------------------------------------------------------------------


class _TokenTexts:
    """Token strings for logprobs, as OpenAI writes them: the token's text, or ``bytes:\\xe2\\x80`` for a
    token that is only part of a UTF-8 character (so distinct tokens keep distinct keys)."""

    def __init__(self, engine: Engine):
        self.bytes = engine.token_bytes

    def __call__(self, token_id: int) -> str:
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)

    def alternatives(self, chosen: tuple[int, float | None], top: tuple[tuple[int, float], ...]) -> dict[str, float]:
        """The top alternatives plus the chosen token; tokens with the same string keep the likeliest."""
        token_id, logprob = chosen
        entries: dict[str, float] = {}
        for alternative, value in (*top, *([(token_id, logprob)] if logprob is not None else [])):
            key = self(alternative)
            entries[key] = max(value, entries.get(key, value))
        return entries


def _prompt_widths(engine: Engine, ids: list[int], *, special_text: bool) -> list[int]:
    """How many characters of the echoed prompt each token accounts for: a string prompt is echoed as sent,
    so the special tokens encoding added (bos) take none; token ids are echoed decoded, special tokens too."""
    stream = IncrementalDetokenizer(engine.tokenizer)
    widths = []
    for token_id in ids:
        if engine.is_special(token_id):
            widths.append(len(engine.tokenizer.decode([token_id])) if special_text else 0)
        else:
            widths.append(len(stream.step(token_id)))
    return widths


@dataclass
class _CompletionLogprobsBuilder:
    """Accumulates one choice's logprobs; offsets count from the start of the choice's text."""

    texts: _TokenTexts
    with_top: bool
    logprobs: CompletionLogprobs = dataclasses.field(
        default_factory=lambda: CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    )
    offset: int = 0

    def prompt(self, tokens: tuple[PromptToken, ...], widths: list[int]) -> None:
        for token, width in zip(tokens, widths, strict=True):
            top = None
            if token.logprob is not None:
                top = self.texts.alternatives((token.token_id, token.logprob), token.top_logprobs)
            self._add(self.texts(token.token_id), token.logprob, top, width)

    def generated(self, pieces: list[Piece]) -> None:
        """Token strings as in ``top_logprobs`` (each id decoded alone); offsets follow the returned text."""
        for piece in pieces:
            if piece.token is None:
                self.offset += len(piece.text)
                continue
            top = self.texts.alternatives((piece.token.token_id, piece.token.logprob), piece.token.top_logprobs)
            self._add(self.texts(piece.token.token_id), piece.token.logprob, top, len(piece.text))

    def _add(self, text: str, logprob: float | None, top: dict[str, float] | None, width: int) -> None:
        self.logprobs.tokens.append(text)
        self.logprobs.token_logprobs.append(logprob)
        assert self.logprobs.top_logprobs is not None
        self.logprobs.top_logprobs.append(top if self.with_top else None)
        self.logprobs.text_offset.append(self.offset)
        self.offset += width

    def result(self) -> CompletionLogprobs:
        if not self.with_top:
            self.logprobs.top_logprobs = None
        return self.logprobs


@dataclass(frozen=True)
class _Prompt:
    text: str
    ids: list[int]
    from_text: bool  # sent as a string (echoed as sent) rather than as token ids (echoed decoded)


async def _prompts(engine: Engine, body: CompletionRequest) -> list[_Prompt]:
    vocab = len(engine.tokenizer)
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            prompts.append(_Prompt(prompt, await encode(engine, prompt, param="prompt"), from_text=True))
            continue
        if any(token >= vocab for token in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab - 1}]", param="prompt")
        prompts.append(_Prompt(await run_in_threadpool(engine.tokenizer.decode, prompt), prompt, from_text=False))
    return prompts


def _completion_choice(
    body: CompletionRequest, engine: Engine, prompt: _Prompt, finish: FinishEvent, index: int
) -> CompletionChoice:
    pieces = [] if body.max_tokens == 0 else trimmed(finish, body.stop_list())
    text = "".join(piece.text for piece in pieces)
    logprobs = None
    if body.logprobs is not None:
        builder = _CompletionLogprobsBuilder(_TokenTexts(engine), with_top=body.logprobs > 0)
        if body.echo:
            builder.prompt(finish.prompt, _prompt_widths(engine, prompt.ids, special_text=not prompt.from_text))
            builder.offset = len(prompt.text)
        builder.generated(pieces)
        logprobs = builder.result()
    return CompletionChoice(
        index=index,
        text=(prompt.text + text) if body.echo else text,
        finish_reason="length" if body.max_tokens == 0 else _finish_reason(finish.reason),
        logprobs=logprobs,
    )


def _best(finishes: list[FinishEvent], keep: int) -> list[FinishEvent]:
    """best_of: the ``keep`` choices with the highest mean token logprob, in that order."""

    def mean_logprob(finish: FinishEvent) -> float:
        return sum(token.logprob for token in finish.tokens) / max(1, len(finish.tokens))

    return sorted(finishes, key=mean_logprob, reverse=True)[:keep]


async def _completion_chunks(
    body: CompletionRequest,
    engine: Engine,
    prompt: _Prompt,
    handle: RequestHandle,
    index: int,
    created: int,
    finishes: list[FinishEvent],
) -> AsyncIterator[str]:
    """One choice's chunks; the echoed prompt (and its logprobs) comes with the first."""
    trimmer = StopTrimmer(body.stop_list())
    texts = _TokenTexts(engine)
    generating = body.max_tokens != 0
    echo_pending = body.echo
    offset = 0

    def chunk(
        pieces: list[Piece], reason: OpenAIFinishReason | None = None, scored: tuple[PromptToken, ...] = ()
    ) -> str:
        nonlocal offset, echo_pending
        prefix = prompt.text if echo_pending else ""
        logprobs = None
        if body.logprobs is not None:
            builder = _CompletionLogprobsBuilder(texts, with_top=body.logprobs > 0, offset=offset)
            if echo_pending:
                builder.prompt(scored, _prompt_widths(engine, prompt.ids, special_text=not prompt.from_text))
                builder.offset = offset + len(prompt.text)
            builder.generated(pieces)
            offset = builder.offset
            logprobs = builder.result()
        echo_pending = False
        choice = CompletionChoice(
            index=index, text=prefix + "".join(piece.text for piece in pieces), finish_reason=reason, logprobs=logprobs
        )
        return Completion(
            id=f"cmpl-{handle.request_id}", created=created, model=body.model, choices=[choice]
        ).model_dump_json()

    async for event in handle.events():
        if isinstance(event, TokenEvent):
            pieces = trimmer.push(event) if generating else []
            if pieces or echo_pending:
                yield chunk(pieces, scored=event.prompt)
            continue
        finish = check_finished(event)
        finishes.append(finish)
        rest = trimmer.finish(finish.held_back) if generating else []
        yield chunk(rest, _finish_reason(finish.reason) if generating else "length")


@router.post(
    "/completions",
    response_model=Completion,
    responses=stream_responses("JSON; with `stream: true`, SSE: `data: Completion` chunks, then `data: [DONE]`."),
)
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, index: AdapterIndexDep, principal: PrincipalDep
) -> Completion | JSONResponse | EventSourceResponse:
    prompts = await _prompts(engine, body)
    grammar = request_grammar(body, body.response_format)
    per_prompt = body.best_of or body.n
    scored = body.echo and body.logprobs is not None
    # max_tokens 0 scores the prompt only: the engine still makes one token, which is not returned.
    max_new_tokens = 1 if body.max_tokens == 0 else body.max_tokens
    submissions = [
        (
            prompt.ids,
            _base_params(
                engine,
                body,
                len(prompt.ids),
                max_new_tokens,
                top_logprobs=body.logprobs or 0,
                prompt_logprobs=body.logprobs if scored else None,
                grammar=grammar,
            ),
        )
        for prompt in prompts
    ]
    names = {"inputs": "prompt", "max_new_tokens": "max_tokens"}
    await compile_grammar(engine, grammar)
    handles = _submit_all(engine, index, principal, body, submissions, per_prompt, names)
    created = int(time.time())
    prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
    hidden = len(handles) if body.max_tokens == 0 else 0
    if body.stream:
        return sse_response(handles, _completion_stream(body, engine, prompts, handles, created, prompt_tokens, hidden))
    finishes = await wait_for_results(handles, request)
    if finishes is None:
        return client_closed_response()
    choices = []
    for position, prompt in enumerate(prompts):
        chosen = finishes[position * per_prompt : (position + 1) * per_prompt]
        if per_prompt > body.n:
            chosen = _best(chosen, body.n)
        for offset, finish in enumerate(chosen):
            choices.append(_completion_choice(body, engine, prompt, finish, position * body.n + offset))
    return Completion(
        id=f"cmpl-{handles[0].request_id}",
        created=created,
        model=body.model,
        choices=choices,
        usage=_usage(prompt_tokens, finishes, hidden),
    )


async def _completion_stream(
    body: CompletionRequest,
    engine: Engine,
    prompts: list[_Prompt],
    handles: list[RequestHandle],
    created: int,
    prompt_tokens: int,
    hidden: int,
) -> AsyncIterator[str]:
    finishes: list[FinishEvent] = []
    streams = [
        _completion_chunks(body, engine, prompts[position // body.n], handle, position, created, finishes)
        for position, handle in enumerate(handles)
    ]
    async for chunk in _merged(streams):
        yield chunk
    if _include_usage(body):
        usage = _usage(prompt_tokens, finishes, hidden)
        yield Completion(
            id=f"cmpl-{handles[0].request_id}", created=created, model=body.model, choices=[], usage=usage
        ).model_dump_json()
    yield DONE


# -- /v1/chat/completions ----------------------------------------------------------------------


def _chat_logprobs(engine: Engine, pieces: list[Piece]) -> ChatChoiceLogprobs:
    texts = _TokenTexts(engine)

    def alternative(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=texts(token_id), logprob=logprob, bytes=list(texts.bytes(token_id)))

    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=texts(piece.token.token_id),
                logprob=piece.token.logprob,
                bytes=list(texts.bytes(piece.token.token_id)),
                top_logprobs=[alternative(token_id, logprob) for token_id, logprob in piece.token.top_logprobs],
            )
            for piece in pieces
            if piece.token is not None
        ]
    )


@dataclass(frozen=True)
class _ChatPlan:
    """What a chat body asks of the engine beyond sampling: its prompt, constraint and tool mode."""

    prompt_ids: list[int]
    grammar: Grammar | None
    tools_active: bool


async def _chat_plan(engine: Engine, body: ChatCompletionRequest) -> _ChatPlan:
    """Tools are rendered whenever given (as vLLM does, so ``none`` only stops the calls); each tool's
    parameters schema is checked on its own first, so a bad one is a 422 that names it."""
    check_tools(body.tools, body.tool_choice)
    choice = body.effective_tool_choice()
    for position, tool in enumerate(body.tools or []):
        schema = json_schema_grammar(tool.function.parameters, f"tools[{position}].function.parameters")
        await compile_grammar(engine, schema)
    prompt_ids = await chat_prompt_ids(engine, body.messages, tools=body.tools)
    grammars = [request_grammar(body, body.response_format)]
    tools_active = bool(body.tools) and choice != "none"
    if body.tools and tools_active:
        grammars.append(tool_grammar(body.tools, choice, body.parallel_tool_calls))
    return _ChatPlan(prompt_ids, only_one([grammar for grammar in grammars if grammar is not None]), tools_active)


def _chat_choice(
    body: ChatCompletionRequest, engine: Engine, plan: _ChatPlan, finish: FinishEvent, index: int
) -> ChatChoice:
    pieces = trimmed(finish, body.stop_list())
    text = "".join(piece.text for piece in pieces)
    reason = _finish_reason(finish.reason)
    message = AssistantMessage(content=text)
    if plan.tools_active:
        parsed = parse_tool_calls(text)
        message = AssistantMessage(content=parsed.content, tool_calls=parsed.tool_calls)
        if parsed.tool_calls and reason == "stop":
            reason = "tool_calls"
    return ChatChoice(
        index=index,
        message=message,
        finish_reason=reason,
        logprobs=_chat_logprobs(engine, pieces) if body.logprobs else None,
    )


def _call_deltas(calls: list[ToolCall], first_index: int) -> list[ToolCallDelta]:
    return [
        ToolCallDelta(
            index=first_index + offset,
            id=call.id,
            type="function",
            function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
        )
        for offset, call in enumerate(calls)
    ]


async def _chat_chunks(
    body: ChatCompletionRequest,
    engine: Engine,
    plan: _ChatPlan,
    handle: RequestHandle,
    index: int,
    created: int,
    finishes: list[FinishEvent],
) -> AsyncIterator[str]:
    trimmer = StopTrimmer(body.stop_list())
    calls = ToolCallStream() if plan.tools_active else None
    sent_calls = 0

    def chunk(delta: ChatDelta, pieces: list[Piece], reason: OpenAIFinishReason | None = None) -> str:
        choice = ChatChunkChoice(
            index=index,
            delta=delta,
            finish_reason=reason,
            logprobs=_chat_logprobs(engine, pieces) if body.logprobs and pieces else None,
        )
        return ChatCompletionChunk(
            id=f"chatcmpl-{handle.request_id}", created=created, model=body.model, choices=[choice]
        ).model_dump_json()

    def delta(pieces: list[Piece], *, last: bool = False) -> ChatDelta:
        nonlocal sent_calls
        text = "".join(piece.text for piece in pieces)
        if calls is None:
            return ChatDelta(content=text or None)
        content, closed = calls.push(text)
        if last:
            content += calls.finish()
        deltas = _call_deltas(closed, sent_calls) or None
        sent_calls += len(closed)
        return ChatDelta(content=content or None, tool_calls=deltas)

    yield chunk(ChatDelta(role="assistant", content=""), [])
    async for event in handle.events():
        if isinstance(event, TokenEvent):
            if pieces := trimmer.push(event):
                update = delta(pieces)
                if update.content is not None or update.tool_calls is not None or body.logprobs:
                    yield chunk(update, pieces)
            continue
        finish = check_finished(event)
        finishes.append(finish)
        pieces = trimmer.finish(finish.held_back)
        reason = _finish_reason(finish.reason)
        update = delta(pieces, last=True)
        if sent_calls and reason == "stop":
            reason = "tool_calls"
        yield chunk(update, pieces, reason)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=stream_responses(
        "JSON; with `stream: true`, SSE: `data: ChatCompletionChunk` chunks, then `data: [DONE]`."
    ),
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, index: AdapterIndexDep, principal: PrincipalDep
) -> ChatCompletion | JSONResponse | EventSourceResponse:
    plan = await _chat_plan(engine, body)
    limit_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    names = {"inputs": "messages", "max_new_tokens": limit_field}
    params = _base_params(
        engine,
        body,
        len(plan.prompt_ids),
        body.max_new_tokens(),
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
        grammar=plan.grammar,
    )
    await compile_grammar(engine, plan.grammar)
    handles = _submit_all(engine, index, principal, body, [(plan.prompt_ids, params)], body.n, names)
    created = int(time.time())
    prompt_tokens = len(plan.prompt_ids)
    if body.stream:
        return sse_response(handles, _chat_stream(body, engine, plan, handles, created, prompt_tokens))
    finishes = await wait_for_results(handles, request)
    if finishes is None:
        return client_closed_response()
    return ChatCompletion(
        id=f"chatcmpl-{handles[0].request_id}",
        created=created,
        model=body.model,
        choices=[_chat_choice(body, engine, plan, finish, position) for position, finish in enumerate(finishes)],
        usage=_usage(prompt_tokens, finishes),
    )


async def _chat_stream(
    body: ChatCompletionRequest,
    engine: Engine,
    plan: _ChatPlan,
    handles: list[RequestHandle],
    created: int,
    prompt_tokens: int,
) -> AsyncIterator[str]:
    finishes: list[FinishEvent] = []
    streams = [
        _chat_chunks(body, engine, plan, handle, position, created, finishes) for position, handle in enumerate(handles)
    ]
    async for chunk in _merged(streams):
        yield chunk
    if _include_usage(body):
        yield ChatCompletionChunk(
            id=f"chatcmpl-{handles[0].request_id}",
            created=created,
            model=body.model,
            choices=[],
            usage=_usage(prompt_tokens, finishes),
        ).model_dump_json()
    yield DONE


# -- /v1/models --------------------------------------------------------------------------------


@router.get("/models", response_model=ModelList)
async def models(request: Request, engine: EngineDep, principal: PrincipalDep) -> ModelList:
    created: int = request.app.state.created
    limit = engine.settings.max_total_tokens
    base = ModelCard(id=engine.model_name, created=created, root=engine.runner.model_path, max_model_len=limit)
    adapter_ids = await run_in_threadpool(engine.registry.ids, visible_to=principal.visible_namespace)
    adapters = [
        ModelCard(id=adapter_id, created=created, root=adapter_id, parent=engine.model_name, max_model_len=limit)
        for adapter_id in adapter_ids
    ]
    return ModelList(data=[base, *adapters])
