"""What every ``spectra`` command group that talks to a running server shares: its options, the client, output.

The SDK (and the server's response models it returns) is imported only when a command runs, so
``spectra --help`` stays fast. API errors exit 1 with ``error (STATUS): message`` on stderr; an
unreachable server exits 2.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

if TYPE_CHECKING:
    from pydantic import BaseModel

    from clients.sdk import SpectraClient

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 300.0
EXIT_API_ERROR = 1
EXIT_CONNECTION_ERROR = 2

UrlOption = Annotated[str, typer.Option(envvar="SPECTRA_URL", help="Base URL of the Spectra server.")]
ApiKeyOption = Annotated[
    str | None, typer.Option(envvar="SPECTRA_API_KEY", help="Sent as 'Authorization: Bearer KEY'.")
]
TimeoutOption = Annotated[float, typer.Option(envvar="SPECTRA_TIMEOUT", help="Seconds per request.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON response (for scripts).")]


@dataclass(frozen=True)
class Target:
    """The server a command group's options name; its callback stores it as ``ctx.obj``."""

    url: str
    api_key: str | None
    timeout: float


def fail(message: str, code: int) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def server_command_group(help_text: str) -> typer.Typer:
    """A command group that talks to a running server: ``--url``, ``--api-key`` and ``--timeout`` are the
    group's options, stored on the context for :func:`connect`."""
    group = typer.Typer(help=help_text, no_args_is_help=True)

    @group.callback()
    def target(
        ctx: typer.Context,
        url: UrlOption = DEFAULT_URL,
        api_key: ApiKeyOption = None,
        timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    ) -> None:
        ctx.obj = Target(url, api_key, timeout)

    return group


@contextlib.contextmanager
def connect(ctx: typer.Context) -> Iterator[SpectraClient]:
    """A client for the ``--url`` server; SDK errors become messages on stderr and exit codes."""
    from clients.sdk import SpectraAPIError, SpectraClient, SpectraConnectionError, SpectraError

    target: Target = ctx.obj  # set by the group callback, inherited by every command's context
    try:
        with SpectraClient(target.url, timeout=target.timeout, api_key=target.api_key) as client:
            yield client
    except SpectraAPIError as error:
        fail(f"error ({error.status_code}): {error.message}", EXIT_API_ERROR)
    except SpectraConnectionError as error:
        fail(f"error: {error}", EXIT_CONNECTION_ERROR)
    except SpectraError as error:
        fail(f"error: {error}", EXIT_API_ERROR)
    except OSError as error:  # reading an upload or writing a download
        fail(f"error: {error}", EXIT_API_ERROR)


@contextlib.contextmanager
def activity(message: str) -> Iterator[None]:
    """A spinner on stderr while a transfer runs, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    with Console(stderr=True).status(message):
        yield


@contextlib.contextmanager
def upload_progress(path: Path) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar on stderr for an upload of ``path`` (only when stderr is a terminal); yields the
    callback to give the SDK, or None."""
    if not sys.stderr.isatty():
        yield None
        return
    columns = (TextColumn("Uploading {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(path.name, total=path.stat().st_size)
        yield lambda sent: bar.advance(task, sent)


def print_json(model: BaseModel) -> None:
    typer.echo(model.model_dump_json(indent=2))


def human_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def timestamp(seconds: int, layout: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime(layout)
