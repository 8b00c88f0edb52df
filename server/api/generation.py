"""What both API families do around the engine: tokenise, submit, wait or stream, cancel."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from server.api.errors import error_body, error_response
from server.api.schemas.common import MAX_SEED
from server.engine.engine import Engine
from server.engine.handle import RequestHandle
from server.engine.types import (
    EngineError,
    FinishEvent,
    GenerationRequest,
    Grammar,
    InvalidRequestError,
    SamplingParams,
)
from server.logging_setup import current_request_id
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

# Uvicorn does not cancel a non-streaming endpoint whose client has gone, so the wait polls for it.
DISCONNECT_POLL_SECONDS = 0.25
# Not an HTTP standard code, but the one proxies (nginx) log for "client closed request"; nobody reads it.
CLIENT_CLOSED_STATUS = 499

# uvicorn logs an ERROR for a response the app left unfinished; a stream cut for --stream-write-timeout has
# been logged (one WARNING) already, so that line is dropped for it. Set in the request's own task, which is
# the one uvicorn logs from.
_stream_cut: ContextVar[bool] = ContextVar("stream_cut_for_write_timeout", default=False)
_UVICORN_UNFINISHED = "ASGI callable returned without completing response."


class _CutStreamFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_stream_cut.get() and record.msg == _UVICORN_UNFINISHED)


logging.getLogger("uvicorn.error").addFilter(_CutStreamFilter())


class GenerationInterruptedError(EngineError):
    """The engine ended a request the client did not cancel (an engine failure or shutdown)."""

    status_code = 503
    error_type = "unavailable_error"

    def __init__(self) -> None:
        super().__init__("generation was interrupted by the server (engine failure or shutdown); retry the request")


class RequestTimeoutError(EngineError):
    """The request ran past ``--request-timeout``; it has been cancelled in the engine."""

    status_code = 504
    error_type = "timeout_error"

    def __init__(self, timeout: float) -> None:
        super().__init__(
            f"the request did not finish within the request timeout of {timeout:g} s (--request-timeout) and was "
            "cancelled; ask for fewer tokens or retry later"
        )


def _settings(app: Any) -> ServerSettings:
    settings = getattr(getattr(app, "state", None), "settings", None)
    return settings if isinstance(settings, ServerSettings) else ServerSettings()


def check_finished(finish: FinishEvent) -> FinishEvent:
    if finish.reason == "cancelled":
        raise GenerationInterruptedError()
    return finish


async def encode(engine: Engine, text: str, *, add_special_tokens: bool = True, param: str = "inputs") -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        # JSON escapes can spell a lone surrogate (\ud800), which no tokenizer can encode.
        raise InvalidRequestError(
            f"the text holds an unpaired surrogate (\\u{ord(text[error.start]):04x}), which is not text", param=param
        ) from error
    # Long prompts take real CPU time to tokenise; keep the event loop (and every other stream) moving.
    return await run_in_threadpool(engine.tokenizer.encode, text, add_special_tokens=add_special_tokens)


async def compile_grammar(engine: Engine, grammar: Grammar | None) -> None:
    """Compile (or find cached) a request's grammar in a worker thread; a bad one is a 422 here."""
    if grammar is not None:
        await run_in_threadpool(engine.grammars.compiled, grammar)


def default_max_new_tokens(engine: Engine, prompt_tokens: int) -> int:
    # An omitted limit must not turn a prompt that fits into a 422: cap the default to the room left.
    limits = engine.settings
    room = limits.max_total_tokens - prompt_tokens
    return max(1, min(limits.max_new_tokens_default, limits.max_new_tokens, room))


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
    top_logprobs: int = 0,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    prompt_logprobs: int | None = None,
    grammar: Grammar | None = None,
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
        top_logprobs=top_logprobs,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
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
    """Submit, renaming the engine's ``param`` (its own field names) to the field the client sent.

    An engine message that starts with the engine's field name gets the client's instead.
    """
    # The HTTP request's id (X-Request-Id), so the response ids and every log line about it agree.
    request_id = current_request_id() or uuid.uuid4().hex
    request = GenerationRequest(prompt_ids=prompt_ids, params=params, adapters=adapters, request_id=request_id)
    try:
        return engine.submit(request)
    except EngineError as exc:
        engine_param = exc.param or ""
        exc.param = param_names.get(engine_param, exc.param)
        if engine_param and exc.param and exc.param != engine_param and exc.message.startswith(f"{engine_param} "):
            exc.message = exc.param + exc.message[len(engine_param) :]
        raise


async def wait_for_results(handles: list[RequestHandle], request: Request) -> list[FinishEvent] | None:
    """:func:`wait_for_result` for several requests at once (one per choice); ``None`` if the client left."""
    try:
        results = await asyncio.gather(*(wait_for_result(handle, request) for handle in handles))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    if any(result is None for result in results):
        for handle in handles:
            handle.cancel()
        return None
    return [result for result in results if result is not None]


async def wait_for_result(handle: RequestHandle, request: Request) -> FinishEvent | None:
    """The request's final event, or ``None`` (after cancelling it) if the client disconnects first.

    Raises :class:`RequestTimeoutError` (after cancelling it) past ``--request-timeout``.
    """
    timeout = _settings(request.app).request_timeout
    deadline = time.monotonic() + timeout if timeout else None
    result = asyncio.ensure_future(handle.result())
    try:
        while True:
            wait = DISCONNECT_POLL_SECONDS
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            done, _ = await asyncio.wait({result}, timeout=wait)
            if done:
                return check_finished(result.result())
            if deadline is not None and time.monotonic() >= deadline:
                logger.warning(
                    "request %s ran past --request-timeout (%g s); cancelling it", handle.request_id, timeout
                )
                raise RequestTimeoutError(timeout)
            if await request.is_disconnected():
                logger.info("client disconnected; cancelling request %s", handle.request_id)
                return None
    finally:
        if not result.done():
            handle.cancel()
            result.cancel()


def client_closed_response() -> JSONResponse:
    return error_response("client closed the request", CLIENT_CLOSED_STATUS, error_type="cancelled")


def sse_response(handles: RequestHandle | list[RequestHandle], events: AsyncIterator[str]) -> EventSourceResponse:
    """``events`` as SSE; every one of ``handles`` (one per choice) is cancelled when the stream ends."""
    return GenerationStream(handles if isinstance(handles, list) else [handles], events)


class GenerationStream(EventSourceResponse):
    """An SSE generation stream under ``--request-timeout`` and ``--stream-write-timeout``.

    Both are read from the app's settings when the response starts (``scope["app"]``), so the routes
    need not pass them. A write that waits longer than the write timeout (a client that stopped
    reading) makes sse-starlette close the body iterator, whose ``finally`` cancels the request, and
    raise ``SendTimeoutError``, logged here as one line; uvicorn then closes the connection.
    """

    def __init__(self, handles: list[RequestHandle], events: AsyncIterator[str]) -> None:
        self.handles = handles
        self.handle = handles[0]
        self.request_timeout = 0.0
        super().__init__(self._guarded(events), sep="\n")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = _settings(scope.get("app"))
        self.request_timeout = settings.request_timeout
        self.send_timeout = settings.stream_write_timeout or None
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            _stream_cut.set(True)
            logger.warning(
                "client of request %s stopped reading its stream (a write waited over --stream-write-timeout, "
                "%g s); request cancelled, connection closed",
                self.handle.request_id,
                settings.stream_write_timeout,
            )

    async def _guarded(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Ends the stream with an error event rather than a cut connection, and always releases the row."""
        handle, timeout = self.handle, self.request_timeout
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        try:
            while True:
                # Only the wait for the engine is timed here; a stalled write is the write timeout's.
                timer = asyncio.timeout_at(deadline)
                try:
                    async with timer:
                        event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    if not timer.expired():
                        raise
                    logger.warning(
                        "stream of request %s ran past --request-timeout (%g s); cancelling it",
                        handle.request_id,
                        timeout,
                    )
                    raise RequestTimeoutError(timeout) from exc
                yield event
        except EngineError as exc:
            yield json.dumps(error_body(exc.message, exc.status_code, error_type=exc.error_type, param=exc.param))
        except Exception:
            logger.exception("stream of request %s failed", handle.request_id)
            yield json.dumps(error_body("internal server error", 500))
        finally:
            # Reached on normal completion too (cancel is idempotent), when sse-starlette cancels the
            # generator because the client went away or a write timed out, and past the request
            # timeout: the engine then frees the row within one step.
            for each in self.handles:
                each.cancel()
