"""``spectra adapters ...``: the adapter store of a running server, through :mod:`clients.sdk`.

The SDK (and the server's response models it returns) is imported only when a command runs, so
``spectra --help`` stays fast. API errors exit 1 with ``error (STATUS): message`` on stderr; an
unreachable server exits 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from pydantic import BaseModel

    from clients.sdk import AdapterObject, SpectraClient

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_API_ERROR = 1
EXIT_CONNECTION_ERROR = 2

adapters_app = typer.Typer(help="Upload, list, show, download and delete stored adapters.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON response (for scripts).")]


class DownloadFormat(StrEnum):
    native = "native"
    peft = "peft"


@dataclass(frozen=True)
class _Target:
    url: str
    api_key: str | None
    timeout: float


@adapters_app.callback()
def adapters(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="SPECTRA_URL", help="Base URL of the Spectra server.")] = DEFAULT_URL,
    api_key: Annotated[
        str | None, typer.Option(envvar="SPECTRA_API_KEY", help="Sent as 'Authorization: Bearer KEY'.")
    ] = None,
    timeout: Annotated[float, typer.Option(envvar="SPECTRA_TIMEOUT", help="Seconds per request.")] = 300.0,
) -> None:
    """Manage the adapter store of a running server."""
    ctx.obj = _Target(url, api_key, timeout)


# -- helpers -----------------------------------------------------------------------------------


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _client(ctx: typer.Context) -> Iterator[SpectraClient]:
    """A client for the ``--url`` server; SDK errors become messages on stderr and exit codes."""
    from clients.sdk import SpectraAPIError, SpectraClient, SpectraConnectionError, SpectraError

    target: _Target = ctx.obj  # set by the group callback, inherited by every command's context
    try:
        with SpectraClient(target.url, timeout=target.timeout, api_key=target.api_key) as client:
            yield client
    except SpectraAPIError as error:
        _fail(f"error ({error.status_code}): {error.message}", EXIT_API_ERROR)
    except SpectraConnectionError as error:
        _fail(f"error: {error}", EXIT_CONNECTION_ERROR)
    except SpectraError as error:
        _fail(f"error: {error}", EXIT_API_ERROR)
    except OSError as error:  # reading the upload or writing the download
        _fail(f"error: {error}", EXIT_API_ERROR)


@contextlib.contextmanager
def _activity(message: str) -> Iterator[None]:
    """A spinner on stderr while a transfer runs, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    with Console(stderr=True).status(message):
        yield


def _print_json(model: BaseModel) -> None:
    typer.echo(model.model_dump_json(indent=2))


def _size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _created(timestamp: int, layout: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime(layout)


def _status(adapter: AdapterObject, reason: bool = False) -> Text:
    status = adapter.status + (" (pinned)" if adapter.pinned else "")
    if reason and adapter.broken_reason:
        status += f": {adapter.broken_reason}"
    return Text(status, style="red" if adapter.status == "broken" else "")


def _adapter_table(adapters: list[AdapterObject], title: str | None = None) -> Table:
    # Light borders leave room for an 80-column terminal (or a pipe, which rich takes as 80).
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    id_width = min(40, max((len(adapter.id) for adapter in adapters), default=2))
    for column in ("id", "ver", "method", "params", "size", "status", "created"):
        # Ids fold rather than lose characters to an ellipsis (they are what users copy), and only past
        # 40 characters.
        numeric = column in ("ver", "params", "size")
        table.add_column(
            column,
            justify="right" if numeric else "left",
            overflow="fold",
            no_wrap=column != "id",
            min_width=id_width if column == "id" else None,
        )
    for adapter in adapters:
        table.add_row(
            Text(adapter.id),
            str(adapter.version),
            Text(adapter.method),
            f"{adapter.n_params:,}",
            _size(adapter.size_bytes),
            _status(adapter),
            _created(adapter.created_at, "%m-%d %H:%M"),
        )
    return table


def _metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"not valid JSON ({error.msg} at char {error.pos})", param_hint="--metadata") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--metadata")
    return value


# -- commands ----------------------------------------------------------------------------------


@adapters_app.command()
def upload(
    ctx: typer.Context,
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="'name' or 'namespace/name'.")],
    path: Annotated[
        Path,
        typer.Argument(exists=True, help="A PEFT FourierFT directory or a native .safetensors file."),
    ],
    description: Annotated[str, typer.Option(help="Free text kept with the version.")] = "",
    metadata: Annotated[str | None, typer.Option(help="A JSON object kept with the version.")] = None,
    pin: Annotated[bool, typer.Option("--pin", help="Load now and never evict.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Upload an adapter; an existing id gets a new version."""
    metadata_object = _metadata(metadata)
    with _client(ctx) as client, _activity(f"Uploading {path} as {adapter_id}..."):
        adapter = client.upload_adapter(adapter_id, path, description=description, metadata=metadata_object, pin=pin)
    if as_json:
        _print_json(adapter)
        return
    typer.echo(
        f"Uploaded {adapter.id}@{adapter.version} "
        f"({adapter.method}, {adapter.n_params:,} params, {_size(adapter.size_bytes)})"
    )


@adapters_app.command("list")
def list_adapters(
    ctx: typer.Context,
    prefix: Annotated[str, typer.Option(help="Only ids starting with this.")] = "",
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Ids per page.")] = 100,
    after: Annotated[str, typer.Option(help="Start after this id (the last id of the previous page).")] = "",
    as_json: JsonOption = False,
) -> None:
    """List the latest version of each adapter id."""
    with _client(ctx) as client:
        page = client.list_adapters(prefix=prefix, after=after, limit=limit)
    if as_json:
        _print_json(page)
        return
    if not page.data:
        typer.echo("No adapters." if not prefix else f"No adapters with ids starting {prefix!r}.")
        return
    Console().print(_adapter_table(page.data))
    if page.has_more:
        typer.echo(f"More adapters follow: pass --after {page.last_id}", err=True)


@adapters_app.command()
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="'id' (latest version) or 'id@N'.")],
    as_json: JsonOption = False,
) -> None:
    """Show one adapter version and every stored version of its id."""
    with _client(ctx) as client:
        detail = client.get_adapter(ref)
    if as_json:
        _print_json(detail)
        return
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for name, value in (
        ("id", Text(detail.id)),
        ("version", Text(str(detail.version))),
        ("method", Text(detail.method)),
        ("params", Text(f"{detail.n_params:,}")),
        ("size", Text(f"{_size(detail.size_bytes)} ({detail.size_bytes:,} bytes)")),
        ("sha256", Text(detail.sha256)),
        ("base model", Text(detail.base_model)),
        ("source format", Text(detail.source_format)),
        ("status", _status(detail, reason=True)),
        ("created", Text(_created(detail.created_at))),
        ("description", Text(detail.description or "-")),
        ("metadata", Text(json.dumps(detail.metadata) if detail.metadata else "-")),
    ):
        fields.add_row(name, value)
    console = Console()
    console.print(fields)
    console.print(_adapter_table(detail.versions, title="versions"))


@adapters_app.command()
def download(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="'id' (latest version) or 'id@N'.")],
    dest: Annotated[
        Path,
        typer.Argument(
            metavar="DEST", help="native: a file, or a directory to save into; peft: the directory to unzip into."
        ),
    ],
    format: Annotated[DownloadFormat, typer.Option("--format", help="native .safetensors or a PEFT directory.")] = (
        DownloadFormat.native
    ),
) -> None:
    """Download an adapter as a native file or a PEFT directory."""
    with _client(ctx) as client, _activity(f"Downloading {ref}..."):
        written = client.download_adapter(ref, dest, format="peft" if format is DownloadFormat.peft else "native")
    typer.echo(f"Saved {ref} to {written}")


@adapters_app.command()
def delete(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="'id' (every version) or 'id@N' (that version).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete an adapter id (every version) or one version."""
    if not yes:
        what = f"version {ref}" if "@" in ref else f"adapter {ref} and every version of it"
        typer.confirm(f"Delete {what}?", abort=True)
    with _client(ctx) as client:
        deleted = client.delete_adapter(ref)
    if as_json:
        _print_json(deleted)
        return
    versions = ", ".join(str(version) for version in deleted.versions)
    typer.echo(f"Deleted {deleted.id} (version{'s' if len(deleted.versions) != 1 else ''} {versions})")
