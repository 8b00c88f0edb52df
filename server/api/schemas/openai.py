"""OpenAI ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` bodies.

``model`` names an adapter, or the base model for none. Unknown fields are ignored (as vLLM does),
so clients that send extra OpenAI fields keep working; fields that would change the result and
that Spectra cannot honour (``n`` > 1, ``echo``, ``tools``, ...) are declared and rejected with 422.
``presence_penalty``/``frequency_penalty`` are accepted and ignored: many clients send them on every
call, usually as 0. ``top_k``/``repetition_penalty`` (as in vLLM) and ``adapters`` are extensions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from server.api.schemas.common import (
    AdapterBlend,
    MaxNewTokens,
    RepetitionPenalty,
    Seed,
    StopList,
    StopSequence,
    Temperature,
    TopK,
    TopP,
)

OpenAIFinishReason = Literal["stop", "length"]
Penalty = Annotated[float, Field(ge=-2, le=2)]
_IGNORED_PENALTY = "Accepted for compatibility and ignored."


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model: str = Field(description="An adapter id, or the base model's name for no adapter.")
    adapters: AdapterBlend | None = Field(None, description="Extension: adapter blend; model must be the base model.")
    temperature: Annotated[Temperature, Field(le=2)] | None = Field(None, description="Default 1; 0 is greedy.")
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="Extension (as in vLLM); 0 disables top-k filtering.")
    repetition_penalty: RepetitionPenalty | None = Field(None, description="Extension (as in vLLM).")
    n: Literal[1] = Field(1, description="Only one choice per request.")
    stop: StopSequence | StopList | None = Field(None, description="Excluded from the returned text.")
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = Field(None, description=_IGNORED_PENALTY)
    frequency_penalty: Penalty | None = Field(None, description=_IGNORED_PENALTY)
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="Not supported.")
    user: str | None = Field(None, description="Accepted and ignored.")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="One prompt: a string or a list holding one string."
    )
    max_tokens: MaxNewTokens | None = Field(None, description="Defaults to the server's max_new_tokens_default.")
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = Field(
        None, description="Return the sampled tokens' logprobs; alternatives are not computed (top_logprobs null)."
    )
    echo: Literal[False] = Field(False, description="Not supported.")
    best_of: Literal[1] | None = Field(None, description="Not supported.")
    suffix: None = Field(None, description="Not supported.")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, description="Accepted and ignored.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxNewTokens | None = Field(None, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: MaxNewTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="Accepted and ignored: alternatives are not computed (top_logprobs is [])."
    )
    tools: None = Field(None, description="Not supported.")
    tool_choice: None = Field(None, description="Not supported.")
    response_format: ResponseFormat | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _consistent_limits(cls, value: int | None, info: ValidationInfo) -> int | None:
        legacy = info.data.get("max_tokens")
        if value is not None and legacy is not None and legacy != value:
            raise ValueError("max_tokens and max_completion_tokens disagree; send only max_completion_tokens")
        return value

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A whole completion, or (``stream: true``) one chunk of it: OpenAI uses one object type for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: OpenAIFinishReason
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """OpenAI omits unset delta fields (the final chunk's delta is ``{}``)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=lambda value: value is None)
    content: str | None = Field(None, exclude_if=lambda value: value is None)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: OpenAIFinishReason | None = None
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spectra"
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
