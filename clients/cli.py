"""The ``spectra`` command line."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(help="Spectra: serve spectral (FourierFT / sDCTFT) adapters of one frozen LLM.", no_args_is_help=True)


@app.command()
def serve(
    data_dir: str = typer.Option("./data", envvar="SPECTRA_DATA_DIR", help="Where models and adapters live."),
) -> None:
    """Start the server (arrives with the serving engine)."""
    typer.echo(f"spectra serve: the serving engine is not built yet (data dir {data_dir}).", err=True)
    sys.exit(2)


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as installed_version

    typer.echo(installed_version("spectra-serve"))
