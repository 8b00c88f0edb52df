"""Constrained field types shared by both API families, the error body, health and info."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Seeds go to torch.Generator.manual_seed; keeping them in int64 also keeps them exact in any JSON client.
MAX_SEED = 2**63 - 1

# How many stop sequences, and how long, is a server setting (--max-stop-sequences, --max-stop-chars) checked by
# the engine at submit; the request body limit (--max-request-bytes) is what bounds parsing.
StopSequence = Annotated[str, StringConstraints(min_length=1)]
StopList = list[StopSequence]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0)]
RepetitionPenalty = Annotated[float, Field(gt=0, allow_inf_nan=False)]
MaxNewTokens = Annotated[int, Field(ge=1)]
AdapterId = Annotated[str, StringConstraints(min_length=1)]
BlendWeight = Annotated[float, Field(allow_inf_nan=False)]
AdapterBlend = Annotated[
    dict[AdapterId, BlendWeight],
    Field(description="Weighted blend of adapters, e.g. {'a': 0.7, 'b': 0.3}; {} is the base model."),
]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class InfoResponse(BaseModel):
    """What the engine reports; only the keys clients poll are pinned, the rest passes through."""

    model_config = ConfigDict(extra="allow")

    model_id: str
    version: str
    running_requests: int
    queued_requests: int
