"""``spectra generate``: one prompt through a running server's ``/generate`` (TGI shape), via :mod:`clients.sdk`.

Options, errors and exit codes are those of every server command (:mod:`clients.cli_common`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated

import typer

from clients.cli_common import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    ApiKeyOption,
    JsonOption,
    Target,
    TimeoutOption,
    UrlOption,
    connect,
    print_json,
)

if TYPE_CHECKING:
    from clients.sdk import GenerateOptions, StreamResponse


def _print_stream(events: Iterable[StreamResponse], as_json: bool) -> None:
    printed = ""
    for event in events:
        if as_json:
            typer.echo(event.model_dump_json())
            continue
        # Special tokens (eos) are in the token stream but not in generated_text.
        text = "" if event.token.special else event.token.text
        # The last event's generated_text can hold a little more than its tokens (a UTF-8 character
        # the last token left unfinished): finish on exactly the text a plain generate prints.
        if event.generated_text is not None and event.generated_text.startswith(printed + text):
            text = event.generated_text[len(printed) :]
        typer.echo(text, nl=False)
        printed += text
    if not as_json:
        typer.echo()


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt, sent as is (no chat template).")],
    adapter: Annotated[str | None, typer.Option(help="Adapter id or id@N; unset: the base model.")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Most tokens to generate; unset: the server's default.", min=1)
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sample at this temperature; unset or 0: greedy.", min=0)
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print the text as it is generated.")] = False,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Generate text from PROMPT with the served model, or one of its adapters.

    --json prints the server's response with details (tokens, finish reason); with --stream, one event a line.
    """
    ctx.obj = Target(url, api_key, timeout)
    options: GenerateOptions = {"adapter_id": adapter, "max_new_tokens": max_new_tokens, "temperature": temperature}
    with connect(ctx) as client:
        if stream:
            _print_stream(client.generate_stream(prompt, **options), as_json)
        elif as_json:
            print_json(client.generate(prompt, details=True, **options))
        else:
            typer.echo(client.generate(prompt, **options).generated_text)
