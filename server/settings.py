"""Every server setting, declared once: name, type, default, constraint, help and ``SPECTRA_*`` variable.

``ServerSettings`` is the single source of truth. ``spectra serve``'s options (clients/cli.py), the
limits the engine and the job manager read, ``/info``'s ``limits`` and the README's configuration
table (``python -m server.settings``, checked by tests/test_settings.py) are all derived from it.
A field's ``json_schema_extra`` says how it is shown: ``limit`` puts it in ``/info``'s ``limits``,
``flag``/``metavar`` override the option's name, ``secret`` hides its value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.logging_setup import LogFormat

EndpointAuth = Literal["open", "keyed"]
ENV_PREFIX = "SPECTRA_"
LIMIT = {"limit": True}
SECRET = {"secret": True}
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True)

    model: str | None = Field(
        None, description="HF model directory or hub id; unset: the embedded tiny Llama, generated into --data-dir"
    )
    served_model_name: str | None = Field(
        None, description="the base model's name in /v1/models and responses; unset: the model directory's name"
    )
    data_dir: Path = Field("./data", description="models, adapters, training files and jobs")
    store: str | None = Field(
        None,
        description="the store shared by replicas: a PostgreSQL database (docs/store.md) holding adapters, "
        "training files and jobs; unset: the embedded store in --data-dir",
        json_schema_extra={"metavar": "postgresql://USER@HOST:PORT/DB"},
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=1, le=65535, description="port to listen on")
    replicas: int | None = Field(
        None,
        ge=1,
        description="run N replicas behind Ray Serve's HAProxy front on --host:--port, routed by adapter "
        "(docs/deployment.md); needs --store; unset: one process",
        json_schema_extra={"metavar": "N"},
    )
    ray_address: str | None = Field(
        None,
        description="with --replicas: the Ray cluster to join (HOST:PORT); unset: a local one bound to 127.0.0.1, "
        "stopped with the server",
        json_schema_extra={"metavar": "HOST:PORT"},
    )
    cpus_per_replica: float = Field(
        0,
        ge=0,
        description="with --replicas: Ray CPUs each replica reserves, which also sets its torch threads; "
        "0 = the machine's cores / --replicas (min 1)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model weights' dtype; auto: bfloat16 on CUDA, float32 on CPU"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N; auto: CUDA when there is one")
    max_batch_size: int = Field(32, ge=1, description="rows decoded together in one forward", json_schema_extra=LIMIT)
    max_input_tokens: int = Field(
        1024, ge=1, description="prompt tokens a request may have (422 beyond)", json_schema_extra=LIMIT
    )
    max_total_tokens: int = Field(
        2048, ge=2, description="prompt + new tokens a request may ask for (422 beyond)", json_schema_extra=LIMIT
    )
    max_new_tokens: int = Field(
        1024,
        ge=1,
        description="largest max_new_tokens / max_tokens / max_completion_tokens a request may ask for (422 beyond)",
        json_schema_extra=LIMIT,
    )
    max_new_tokens_default: int = Field(
        64,
        ge=1,
        description="max_new_tokens of a request that sets none (capped by the two limits above)",
        json_schema_extra=LIMIT,
    )
    max_stop_sequences: int = Field(
        4, ge=0, description="stop sequences a request may send (422 beyond)", json_schema_extra=LIMIT
    )
    max_stop_chars: int = Field(
        100, ge=1, description="characters in one stop sequence (422 beyond)", json_schema_extra=LIMIT
    )
    max_blend_adapters: int = Field(
        8, ge=1, description="adapters in one weighted blend (422 beyond)", json_schema_extra=LIMIT
    )
    max_request_bytes: ByteSize = Field(
        "4MiB",
        ge=1,
        description="largest JSON body: generation, jobs... (413 beyond; uploads have their own limits)",
        json_schema_extra=LIMIT,
    )
    max_queue: int = Field(
        256, ge=1, description="requests waiting for a batch row (429 with Retry-After beyond)", json_schema_extra=LIMIT
    )
    request_timeout: float = Field(
        600.0,
        ge=0,
        description="seconds a generation may take, queueing included; then it is cancelled: 504 timeout_error, "
        "or an error event ending a stream; 0 = no limit",
        json_schema_extra=LIMIT,
    )
    stream_write_timeout: float = Field(
        30.0,
        ge=0,
        description="seconds one SSE write may wait on a client that stops reading; then the stream is cancelled "
        "and closed; 0 = no limit",
        json_schema_extra=LIMIT,
    )
    prefill_token_budget: int = Field(
        512,
        ge=1,
        description="prompt tokens prefilled per engine step: the longest a running batch waits for arrivals",
        json_schema_extra=LIMIT,
    )
    adapters: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description="an adapter stored at start (PEFT directory or native file); repeatable; the variable takes "
        "them space-separated",
        json_schema_extra={"flag": "adapter", "metavar": "NAME=PATH"},
    )
    adapter_memory: ByteSize = Field(
        "3GiB",
        description="bank bytes for resident adapters (LRU beyond; 10,000 7B-shaped q,v n=1000 adapters fit in 3GiB)",
        json_schema_extra=LIMIT,
    )
    max_adapter_bytes: ByteSize = Field("64MiB", description="largest adapter file upload", json_schema_extra=LIMIT)
    max_training_file_bytes: ByteSize = Field(
        "100MiB", description="largest training file upload", json_schema_extra=LIMIT
    )
    import_root: Path | None = Field(
        None, description="directory /v1/load_lora_adapter may read; unset: that API is off"
    )
    max_concurrent_jobs: int = Field(
        1, ge=1, description="fine-tuning jobs training at once; the rest queue in order", json_schema_extra=LIMIT
    )
    job_lease_seconds: float = Field(
        30.0,
        gt=0,
        description="a fine-tuning job's lease: renewed every third of it by the replica training the job; "
        "another replica resumes the job from its last checkpoint once it expires (docs/finetuning.md)",
    )
    finetune_micro_batch_tokens: int = Field(
        2048,
        ge=16,
        description="padded tokens per training micro-step (the longest pause a step puts on serving)",
        json_schema_extra=LIMIT,
    )
    training_share: float = Field(
        0.3,
        gt=0,
        le=1,
        description="most of the engine's time training takes while requests are served",
        json_schema_extra=LIMIT,
    )
    metrics_adapter_labels: int = Field(
        100,
        ge=0,
        description="adapter ids with their own label in spectra_adapter_requests_total; later ones: __other__",
        json_schema_extra=LIMIT,
    )
    torch_threads: int = Field(0, ge=0, description="intra-op CPU threads for the model; 0 = CPU cores - 1 (min 1)")
    log_level: LogLevel = Field("info", description="log level")
    log_format: LogFormat = Field("text", description="text lines, or json: one JSON object per line (docs/logging.md)")
    api_keys_file: Path | None = Field(
        None, description="TOML file of [[keys]] (docs/security.md), re-read when it changes; unset: no keyed access"
    )
    api_key: SecretStr | None = Field(
        None, description="one admin key in namespace 'default'; prefer the variable", json_schema_extra=SECRET
    )
    allow_unauthenticated: bool = Field(
        False, description="serve without API keys on a non-loopback --host (otherwise refused at start)"
    )
    health_auth: EndpointAuth = Field("open", description="/health: open, or keyed (any valid key)")
    metrics_auth: EndpointAuth = Field("open", description="/metrics: open, or keyed (a key with the admin scope)")
    max_concurrent_requests_per_key: int = Field(
        64,
        ge=1,
        description="requests one key may have in flight (429 with Retry-After beyond); a key's own limit wins",
        json_schema_extra=LIMIT,
    )

    @field_validator("store")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"expected postgresql://USER@HOST:PORT/DB, got {value!r}")
        return value

    @model_validator(mode="after")
    def _replicas_share_a_store(self) -> ServerSettings:
        """Replicas see one another's adapters only through a shared store (docs/store.md)."""
        if self.replicas is not None and self.store is None:
            raise ValueError("--replicas needs --store postgresql://...: replicas share their adapters through it")
        return self

    @field_validator("adapters", mode="before")
    @classmethod
    def _named_paths(cls, value: Any) -> Any:
        """``NAME=PATH`` items (a list from the CLI, or a whitespace-separated ``SPECTRA_ADAPTERS``)."""
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list | tuple):
            return value
        adapters = {}
        for item in value:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                raise ValueError(f"expected NAME=PATH, got {item!r}")
            adapters[name] = path
        return adapters

    def limits(self) -> dict[str, int | float]:
        """The settings that bound what a request or job may do (``/info``'s ``limits``)."""
        return {name: getattr(self, name) for name, field in type(self).model_fields.items() if _extra(field, "limit")}


def _extra(field: FieldInfo, key: str) -> Any:
    extra = field.json_schema_extra
    return extra.get(key) if isinstance(extra, dict) else None


def flag(name: str) -> str:
    field = ServerSettings.model_fields[name]
    return "--" + (_extra(field, "flag") or name).replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def metavar(name: str) -> str | None:
    return _extra(ServerSettings.model_fields[name], "metavar")


def is_secret(name: str) -> bool:
    return bool(_extra(ServerSettings.model_fields[name], "secret"))


def shown_default(name: str) -> str | None:
    """The default as a user would type it, or None when there is none to show."""
    field = ServerSettings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if default is None or default == {} or is_secret(name):
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def markdown_table() -> str:
    """The README's configuration table."""
    lines = ["| flag | env | default | what |", "|---|---|---|---|"]
    for name, field in ServerSettings.model_fields.items():
        option = flag(name) + (f" {metavar(name)}" if metavar(name) else "")
        default = shown_default(name)
        lines.append(
            f"| `{option}` | `{env_var(name)}` | {f'`{default}`' if default else 'unset'} | {field.description} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown_table() + "\n")
