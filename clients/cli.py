"""The ``spectra`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clients.adapters_cli import adapters_app
from clients.files_cli import files_app
from clients.finetune_cli import finetune_app
from clients.generate_cli import generate
from clients.keys_cli import keys_app

app = typer.Typer(help="Spectra: serve spectral (FourierFT / sDCTFT) adapters of one frozen LLM.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(files_app, name="files")
app.add_typer(finetune_app, name="finetune")
app.add_typer(keys_app, name="keys")
app.command()(generate)


def _parse_adapters(values: list[str]) -> dict[str, Path]:
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"expected NAME=PATH, got {value!r}", param_hint="--adapter")
        adapters[name] = Path(path)
    return adapters


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(envvar="SPECTRA_MODEL", help="HF model dir or hub id.")] = None,
    data_dir: Annotated[Path, typer.Option(envvar="SPECTRA_DATA_DIR", help="Models, adapters, jobs.")] = Path("./data"),
    host: Annotated[str, typer.Option(envvar="SPECTRA_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SPECTRA_PORT")] = 8080,
    dtype: Annotated[str, typer.Option(envvar="SPECTRA_DTYPE", help="auto|float32|bfloat16|float16")] = "auto",
    device: Annotated[str, typer.Option(envvar="SPECTRA_DEVICE", help="auto|cpu|cuda")] = "auto",
    max_batch_size: Annotated[int, typer.Option(envvar="SPECTRA_MAX_BATCH_SIZE")] = 32,
    max_input_tokens: Annotated[int, typer.Option(envvar="SPECTRA_MAX_INPUT_TOKENS")] = 1024,
    max_total_tokens: Annotated[int, typer.Option(envvar="SPECTRA_MAX_TOTAL_TOKENS")] = 2048,
    max_queue: Annotated[int, typer.Option(envvar="SPECTRA_MAX_QUEUE")] = 256,
    max_new_tokens: Annotated[
        int, typer.Option(envvar="SPECTRA_MAX_NEW_TOKENS", help="Largest max_new_tokens/max_tokens a request may ask.")
    ] = 1024,
    max_new_tokens_default: Annotated[
        int, typer.Option(envvar="SPECTRA_MAX_NEW_TOKENS_DEFAULT", help="max_new_tokens when a request sets none.")
    ] = 64,
    max_stop_sequences: Annotated[
        int, typer.Option(envvar="SPECTRA_MAX_STOP_SEQUENCES", help="Most stop sequences per request.")
    ] = 4,
    max_stop_chars: Annotated[
        int, typer.Option(envvar="SPECTRA_MAX_STOP_CHARS", help="Longest stop sequence, in characters.")
    ] = 100,
    max_blend_adapters: Annotated[
        int, typer.Option(envvar="SPECTRA_MAX_BLEND_ADAPTERS", help="Most adapters one request may blend.")
    ] = 8,
    max_request_bytes: Annotated[
        str, typer.Option(envvar="SPECTRA_MAX_REQUEST_BYTES", help="Largest JSON request body, e.g. 4MiB.")
    ] = "4MiB",
    request_timeout: Annotated[
        float, typer.Option(envvar="SPECTRA_REQUEST_TIMEOUT", help="Seconds a generation may take; 0 = no limit.")
    ] = 600.0,
    stream_write_timeout: Annotated[
        float,
        typer.Option(envvar="SPECTRA_STREAM_WRITE_TIMEOUT", help="Seconds an SSE write may stall; 0 = no limit."),
    ] = 30.0,
    prefill_token_budget: Annotated[int, typer.Option(envvar="SPECTRA_PREFILL_TOKEN_BUDGET")] = 512,
    served_model_name: Annotated[str | None, typer.Option(envvar="SPECTRA_SERVED_MODEL_NAME")] = None,
    adapter: Annotated[list[str] | None, typer.Option(envvar="SPECTRA_ADAPTERS", help="NAME=PATH, repeatable.")] = None,
    adapter_memory: Annotated[
        str, typer.Option(envvar="SPECTRA_ADAPTER_MEMORY", help="Bank bytes for resident adapters, e.g. 3GiB.")
    ] = "3GiB",
    max_adapter_bytes: Annotated[
        str, typer.Option(envvar="SPECTRA_MAX_ADAPTER_BYTES", help="Largest adapter file accepted, e.g. 64MiB.")
    ] = "64MiB",
    max_training_file_bytes: Annotated[
        str,
        typer.Option(envvar="SPECTRA_MAX_TRAINING_FILE_BYTES", help="Largest training file accepted, e.g. 100MiB."),
    ] = "100MiB",
    import_root: Annotated[
        Path | None, typer.Option(envvar="SPECTRA_IMPORT_ROOT", help="Dir /v1/load_lora_adapter may read; unset=off.")
    ] = None,
    max_concurrent_jobs: Annotated[
        int, typer.Option(envvar="SPECTRA_MAX_CONCURRENT_JOBS", help="Fine-tuning jobs training at once.")
    ] = 1,
    finetune_micro_batch_tokens: Annotated[
        int, typer.Option(envvar="SPECTRA_FINETUNE_MICRO_BATCH_TOKENS", help="Padded tokens per training micro-step.")
    ] = 2048,
    training_share: Annotated[
        float, typer.Option(envvar="SPECTRA_TRAINING_SHARE", help="Most engine time training takes while serving.")
    ] = 0.3,
    metrics_adapter_labels: Annotated[
        int,
        typer.Option(
            envvar="SPECTRA_METRICS_ADAPTER_LABELS", help="Adapter ids labelled in metrics; others: __other__."
        ),
    ] = 100,
    torch_threads: Annotated[
        int, typer.Option(envvar="SPECTRA_TORCH_THREADS", help="Model CPU threads; 0 = cores - 1.")
    ] = 0,
    log_level: Annotated[str, typer.Option(envvar="SPECTRA_LOG_LEVEL")] = "info",
    log_format: Annotated[
        str, typer.Option(envvar="SPECTRA_LOG_FORMAT", help="text|json (json: one JSON object per line).")
    ] = "text",
    api_keys_file: Annotated[
        Path | None, typer.Option(envvar="SPECTRA_API_KEYS_FILE", help="TOML API keys file (docs/security.md).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="SPECTRA_API_KEY", help="One admin API key; prefer the env var.", show_default=False),
    ] = None,
    allow_unauthenticated: Annotated[
        bool,
        typer.Option(envvar="SPECTRA_ALLOW_UNAUTHENTICATED", help="Serve without keys on a non-loopback address."),
    ] = False,
    health_auth: Annotated[str, typer.Option(envvar="SPECTRA_HEALTH_AUTH", help="open|keyed")] = "open",
    metrics_auth: Annotated[str, typer.Option(envvar="SPECTRA_METRICS_AUTH", help="open|keyed (admin scope)")] = "open",
    max_concurrent_requests_per_key: Annotated[
        int, typer.Option(envvar="SPECTRA_MAX_CONCURRENT_REQUESTS_PER_KEY", help="In-flight requests per key.")
    ] = 64,
) -> None:
    """Start the HTTP server."""
    from pydantic import ValidationError

    from server.main import serve as run_server
    from server.settings import ServerSettings

    try:
        settings = ServerSettings(
            model=model,
            data_dir=data_dir,
            host=host,
            port=port,
            dtype=dtype,
            device=device,
            max_batch_size=max_batch_size,
            max_input_tokens=max_input_tokens,
            max_total_tokens=max_total_tokens,
            max_queue=max_queue,
            max_new_tokens=max_new_tokens,
            max_new_tokens_default=max_new_tokens_default,
            max_stop_sequences=max_stop_sequences,
            max_stop_chars=max_stop_chars,
            max_blend_adapters=max_blend_adapters,
            max_request_bytes=max_request_bytes,
            request_timeout=request_timeout,
            stream_write_timeout=stream_write_timeout,
            prefill_token_budget=prefill_token_budget,
            served_model_name=served_model_name,
            adapters=_parse_adapters(adapter or []),
            adapter_memory=adapter_memory,
            max_adapter_bytes=max_adapter_bytes,
            max_training_file_bytes=max_training_file_bytes,
            import_root=import_root,
            max_concurrent_jobs=max_concurrent_jobs,
            finetune_micro_batch_tokens=finetune_micro_batch_tokens,
            training_share=training_share,
            metrics_adapter_labels=metrics_adapter_labels,
            api_keys_file=api_keys_file,
            api_key=api_key,
            allow_unauthenticated=allow_unauthenticated,
            health_auth=health_auth,
            metrics_auth=metrics_auth,
            max_concurrent_requests_per_key=max_concurrent_requests_per_key,
            torch_threads=torch_threads,
            log_level=log_level,
            log_format=log_format,
        )
    except ValidationError as error:
        raise typer.BadParameter(str(error)) from error
    run_server(settings)


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as installed_version

    typer.echo(installed_version("spectra-serve"))


if __name__ == "__main__":
    app()
