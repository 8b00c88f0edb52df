"""``POST /tokenize`` and ``POST /detokenize`` bodies: vLLM's shapes, and TGI's on the same path.

One ``/tokenize`` serves both families because both use that path: a body with ``inputs`` is TGI's
(a list of tokens with character offsets), one with ``prompt`` or ``messages`` is vLLM's (ids and a
count). The key decides, not a trial parse, so a malformed body gets the errors of the shape it
meant rather than of every shape. Unknown fields are ignored, as on the generation routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from server.api.schemas.openai import ChatMessage
from server.api.schemas.tgi import GenerateParameters
from server.api.schemas.tools import Tool

_UNSUPPORTED = "Not supported by Spectra."


class TokenizeCompletionRequest(BaseModel):
    model: str | None = Field(None, description="The base model's name or an adapter id; they share one tokenizer.")
    prompt: str
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (bos).")
    return_token_strs: bool | None = Field(False, description="Also return each token's string (the vocabulary's).")


class TokenizeChatRequest(BaseModel):
    model: str | None = Field(None, description="The base model's name or an adapter id; they share one tokenizer.")
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = Field(True, description="End with the template's assistant turn opener.")
    add_special_tokens: bool | None = Field(
        None,
        description="Null (unlike vLLM's false): exactly as /v1/chat/completions, whose usage.prompt_tokens the "
        "count then equals; true or false: add the tokenizer's special tokens to the rendered template or not.",
    )
    return_token_strs: bool | None = Field(False, description="Also return each token's string (the vocabulary's).")
    continue_final_message: Literal[False] = Field(False, description=_UNSUPPORTED)
    chat_template: None = Field(None, description=_UNSUPPORTED)
    chat_template_kwargs: None = Field(None, description=_UNSUPPORTED)
    tools: Annotated[list[Tool], Field(min_length=1)] | None = Field(
        None,
        description="Rendered by the chat template, as /v1/chat/completions does with tool_choice other than none.",
    )


class TgiTokenizeRequest(BaseModel):
    inputs: str
    parameters: GenerateParameters = Field(
        default_factory=GenerateParameters, description="Accepted as TGI does; tokenizing does not depend on them."
    )
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (bos).")


_SHAPES: dict[str, type[BaseModel]] = {
    "inputs": TgiTokenizeRequest,
    "prompt": TokenizeCompletionRequest,
    "messages": TokenizeChatRequest,
}
_EXPECTED = (
    "the body needs exactly one of: `inputs` (TGI: {inputs, parameters?}), `prompt` (vLLM: {model?, prompt, "
    "add_special_tokens?, return_token_strs?}) or `messages` (vLLM: {model?, messages, add_generation_prompt?, "
    "add_special_tokens?, return_token_strs?})"
)


def _by_key(body: Any, _handler: ValidatorFunctionWrapHandler) -> BaseModel:
    """Validates ``body`` as the one shape whose key it has. Unlike a tagged union this leaves the tag out
    of error locations, so an error names the field as the client wrote it (``messages[0].role``)."""
    keys = [key for key in _SHAPES if isinstance(body, dict) and key in body]
    if len(keys) != 1:
        raise PydanticCustomError("tokenize_body", _EXPECTED)
    return _SHAPES[keys[0]].model_validate(body)


TokenizeRequest = Annotated[
    TgiTokenizeRequest | TokenizeCompletionRequest | TokenizeChatRequest, WrapValidator(_by_key)
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="Prompt plus new tokens a request may have (--max-total-tokens).")
    tokens: list[int]
    token_strs: list[str] | None = None


class SimpleToken(BaseModel):
    """TGI's token: ``inputs[start:stop] == text`` (character offsets; a special token added is empty)."""

    id: int
    text: str
    start: int
    stop: int


class DetokenizeRequest(BaseModel):
    model: str | None = Field(None, description="The base model's name or an adapter id; they share one tokenizer.")
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="The decoded text, special tokens included (as vLLM's).")
