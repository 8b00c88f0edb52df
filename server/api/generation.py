"""What both API families do around the engine: tokenise, submit, wait or stream, cancel."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from server.api.errors import error_body, error_response
from server.api.request_id import current_request_id
from server.api.schemas.common import MAX_SEED
from server.engine.engine import Engine, RequestHandle
from server.engine.types import EngineError, FinishEvent, GenerationRequest, SamplingParams

logger = logging.getLogger(__name__)

# Uvicorn does not cancel a non-streaming endpoint whose client has gone, so the wait polls for it.
DISCONNECT_POLL_SECONDS = 0.25
# Not an HTTP standard code, but the one proxies (nginx) log for "client closed request"; nobody reads it.
CLIENT_CLOSED_STATUS = 499


class GenerationInterruptedError(EngineError):
    """The engine ended a request the client did not cancel (an engine failure or shutdown)."""

    status_code = 503
    error_type = "unavailable_error"

    def __init__(self) -> None:
        super().__init__("generation was interrupted by the server (engine failure or shutdown); retry the request")


def check_finished(finish: FinishEvent) -> FinishEvent:
    if finish.reason == "cancelled":
        raise GenerationInterruptedError()
    return finish


async def encode(engine: Engine, text: str, *, add_special_tokens: bool = True) -> list[int]:
    # Long prompts take real CPU time to tokenise; keep the event loop (and every other stream) moving.
    return await run_in_threadpool(engine.tokenizer.encode, text, add_special_tokens=add_special_tokens)


def default_max_new_tokens(engine: Engine, prompt_tokens: int) -> int:
    # An omitted limit must not turn a prompt that fits into a 422: cap the default to the room left.
    room = engine.limits.max_total_tokens - prompt_tokens
    return max(1, min(engine.limits.max_new_tokens_default, room))


def sampling_params(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
    stop: list[str],
) -> SamplingParams:
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop),
    )
    if params.greedy or seed is not None:
        return params
    # The engine seeds an unseeded sampler with a fixed value, so every unseeded request would draw the
    # same text; draw a seed per request as TGI does (it is reported back in details.seed).
    return dataclasses.replace(params, seed=secrets.randbelow(MAX_SEED + 1))


def submit(
    engine: Engine,
    prompt_ids: list[int],
    params: SamplingParams,
    adapters: dict[str, float],
    param_names: Mapping[str, str],
) -> RequestHandle:
    """Submit, renaming the engine's ``param`` (its own field names) to the field the client sent."""
    # The HTTP request's id (X-Request-Id), so the response ids and every log line about it agree.
    request_id = current_request_id() or uuid.uuid4().hex
    request = GenerationRequest(prompt_ids=prompt_ids, params=params, adapters=adapters, request_id=request_id)
    try:
        return engine.submit(request)
    except EngineError as exc:
        exc.param = param_names.get(exc.param or "", exc.param)
        raise


async def wait_for_result(handle: RequestHandle, request: Request) -> FinishEvent | None:
    """The request's final event, or ``None`` (after cancelling it) if the client disconnects first."""
    result = asyncio.ensure_future(handle.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return check_finished(result.result())
            if await request.is_disconnected():
                logger.info("client disconnected; cancelling request %s", handle.request_id)
                return None
    finally:
        if not result.done():
            handle.cancel()
            result.cancel()


def client_closed_response() -> JSONResponse:
    return error_response("client closed the request", CLIENT_CLOSED_STATUS, error_type="cancelled")


def sse_response(handle: RequestHandle, events: AsyncIterator[str]) -> EventSourceResponse:
    return EventSourceResponse(_guarded(handle, events), sep="\n")


async def _guarded(handle: RequestHandle, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends the stream with an error event rather than a cut connection, and always releases the row."""
    try:
        async for event in events:
            yield event
    except EngineError as exc:
        yield json.dumps(error_body(exc.message, exc.status_code, error_type=exc.error_type, param=exc.param))
    except Exception:
        logger.exception("stream of request %s failed", handle.request_id)
        yield json.dumps(error_body("internal server error", 500))
    finally:
        # Reached on normal completion too (cancel is idempotent), and when sse-starlette cancels the
        # generator because the client went away: the engine then frees the row within one step.
        handle.cancel()
