"""``POST /tokenize`` (vLLM's and TGI's shapes) and ``POST /detokenize`` (vLLM's), with the served tokenizer.

Adapters change weights, never the tokenizer, so ``model`` only has to name something servable
(the base model or an adapter the caller may see, as on /v1/completions). Tokenizing runs in the
threadpool, as it does for generation: a long prompt must not stall the streams on the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from adapters_store.interfaces import AdapterCatalog
from server.api.auth import Principal
from server.api.chat_prompt import chat_prompt_ids
from server.api.deps import AdapterIndexDep, EngineDep, PrincipalDep
from server.api.generation import encode
from server.api.routes.responses import ERROR_RESPONSES
from server.api.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    SimpleToken,
    TgiTokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.tenancy import visible_adapter
from server.engine.engine import Engine
from server.engine.types import InvalidRequestError, UnknownAdapterError

router = APIRouter(tags=["Tokenization"], responses=ERROR_RESPONSES)


def _check_model(engine: Engine, index: AdapterCatalog, principal: Principal, model: str | None) -> None:
    if model is None or model == engine.model_name:
        return
    try:
        visible_adapter(principal, index, model, param="model")
    except UnknownAdapterError as exc:
        raise UnknownAdapterError(
            f"model {model!r} not found: it is neither the base model {engine.model_name!r} nor a served adapter "
            "(see GET /v1/models)",
            param="model",
        ) from exc


async def _tgi_tokens(engine: Engine, body: TgiTokenizeRequest) -> list[SimpleToken]:
    if not engine.tokenizer.is_fast:
        raise InvalidRequestError(
            "this model's tokenizer cannot map tokens to character offsets (it is not a fast tokenizer); "
            "send vLLM's {prompt} body instead",
            param="inputs",
        )
    encoding = await run_in_threadpool(
        engine.tokenizer, body.inputs, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True
    )
    return [
        SimpleToken(id=token_id, text=body.inputs[start:stop], start=start, stop=stop)
        for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]


@router.post(
    "/tokenize",
    response_model=TokenizeResponse | list[SimpleToken],
    summary="Tokenize: vLLM's {prompt} or {messages}, or TGI's {inputs}",
    response_description="vLLM's bodies: TokenizeResponse; TGI's: a list of SimpleToken.",
)
async def tokenize(
    body: TokenizeRequest, engine: EngineDep, index: AdapterIndexDep, principal: PrincipalDep
) -> TokenizeResponse | list[SimpleToken]:
    if isinstance(body, TgiTokenizeRequest):
        return await _tgi_tokens(engine, body)
    _check_model(engine, index, principal, body.model)
    if isinstance(body, TokenizeChatRequest):
        ids = await chat_prompt_ids(
            engine,
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            add_special_tokens=body.add_special_tokens,
            tools=body.tools,
        )
    else:
        ids = await encode(engine, body.prompt, add_special_tokens=body.add_special_tokens)
    strs = await run_in_threadpool(engine.tokenizer.convert_ids_to_tokens, ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.settings.max_total_tokens, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    body: DetokenizeRequest, engine: EngineDep, index: AdapterIndexDep, principal: PrincipalDep
) -> DetokenizeResponse:
    _check_model(engine, index, principal, body.model)
    vocab_size = len(engine.tokenizer)
    for position, token_id in enumerate(body.tokens):
        if token_id >= vocab_size:
            raise InvalidRequestError(
                f"tokens[{position}]: {token_id} is not a token id of this model's tokenizer (0 to {vocab_size - 1})",
                param=f"tokens[{position}]",
            )
    return DetokenizeResponse(prompt=await run_in_threadpool(engine.tokenizer.decode, body.tokens))
