"""TGI / LoRAX generation: ``POST /generate``, ``POST /generate_stream`` and TGI's ``POST /`` (either mode).

``huggingface_hub.InferenceClient(base_url).text_generation`` and lorax-client post to the base URL
itself with a top-level ``stream`` flag, which is why ``/`` exists. As in TGI and LoRAX it answers a
one-element list rather than /generate's object (lorax-client reads ``[0]``; huggingface_hub takes
either). Text follows TGI: ``generated_text`` includes the stop sequence that ended generation, and
token texts include special tokens such as eos.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from adapters_store.interfaces import AdapterCatalog
from server.api.auth import Principal
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
    wait_for_result,
)
from server.api.routes.responses import ERROR_RESPONSES, stream_responses
from server.api.schemas.tgi import (
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.api.structured_outputs import tgi_grammar
from server.api.tenancy import resolve_blend
from server.engine.engine import Engine
from server.engine.handle import RequestHandle
from server.engine.types import FinishEvent, SamplingParams, TokenEvent

router = APIRouter(tags=["TGI / LoRAX"], responses=ERROR_RESPONSES)


def _adapters(parameters: GenerateParameters) -> dict[str, float]:
    if parameters.adapters is not None:
        return dict(parameters.adapters)
    return {parameters.adapter_id: 1.0} if parameters.adapter_id else {}


def _sampling(parameters: GenerateParameters, engine: Engine, prompt_tokens: int) -> SamplingParams:
    temperature = 1.0 if parameters.temperature is None else parameters.temperature
    top_k = parameters.top_k or 0
    top_p = 1.0 if parameters.top_p is None else parameters.top_p
    max_new_tokens = parameters.max_new_tokens or default_max_new_tokens(engine, prompt_tokens)
    return sampling_params(
        max_new_tokens=max_new_tokens,
        # TGI samples whenever a sampling warper is set, even without do_sample; clients rely on it.
        do_sample=parameters.do_sample or temperature != 1.0 or top_k > 0 or top_p < 1.0,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=parameters.repetition_penalty or 1.0,
        seed=parameters.seed,
        stop=parameters.stop,
        top_logprobs=parameters.top_n_tokens or 0,
        ignore_eos=bool(parameters.ignore_eos_token),
        prompt_logprobs=0 if parameters.details and parameters.decoder_input_details else None,
        grammar=tgi_grammar(parameters.grammar, parameters.response_format),
    )


async def _submit(body: GenerateRequest, engine: Engine, index: AdapterCatalog, principal: Principal) -> RequestHandle:
    parameters = body.parameters
    prompt_ids = await encode(engine, body.inputs)
    param_names = {
        "inputs": "inputs",
        "max_new_tokens": "parameters.max_new_tokens",
        "stop": "parameters.stop",
        "adapter_id": "parameters.adapters" if parameters.adapters is not None else "parameters.adapter_id",
    }
    adapters = resolve_blend(principal, index, _adapters(parameters), param=param_names["adapter_id"])
    params = _sampling(parameters, engine, len(prompt_ids))
    await compile_grammar(engine, params.grammar)
    return submit(engine, prompt_ids, params, adapters, param_names)


def _token(event: TokenEvent) -> Token:
    return Token(id=event.token_id, text=event.text, logprob=event.logprob, special=event.special)


def _top_tokens(engine: Engine, event: TokenEvent) -> list[Token]:
    return [
        Token(
            id=token_id, text=engine.tokenizer.decode([token_id]), logprob=logprob, special=engine.is_special(token_id)
        )
        for token_id, logprob in event.top_logprobs
    ]


def _prefill(engine: Engine, finish: FinishEvent) -> list[PrefillToken]:
    return [
        PrefillToken(id=token.token_id, text=engine.tokenizer.decode([token.token_id]), logprob=token.logprob)
        for token in finish.prompt
    ]


def _response(body: GenerateRequest, engine: Engine, finish: FinishEvent) -> GenerateResponse:
    text = body.inputs + finish.text if body.parameters.return_full_text else finish.text
    if not body.parameters.details:
        return GenerateResponse(generated_text=text)
    details = Details(
        finish_reason=finish.reason,
        prompt_tokens=finish.prompt_tokens,
        generated_tokens=finish.generated_tokens,
        seed=finish.seed,
        prefill=_prefill(engine, finish),
        tokens=[_token(event) for event in finish.tokens],
        top_tokens=[_top_tokens(engine, event) for event in finish.tokens] if body.parameters.top_n_tokens else [],
    )
    return GenerateResponse(generated_text=text, details=details)


async def _stream_events(body: GenerateRequest, engine: Engine, handle: RequestHandle) -> AsyncIterator[str]:
    """TGI's last event is the last token plus ``generated_text`` and ``details``, so each token is held
    until the next engine event says whether it was the last (the engine sends both in the same step)."""
    pending: TokenEvent | None = None
    index = 0  # TGI numbers events from 1
    async for event in handle.events():
        if isinstance(event, TokenEvent):
            if pending is not None:
                index += 1
                top = _top_tokens(engine, pending)
                yield StreamResponse(index=index, token=_token(pending), top_tokens=top).model_dump_json()
            pending = event
            continue
        finish = check_finished(event)
        if pending is None:  # the engine always emits a token before finishing normally
            raise RuntimeError(f"request {handle.request_id} finished without tokens")
        details = StreamDetails(
            finish_reason=finish.reason,
            generated_tokens=finish.generated_tokens,
            seed=finish.seed,
            input_length=finish.prompt_tokens,
            prompt_tokens=finish.prompt_tokens,
        )
        text = body.inputs + finish.text if body.parameters.return_full_text else finish.text
        final = StreamResponse(
            index=index + 1,
            token=_token(pending),
            top_tokens=_top_tokens(engine, pending),
            generated_text=text,
            details=details,
        )
        yield final.model_dump_json()


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest, request: Request, engine: EngineDep, index: AdapterIndexDep, principal: PrincipalDep
) -> GenerateResponse | JSONResponse:
    handle = await _submit(body, engine, index, principal)
    finish = await wait_for_result(handle, request)
    if finish is None:
        return client_closed_response()
    return _response(body, engine, finish)


@router.post(
    "/generate_stream",
    response_class=EventSourceResponse,
    responses=stream_responses("SSE: one `data: StreamResponse` event per generated token."),
)
async def generate_stream(
    body: GenerateRequest, engine: EngineDep, index: AdapterIndexDep, principal: PrincipalDep
) -> EventSourceResponse:
    # Submitting before the response starts makes a bad request an ordinary JSON error, not a stream event.
    handle = await _submit(body, engine, index, principal)
    return sse_response(handle, _stream_events(body, engine, handle))


@router.post(
    "/",
    response_model=list[GenerateResponse],
    summary="TGI compatibility route: generate or stream",
    responses=stream_responses(
        "JSON: a list of one GenerateResponse; with `stream: true`, the SSE events of /generate_stream."
    ),
)
async def compat_generate(
    body: GenerateRequest, request: Request, engine: EngineDep, index: AdapterIndexDep, principal: PrincipalDep
) -> list[GenerateResponse] | JSONResponse | EventSourceResponse:
    if body.stream:
        return await generate_stream(body, engine, index, principal)
    response = await generate(body, request, engine, index, principal)
    return [response] if isinstance(response, GenerateResponse) else response
