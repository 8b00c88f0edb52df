"""``spectra keys create``: a new API key and the keys-file entry that grants it (only its hash is stored)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from server.api.auth import ALL_SCOPES, KeyEntry, hash_key, new_key

keys_app = typer.Typer(help="API keys for the server's keys file (--api-keys-file).", no_args_is_help=True)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="Shown in logs and errors instead of the key.")],
    namespace: Annotated[str, typer.Option(help="Where the key's adapters, files and jobs live.")],
    scope: Annotated[list[str], typer.Option(help=f"Repeatable: {', '.join(sorted(ALL_SCOPES))}.", show_default=False)],
    max_concurrent_requests: Annotated[
        int | None, typer.Option(help="In-flight requests; default: the server's --max-concurrent-requests-per-key.")
    ] = None,
) -> None:
    """Print a new key (once: it is not stored anywhere) and the [[keys]] entry to append to the keys file.

    JSON strings are valid TOML basic strings, so names with quotes or backslashes come out escaped.
    """
    from pydantic import ValidationError

    key = new_key()
    try:
        entry = KeyEntry(
            name=name,
            sha256=hash_key(key),
            namespace=namespace,
            scopes=scope,  # type: ignore[arg-type]
            max_concurrent_requests=max_concurrent_requests,
        )
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise typer.BadParameter(problems) from error
    typer.echo(f"API key (shown once; give it to the client): {key}", err=True)
    lines = [
        "[[keys]]",
        f"name = {json.dumps(entry.name)}",
        f'sha256 = "{entry.sha256}"',
        f'namespace = "{entry.namespace}"',
        f"scopes = {json.dumps(entry.scopes)}",
    ]
    if entry.max_concurrent_requests is not None:
        lines.append(f"max_concurrent_requests = {entry.max_concurrent_requests}")
    typer.echo("\n".join(lines))
