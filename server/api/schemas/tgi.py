"""TGI / LoRAX ``/generate`` bodies, as huggingface_hub's ``InferenceClient.text_generation`` parses them.

Unknown parameters are ignored, as TGI does (lorax-client sends every field it knows, mostly null).
Parameters TGI or LoRAX define that change the output but that Spectra does not implement are
declared so that anything but their neutral value is a 422 rather than a silently different result.
``details`` carries both TGI's and LoRAX's prompt length (``input_length``, ``prompt_tokens``):
lorax-client refuses a response without ``prompt_tokens``.
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
    Temperature,
    TopK,
    TopP,
)
from server.api.schemas.structured import ResponseFormat, TgiGrammar

TgiFinishReason = Literal["length", "eos_token", "stop_sequence"]
_UNSUPPORTED = "Not supported by Spectra: only the neutral value (or null) is accepted."


class GenerateParameters(BaseModel):
    adapter_id: str | None = Field(None, description="Adapter to apply; absent, null or empty is the base model.")
    adapters: AdapterBlend | None = Field(None, description="Weighted adapter blend; excludes adapter_id.")
    max_new_tokens: MaxNewTokens | None = Field(None, description="Defaults to the server's max_new_tokens_default.")
    temperature: Temperature | None = Field(None, description="0 means greedy decoding.")
    top_k: TopK | None = Field(None, description="0 disables top-k filtering.")
    top_p: TopP | None = None
    do_sample: bool = Field(
        False,
        description="As in TGI, setting temperature (other than 1), top_k or top_p < 1 also turns sampling on.",
    )
    seed: Seed | None = Field(None, description="Sampling seed; when sampling without one, a random seed is drawn.")
    stop: StopList = Field(default_factory=list, description="Stop sequences; generated_text includes the one hit.")
    repetition_penalty: RepetitionPenalty | None = None
    details: bool = False
    return_full_text: bool = False
    decoder_input_details: bool = Field(
        False, description="With details: the prompt's tokens and their logprobs in details.prefill (first null)."
    )
    best_of: Literal[1] | None = Field(None, description=_UNSUPPORTED)
    watermark: Literal[False] | None = Field(None, description=_UNSUPPORTED)
    truncate: None = Field(None, description=_UNSUPPORTED)
    typical_p: Annotated[float, Field(ge=1, le=1)] | None = Field(None, description=_UNSUPPORTED)
    top_n_tokens: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="The n most likely tokens at each generated position (details.top_tokens)."
    )
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = Field(None, description=_UNSUPPORTED)
    grammar: TgiGrammar | None = Field(None, description="TGI: the output matches this JSON schema or regex.")
    response_format: ResponseFormat | None = Field(
        None, description='LoRAX: {"type": "json_object", "schema": {...}}; excludes grammar.'
    )
    # LoRAX's own parameters (lorax-client sends them all, null or false by default).
    adapter_source: None = Field(None, description="LoRAX: Spectra serves only adapters in its store; send null.")
    merged_adapters: None = Field(None, description="LoRAX: use `adapters` (a weighted blend) instead.")
    api_token: str | None = Field(None, description="LoRAX: ignored; send the key as `Authorization: Bearer`.")
    ignore_eos_token: bool | None = Field(None, description="LoRAX: keep generating past eos, to max_new_tokens.")
    return_k_alternatives: None = Field(None, description=_UNSUPPORTED)

    @field_validator("adapters")
    @classmethod
    def _one_way_to_name_adapters(cls, adapters: dict[str, float] | None, info: ValidationInfo) -> dict | None:
        if adapters is not None and info.data.get("adapter_id"):
            raise ValueError("adapter_id and adapters are mutually exclusive")
        return adapters


class GenerateRequest(BaseModel):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="Only read by POST /, which TGI clients use for both modes.")


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Details(BaseModel):
    """``top_tokens``: per generated token, the ``top_n_tokens`` most likely (empty unless asked for)."""

    finish_reason: TgiFinishReason
    prompt_tokens: int = Field(description="LoRAX's field; TGI has none here.")
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token]
    top_tokens: list[list[Token]] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int = Field(description="TGI's name for the prompt's length.")
    prompt_tokens: int = Field(description="LoRAX's name for the same.")


class StreamResponse(BaseModel):
    """One SSE event per token; the last one also carries ``generated_text`` and ``details``."""

    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None
