"""``spectra adapters ...``: the adapter store of a running server, through :mod:`clients.sdk`.

Options, errors and exit codes are those of every server command group (:mod:`clients.cli_common`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clients.cli_common import (
    JsonOption,
    activity,
    connect,
    human_size,
    print_json,
    server_command_group,
    timestamp,
)

if TYPE_CHECKING:
    from clients.sdk import AdapterObject

adapters_app = server_command_group("Upload, list, show, download and delete stored adapters.")


class DownloadFormat(StrEnum):
    native = "native"
    peft = "peft"


# -- helpers -----------------------------------------------------------------------------------


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
            human_size(adapter.size_bytes),
            _status(adapter),
            timestamp(adapter.created_at, "%m-%d %H:%M"),
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
    public: Annotated[bool, typer.Option("--public", help="Visible to every API key, not only yours.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Upload an adapter; an existing id gets a new version."""
    metadata_object = _metadata(metadata)
    with connect(ctx) as client, activity(f"Uploading {path} as {adapter_id}..."):
        adapter = client.upload_adapter(
            adapter_id, path, description=description, metadata=metadata_object, pin=pin, public=public
        )
    if as_json:
        print_json(adapter)
        return
    typer.echo(
        f"Uploaded {adapter.id}@{adapter.version} "
        f"({adapter.method}, {adapter.n_params:,} params, {human_size(adapter.size_bytes)})"
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
    with connect(ctx) as client:
        page = client.list_adapters(prefix=prefix, after=after, limit=limit)
    if as_json:
        print_json(page)
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
    with connect(ctx) as client:
        detail = client.get_adapter(ref)
    if as_json:
        print_json(detail)
        return
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for name, value in (
        ("id", Text(detail.id)),
        ("version", Text(str(detail.version))),
        ("method", Text(detail.method)),
        ("params", Text(f"{detail.n_params:,}")),
        ("size", Text(f"{human_size(detail.size_bytes)} ({detail.size_bytes:,} bytes)")),
        ("sha256", Text(detail.sha256)),
        ("base model", Text(detail.base_model)),
        ("source format", Text(detail.source_format)),
        ("status", _status(detail, reason=True)),
        ("created", Text(timestamp(detail.created_at))),
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
    with connect(ctx) as client, activity(f"Downloading {ref}..."):
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
    with connect(ctx) as client:
        deleted = client.delete_adapter(ref)
    if as_json:
        print_json(deleted)
        return
    versions = ", ".join(str(version) for version in deleted.versions)
    typer.echo(f"Deleted {deleted.id} (version{'s' if len(deleted.versions) != 1 else ''} {versions})")
