"""The ``spectra`` command line."""

from __future__ import annotations

import enum
import inspect
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from clients.adapters_cli import adapters_app
from clients.files_cli import files_app
from clients.finetune_cli import finetune_app
from clients.generate_cli import generate
from clients.keys_cli import keys_app
from server import settings as server_settings
from server.settings import ServerSettings

app = typer.Typer(help="Spectra: serve spectral (FourierFT / sDCTFT) adapters of one frozen LLM.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(files_app, name="files")
app.add_typer(finetune_app, name="finetune")
app.add_typer(keys_app, name="keys")
app.command()(generate)


def _serve(**values: Any) -> None:
    """Start the HTTP server."""
    from pydantic import ValidationError

    from server.main import serve as run_server

    try:
        chosen = ServerSettings(**{name: _plain(value) for name, value in values.items()})
    except ValidationError as error:
        raise typer.BadParameter(str(error)) from error
    run_server(chosen)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _cli_type(name: str, annotation: Any) -> Any:
    """The type typer parses an option into; the settings model validates the value afterwards."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        (annotation,) = (arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        choices = [str(choice) for choice in get_args(annotation)]
        return enum.Enum(f"{name}_choices", {choice: choice for choice in choices}, type=str)
    if get_origin(annotation) is dict:
        return list[str]
    if annotation in (bool, int, float, Path):
        return annotation
    return str  # ByteSize ("4MiB"), SecretStr and plain strings


def _serve_option(name: str, field: FieldInfo) -> inspect.Parameter:
    default = field.get_default(call_default_factory=True)
    flag = server_settings.flag(name)
    option = typer.Option(
        [] if default == {} else default,
        # typer names an option after its parameter (and a bool --x/--no-x) unless told otherwise
        *([flag] if flag != "--" + name.replace("_", "-") else []),
        envvar=server_settings.env_var(name),
        help=field.description,
        metavar=server_settings.metavar(name),
        show_default=server_settings.shown_default(name) or False,
    )
    annotation = _cli_type(name, field.annotation)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


# `spectra serve` takes one option per settings field, so the two cannot drift apart.
_SERVE_OPTIONS = [_serve_option(name, field) for name, field in ServerSettings.model_fields.items()]
_serve.__signature__ = inspect.Signature(_SERVE_OPTIONS)  # type: ignore[attr-defined]
_serve.__annotations__ = {option.name: option.annotation for option in _SERVE_OPTIONS}
app.command("serve")(_serve)


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as installed_version

    typer.echo(installed_version("spectra-serve"))


if __name__ == "__main__":
    app()
