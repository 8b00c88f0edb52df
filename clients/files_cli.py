"""``spectra files ...``: the training files of a running server (``/v1/files``), through :mod:`clients.sdk`.

Options, errors and exit codes are those of every server command group (:mod:`clients.cli_common`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clients.cli_common import (
    JsonOption,
    connect,
    human_size,
    print_json,
    server_command_group,
    timestamp,
    upload_progress,
)

if TYPE_CHECKING:
    from clients.sdk import FileObject

files_app = server_command_group("Upload, list, show and delete fine-tuning training files.")

FileIdArgument = Annotated[str, typer.Argument(metavar="FILE_ID", help="'file-...', as upload printed it.")]


def _status(file: FileObject) -> Text:
    if file.status == "error":
        return Text(f"error: {file.status_details}" if file.status_details else "error", style="red")
    return Text(file.status)


def _file_table(files: list[FileObject]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for column in ("id", "filename", "size", "status", "created"):
        # Ids stay whole (they are what users copy); long file names give way first.
        table.add_column(
            column,
            justify="right" if column == "size" else "left",
            no_wrap=column != "filename",
            overflow="fold",
            min_width=len(files[0].id) if column == "id" and files else None,
        )
    for file in files:
        table.add_row(
            Text(file.id),
            Text(file.filename),
            human_size(file.bytes),
            _status(file),
            timestamp(file.created_at, "%m-%d %H:%M"),
        )
    return table


@files_app.command()
def upload(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="JSONL: prompt/completion or chat 'messages' lines."),
    ],
    purpose: Annotated[str, typer.Option(help="The only purpose the server accepts.")] = "fine-tune",
    public: Annotated[bool, typer.Option("--public", help="Visible to every API key, not only yours.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Upload a training file; the server checks every line and names the invalid ones."""
    with connect(ctx) as client, upload_progress(path) as progress:
        uploaded = client.upload_file(path, purpose=purpose, progress=progress, public=public)
    if as_json:
        print_json(uploaded)
        return
    typer.echo(f"Uploaded {uploaded.filename} as {uploaded.id} ({human_size(uploaded.bytes)})")


@files_app.command("list")
def list_files(
    ctx: typer.Context,
    purpose: Annotated[str | None, typer.Option(help="Only files with this purpose.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="Files per page.")] = 100,
    after: Annotated[str | None, typer.Option(help="Start after this id (the last id of the previous page).")] = None,
    as_json: JsonOption = False,
) -> None:
    """List training files, newest first."""
    with connect(ctx) as client:
        page = client.list_files(purpose=purpose, after=after, limit=limit)
    if as_json:
        print_json(page)
        return
    if not page.data:
        typer.echo("No files.")
        return
    Console().print(_file_table(page.data))
    if page.has_more:
        typer.echo(f"More files follow: pass --after {page.last_id}", err=True)


@files_app.command()
def show(ctx: typer.Context, file_id: FileIdArgument, as_json: JsonOption = False) -> None:
    """Show one training file."""
    with connect(ctx) as client:
        file = client.get_file(file_id)
    if as_json:
        print_json(file)
        return
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for name, value in (
        ("id", Text(file.id)),
        ("filename", Text(file.filename)),
        ("size", Text(f"{human_size(file.bytes)} ({file.bytes:,} bytes)")),
        ("purpose", Text(file.purpose)),
        ("status", _status(file)),
        ("created", Text(timestamp(file.created_at))),
    ):
        fields.add_row(name, value)
    Console().print(fields)


@files_app.command()
def delete(
    ctx: typer.Context,
    file_id: FileIdArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete a training file."""
    if not yes:
        typer.confirm(f"Delete file {file_id}?", abort=True)
    with connect(ctx) as client:
        deleted = client.delete_file(file_id)
    if as_json:
        print_json(deleted)
        return
    typer.echo(f"Deleted {deleted.id}")
