"""The engine's public contract: what the API layer submits and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled"]
GrammarKind = Literal["json_schema", "regex", "choice", "lark"]


class EngineError(Exception):
    """Base of the errors the engine raises before a request starts; ``status_code`` is the HTTP one."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(EngineError):
    status_code = 422


class UnknownAdapterError(EngineError):
    status_code = 404
    error_type = "not_found_error"


class QueueFullError(EngineError):
    status_code = 429
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after_seconds: int = 1):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class EngineStoppedError(EngineError):
    status_code = 503
    error_type = "unavailable_error"


@dataclass(frozen=True)
class Grammar:
    """What a row's text must match (``grammar.py``): ``value`` is a JSON schema as JSON text, a regex,
    a JSON list of choice strings, or a Lark (or GBNF) grammar; ``param`` is the request field that
    errors name."""

    kind: GrammarKind
    value: str
    param: str = "response_format"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; defaults give greedy decoding.

    ``min_tokens``: eos cannot be chosen, and stop sequences do not end the request, before this
    many tokens. ``ignore_eos``: eos does not end the request (benchmark clients send it so every
    request generates exactly ``max_new_tokens``). ``prompt_logprobs``: when not ``None``, the
    prefill also scores every prompt token, with that many alternatives each. ``grammar``: the
    text must match it (constrained decoding).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    min_tokens: int = 0
    ignore_eos: bool = False
    prompt_logprobs: int | None = None
    grammar: Grammar | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """``adapters`` maps adapter ids to blend weights: ``{}`` is the base model, ``{"a": 1.0}`` one adapter."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapters: dict[str, float] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class PromptToken:
    """One prompt token as the model scored it: ``logprob`` is ``None`` for the first (nothing
    predicts it); ``top_logprobs`` as in :class:`TokenEvent`."""

    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; ``top_logprobs`` holds the ``SamplingParams.top_logprobs`` most likely
    ``(token_id, logprob)`` alternatives at its position, most likely first. The first token of a
    request that asked for ``prompt_logprobs`` carries them in ``prompt``."""

    token_id: int
    text: str
    logprob: float
    special: bool
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt: tuple[PromptToken, ...] = ()


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    text: str
    prompt_tokens: int
    tokens: tuple[TokenEvent, ...]
    seed: int | None
    prompt: tuple[PromptToken, ...] = ()
    # Text of the last tokens that no TokenEvent carried: bytes of a UTF-8 character left incomplete at the end.
    held_back: str = ""

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)
