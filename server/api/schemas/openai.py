"""OpenAI ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` bodies.

``model`` names an adapter, or the base model for none. Unknown fields are ignored (as vLLM does),
so clients that send extra OpenAI fields keep working; fields that would change the result and
that Spectra cannot honour (``logit_bias``, ``suffix``) are declared and rejected with 422.
``presence_penalty``/``frequency_penalty`` are accepted and ignored: many clients send them on every
call, usually as 0. ``top_k``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos`` and the
structured-output fields are vLLM's extensions; ``adapters`` is Spectra's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

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
from server.api.schemas.structured import GuidedFields, ResponseFormat
from server.api.schemas.tools import Tool, ToolCall, ToolCallDelta, ToolChoice

OpenAIFinishReason = Literal["stop", "length", "tool_calls"]
# Choices per request (prompts x best_of) are engine requests; the queue limit (--max-queue) bounds them too.
MAX_PROMPTS = 256
MAX_CHOICES = 16
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
_IGNORED_PENALTY = "Accepted for compatibility and ignored."


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(GuidedFields):
    model: str = Field(description="An adapter id, or the base model's name for no adapter.")
    adapters: AdapterBlend | None = Field(None, description="Extension: adapter blend; model must be the base model.")
    temperature: Annotated[Temperature, Field(le=2)] | None = Field(None, description="Default 1; 0 is greedy.")
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="Extension (as in vLLM); 0 disables top-k filtering.")
    repetition_penalty: RepetitionPenalty | None = Field(None, description="Extension (as in vLLM).")
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = Field(1, description="Choices per prompt.")
    stop: StopSequence | StopList | None = Field(None, description="Excluded from the returned text.")
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = Field(None, description=_IGNORED_PENALTY)
    frequency_penalty: Penalty | None = Field(None, description=_IGNORED_PENALTY)
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="Not supported.")
    user: str | None = Field(None, description="Accepted and ignored.")
    min_tokens: Annotated[int, Field(ge=0)] = Field(0, description="vLLM: no eos or stop sequence before this many.")
    ignore_eos: bool = Field(False, description="vLLM: keep generating past eos, up to max_tokens.")
    response_format: ResponseFormat | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="A string, a list of strings, a list of token ids or a list of token-id lists.")
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Defaults to the server's max_new_tokens_default; 0 (with echo) only scores the prompt."
    )
    logprobs: TopLogprobs | None = Field(
        None, description="Return each token's logprob and its `logprobs` most likely alternatives (top_logprobs)."
    )
    echo: bool = Field(False, description="Prepend the prompt to the text (and its tokens to logprobs).")
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = Field(
        None, description="Generate best_of per prompt and return the n with the highest mean token logprob."
    )
    suffix: None = Field(None, description="Not supported.")

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of > n cannot be streamed (the best are known only at the end)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (0 is only meaningful with echo, to score the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description="Accepted and ignored.")
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")

    @model_validator(mode="after")
    def _content_where_needed(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxNewTokens | None = Field(None, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: MaxNewTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = Field(None, description="Alternatives per token; needs logprobs: true.")
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    tool_choice: ToolChoice | None = Field(None, description="Default: auto with tools, none without.")
    parallel_tool_calls: bool = Field(True, description="false: at most one call.")

    @field_validator("max_completion_tokens")
    @classmethod
    def _consistent_limits(cls, value: int | None, info: ValidationInfo) -> int | None:
        legacy = info.data.get("max_tokens")
        if value is not None and legacy is not None and legacy != value:
            raise ValueError("max_tokens and max_completion_tokens disagree; send only max_completion_tokens")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """With echo, the prompt's tokens come first; its first token has no logprob (``null``)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
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
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


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
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=lambda value: value is None)


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
    """vLLM's card: ``root`` and ``parent`` tell the base model (no parent) from its adapters."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spectra"
    root: str = Field(description="Base model: the path it was loaded from; adapter: its id.")
    parent: str | None = Field(None, description="Adapter: the base model's name; base model: null.")
    max_model_len: int = Field(description="Prompt plus new tokens a request may have (--max-total-tokens).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
