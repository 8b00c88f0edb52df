"""Server settings: one validated object built from CLI flags (each also an environment variable)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, Field, SecretStr

from server.logging_setup import LogFormat

EndpointAuth = Literal["open", "keyed"]


class ServerSettings(BaseModel):
    model: str | None = Field(None, description="HF model directory or hub id; None = the embedded default model")
    served_model_name: str | None = None
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_batch_size: int = Field(32, ge=1)
    max_input_tokens: int = Field(1024, ge=1, description="most prompt tokens a request may have (422 beyond)")
    max_total_tokens: int = Field(2048, ge=2, description="most prompt + new tokens a request may ask for (422 beyond)")
    max_queue: int = Field(256, ge=1, description="requests waiting for a batch row; more get 429 with Retry-After")
    max_new_tokens: int = Field(1024, ge=1, description="largest max_new_tokens / max_tokens a request may ask for")
    max_new_tokens_default: int = Field(
        64, ge=1, description="max_new_tokens of a request that sets none (capped by the limits above)"
    )
    max_stop_sequences: int = Field(4, ge=0, description="most stop sequences a request may send (422 beyond)")
    max_stop_chars: int = Field(100, ge=1, description="longest stop sequence a request may send, in characters")
    max_blend_adapters: int = Field(8, ge=1, description="most adapters one request may blend (422 beyond)")
    max_request_bytes: ByteSize = Field(
        ByteSize(4 << 20), ge=1, description="largest JSON request body (generation, jobs...); 413 beyond"
    )
    request_timeout: float = Field(
        600.0, ge=0, description="seconds a generation may take before it is cancelled (504); 0 = no limit"
    )
    stream_write_timeout: float = Field(
        30.0, ge=0, description="seconds one SSE write may wait on a client that stops reading; 0 = no limit"
    )
    prefill_token_budget: int = Field(512, ge=1)
    adapters: dict[str, Path] = Field(default_factory=dict, description="NAME=PATH adapters stored at start")
    adapter_memory: ByteSize = Field(ByteSize(3 << 30), description="bank bytes for resident adapters (LRU beyond)")
    max_adapter_bytes: ByteSize = Field(ByteSize(64 << 20), description="largest adapter upload accepted")
    max_training_file_bytes: ByteSize = Field(ByteSize(100 << 20), description="largest training file accepted")
    import_root: Path | None = Field(None, description="directory /v1/load_lora_adapter may read from; None = off")
    max_concurrent_jobs: int = Field(1, ge=1, description="fine-tuning jobs training at once; the rest queue")
    finetune_micro_batch_tokens: int = Field(
        2048, ge=16, description="padded tokens per training micro-step (the longest pause a step puts on serving)"
    )
    training_share: float = Field(0.3, gt=0, le=1, description="most engine time training takes while serving")
    metrics_adapter_labels: int = Field(
        100,
        ge=0,
        description="adapter ids with their own label in spectra_adapter_requests_total; later ones: __other__",
    )
    torch_threads: int = Field(0, ge=0, description="intra-op CPU threads for the model; 0 = CPU cores - 1 (min 1)")
    log_level: str = "info"
    log_format: LogFormat = Field("text", description="text lines, or one JSON object per line for collectors")
    api_keys_file: Path | None = Field(None, description="TOML keys file (docs/security.md); re-read when it changes")
    api_key: SecretStr | None = Field(None, description="one admin key (namespace 'default'), from SPECTRA_API_KEY")
    allow_unauthenticated: bool = Field(
        False, description="serve without API keys on a non-loopback address (otherwise refused at start)"
    )
    health_auth: EndpointAuth = Field("open", description="/health: open, or keyed (any valid key)")
    metrics_auth: EndpointAuth = Field("open", description="/metrics: open, or keyed (a key with the admin scope)")
    max_concurrent_requests_per_key: int = Field(
        64, ge=1, description="requests one key may have in flight (429 beyond); a key's own limit overrides it"
    )
