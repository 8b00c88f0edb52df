"""Server settings: one validated object built from CLI flags (each also an environment variable)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class ServerSettings(BaseModel):
    model: str | None = Field(None, description="HF model directory or hub id; None = the embedded default model")
    served_model_name: str | None = None
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_batch_size: int = Field(32, ge=1)
    max_input_tokens: int = Field(1024, ge=1)
    max_total_tokens: int = Field(2048, ge=2)
    max_queue: int = Field(256, ge=1)
    max_new_tokens_default: int = Field(64, ge=1)
    prefill_token_budget: int = Field(512, ge=1)
    adapters: dict[str, Path] = Field(default_factory=dict)
    log_level: str = "info"
