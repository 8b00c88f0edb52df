"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

``model`` is an adapter id, or the base model's name for no adapter. Unlike TGI, returned text
excludes the stop sequence and special tokens (eos, ``<|im_end|>``), as OpenAI's does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from adapters_store.index import AdapterIndex
from server.api.auth import Principal
from server.api.deps import AdapterIndexDep, EngineDep, PrincipalDep
from server.api.generation import (
    check_finished,
    client_closed_response,
    default_max_new_tokens,
    encode,
    sampling_params,
    sse_response,
    submit,
    wait_for_result,
)
from server.api.routes.responses import ERROR_RESPONSES, stream_responses
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
    Usage,
)
from server.api.tenancy import resolve_blend
from server.engine.engine import Engine
from server.engine.handle import RequestHandle
from server.engine.types import FinishEvent, FinishReason, InvalidRequestError, TokenEvent, UnknownAdapterError

router = APIRouter(prefix="/v1", tags=["OpenAI"], responses=ERROR_RESPONSES)

DONE = "[DONE]"


def _finish_reason(reason: FinishReason) -> OpenAIFinishReason:
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True)
class Piece:
    """A token's share of the returned text (its text, clipped where a stop sequence starts)."""

    token: TokenEvent
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
        self._pending: list[tuple[TokenEvent, int]] = []

    def push(self, token: TokenEvent) -> list[Piece]:
        if token.special:
            return []
        self._pending.append((token, len(self._text)))
        self._text += token.text
        cut = self._cut()
        safe_end = cut if cut < len(self._text) else len(self._text) - self._partial_stop_length()
        released = []
        while self._pending and self._pending[0][1] + len(self._pending[0][0].text) <= safe_end:
            token, offset = self._pending.pop(0)
            released.append(Piece(token, token.text, offset))
        return released

    def finish(self) -> list[Piece]:
        cut = self._cut()
        pending, self._pending = self._pending, []
        return [Piece(token, self._text[offset:cut], offset) for token, offset in pending if offset < cut]

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


def trimmed(tokens: tuple[TokenEvent, ...], stops: list[str]) -> list[Piece]:
    trimmer = StopTrimmer(stops)
    pieces = [piece for token in tokens for piece in trimmer.push(token)]
    return pieces + trimmer.finish()


def _usage(finish: FinishEvent) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.generated_tokens,
        total_tokens=finish.prompt_tokens + finish.generated_tokens,
    )


def _adapters(engine: Engine, body: CompletionRequest | ChatCompletionRequest) -> tuple[dict[str, float], str]:
    """The blend ``model``/``adapters`` ask for, and the field to blame if an adapter is unknown."""
    if body.adapters is not None:
        if body.model != engine.model_name:
            raise InvalidRequestError(
                f"adapters blends adapters of the base model: model must be {engine.model_name!r}", param="adapters"
            )
        return dict(body.adapters), "adapters"
    return ({} if body.model == engine.model_name else {body.model: 1.0}), "model"


def _submit(
    engine: Engine,
    index: AdapterIndex,
    principal: Principal,
    body: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    max_new_tokens: int | None,
    names: dict[str, str],
) -> RequestHandle:
    adapters, adapter_field = _adapters(engine, body)
    temperature = 1.0 if body.temperature is None else body.temperature
    params = sampling_params(
        max_new_tokens=max_new_tokens or default_max_new_tokens(engine, len(prompt_ids)),
        do_sample=temperature > 0,
        temperature=temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        stop=body.stop_list(),
    )
    try:
        adapters = resolve_blend(principal, index, adapters, param=adapter_field)
        return submit(engine, prompt_ids, params, adapters, {**names, "adapter_id": adapter_field})
    except UnknownAdapterError as exc:
        if adapter_field != "model":
            raise
        raise UnknownAdapterError(
            f"model {body.model!r} not found: it is neither the base model {engine.model_name!r} nor a served "
            "adapter (see GET /v1/models)",
            param="model",
        ) from exc


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


# -- /v1/completions ---------------------------------------------------------------------------


def _completion_logprobs(pieces: list[Piece]) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[piece.text for piece in pieces],
        token_logprobs=[piece.token.logprob for piece in pieces],
        text_offset=[piece.offset for piece in pieces],
    )


async def _completion_chunks(body: CompletionRequest, handle: RequestHandle, created: int) -> AsyncIterator[str]:
    trimmer = StopTrimmer(body.stop_list())

    def chunk(pieces: list[Piece], reason: OpenAIFinishReason | None = None) -> str:
        choice = CompletionChoice(
            text="".join(piece.text for piece in pieces),
            finish_reason=reason,
            logprobs=_completion_logprobs(pieces) if body.logprobs is not None else None,
        )
        return Completion(
            id=f"cmpl-{handle.request_id}", created=created, model=body.model, choices=[choice]
        ).model_dump_json()

    async for event in handle.events():
        if isinstance(event, TokenEvent):
            if pieces := trimmer.push(event):
                yield chunk(pieces)
            continue
        finish = check_finished(event)
        yield chunk(trimmer.finish(), _finish_reason(finish.reason))
        if _include_usage(body):
            usage = _usage(finish)
            yield Completion(
                id=f"cmpl-{handle.request_id}", created=created, model=body.model, choices=[], usage=usage
            ).model_dump_json()
    yield DONE


@router.post(
    "/completions",
    response_model=Completion,
    responses=stream_responses("JSON; with `stream: true`, SSE: `data: Completion` chunks, then `data: [DONE]`."),
)
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, index: AdapterIndexDep, principal: PrincipalDep
) -> Completion | JSONResponse | EventSourceResponse:
    prompt_ids = await encode(engine, body.prompt_text())
    names = {"inputs": "prompt", "max_new_tokens": "max_tokens"}
    handle = _submit(engine, index, principal, body, prompt_ids, body.max_tokens, names)
    created = int(time.time())
    if body.stream:
        return sse_response(handle, _completion_chunks(body, handle, created))
    finish = await wait_for_result(handle, request)
    if finish is None:
        return client_closed_response()
    pieces = trimmed(finish.tokens, body.stop_list())
    choice = CompletionChoice(
        text="".join(piece.text for piece in pieces),
        finish_reason=_finish_reason(finish.reason),
        logprobs=_completion_logprobs(pieces) if body.logprobs is not None else None,
    )
    return Completion(
        id=f"cmpl-{handle.request_id}", created=created, model=body.model, choices=[choice], usage=_usage(finish)
    )


# -- /v1/chat/completions ----------------------------------------------------------------------


async def _chat_prompt(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    try:
        text = await run_in_threadpool(
            engine.tokenizer.apply_chat_template, messages, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:
        raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}", param="messages") from exc
    # Templates that write the bos token themselves must not get a second one from encode.
    bos = engine.tokenizer.bos_token
    return await encode(engine, text, add_special_tokens=not (bos and text.startswith(bos)))


def _chat_logprobs(pieces: list[Piece]) -> ChatChoiceLogprobs:
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(token=piece.text, logprob=piece.token.logprob, bytes=list(piece.text.encode()))
            for piece in pieces
        ]
    )


async def _chat_chunks(body: ChatCompletionRequest, handle: RequestHandle, created: int) -> AsyncIterator[str]:
    trimmer = StopTrimmer(body.stop_list())

    def chunk(delta: ChatDelta, pieces: list[Piece], reason: OpenAIFinishReason | None = None) -> str:
        choice = ChatChunkChoice(
            delta=delta, finish_reason=reason, logprobs=_chat_logprobs(pieces) if body.logprobs else None
        )
        return ChatCompletionChunk(
            id=f"chatcmpl-{handle.request_id}", created=created, model=body.model, choices=[choice]
        ).model_dump_json()

    yield chunk(ChatDelta(role="assistant", content=""), [])
    async for event in handle.events():
        if isinstance(event, TokenEvent):
            if pieces := trimmer.push(event):
                yield chunk(ChatDelta(content="".join(piece.text for piece in pieces)), pieces)
            continue
        finish = check_finished(event)
        pieces = trimmer.finish()
        delta = ChatDelta(content="".join(piece.text for piece in pieces)) if pieces else ChatDelta()
        yield chunk(delta, pieces, _finish_reason(finish.reason))
        if _include_usage(body):
            yield ChatCompletionChunk(
                id=f"chatcmpl-{handle.request_id}",
                created=created,
                model=body.model,
                choices=[],
                usage=_usage(finish),
            ).model_dump_json()
    yield DONE


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
    prompt_ids = await _chat_prompt(engine, body)
    limit_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    names = {"inputs": "messages", "max_new_tokens": limit_field}
    handle = _submit(engine, index, principal, body, prompt_ids, body.max_new_tokens(), names)
    created = int(time.time())
    if body.stream:
        return sse_response(handle, _chat_chunks(body, handle, created))
    finish = await wait_for_result(handle, request)
    if finish is None:
        return client_closed_response()
    pieces = trimmed(finish.tokens, body.stop_list())
    choice = ChatChoice(
        message=AssistantMessage(content="".join(piece.text for piece in pieces)),
        finish_reason=_finish_reason(finish.reason),
        logprobs=_chat_logprobs(pieces) if body.logprobs else None,
    )
    return ChatCompletion(
        id=f"chatcmpl-{handle.request_id}",
        created=created,
        model=body.model,
        choices=[choice],
        usage=_usage(finish),
    )


# -- /v1/models --------------------------------------------------------------------------------


@router.get("/models", response_model=ModelList)
async def models(request: Request, engine: EngineDep, principal: PrincipalDep) -> ModelList:
    created: int = request.app.state.created
    base = ModelCard(id=engine.model_name, created=created)
    adapter_ids = await run_in_threadpool(engine.registry.ids, visible_to=principal.visible_namespace)
    adapters = [ModelCard(id=adapter_id, created=created, parent=engine.model_name) for adapter_id in adapter_ids]
    return ModelList(data=[base, *adapters])
