"""One settings model: ``spectra serve``'s options, ``/info``'s limits and the README table all follow it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import typer
from pydantic import ValidationError

from clients.cli import app
from server import settings as server_settings
from server.settings import ServerSettings

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]
REPO_ROOT = Path(__file__).resolve().parent.parent
FIELDS = ServerSettings.model_fields
LIMIT_FIELDS = {name for name, field in FIELDS.items() if (field.json_schema_extra or {}).get("limit")}


def _readme_table() -> str:
    section = (REPO_ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_the_readme_table_is_the_settings_model() -> None:
    assert _readme_table() == server_settings.markdown_table(), (
        "README.md's configuration table differs from server/settings.py; regenerate it with "
        "`python -m server.settings`"
    )


def test_every_setting_is_one_serve_option_with_its_variable_and_default() -> None:
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    options = {param.name: param for param in serve.params if param.name != "help"}
    assert set(options) == set(FIELDS)
    for name, field in FIELDS.items():
        option = options[name]
        assert server_settings.flag(name) in option.opts, name
        assert option.envvar == server_settings.env_var(name), name
        assert option.help == field.description, name
        default = option.default.value if hasattr(option.default, "value") else option.default
        expected = field.get_default(call_default_factory=True)
        assert default == ([] if expected == {} else expected), name


def test_serve_help_shows_every_flag_variable_and_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "serve", "--help"],
        cwd=REPO_ROOT,
        env={**os.environ, "COLUMNS": "400", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in FIELDS:
        flag = server_settings.flag(name)
        (line,) = [line for line in lines if re.match(rf"\W*{re.escape(flag)}\s", line)]
        assert f"env var: {server_settings.env_var(name)}]" in line, line
        # click puts a default given as text in parentheses
        default = re.search(r"\[default: \(?(.*?)\)?\]", line)
        assert (default and default.group(1)) == server_settings.shown_default(name), line


def test_variables_are_read_and_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRA_MAX_QUEUE", "7")
    monkeypatch.setenv("SPECTRA_ADAPTERS", "a=/tmp/a b=/tmp/b")
    monkeypatch.setenv("SPECTRA_MAX_REQUEST_BYTES", "1KiB")
    chosen = ServerSettings()
    assert (chosen.max_queue, chosen.max_request_bytes) == (7, 1024)
    assert chosen.adapters == {"a": Path("/tmp/a"), "b": Path("/tmp/b")}
    assert ServerSettings(max_queue=9).max_queue == 9, "an explicit value (the CLI's) beats the variable"
    monkeypatch.setenv("SPECTRA_TRAINING_SHARE", "1.5")
    with pytest.raises(ValidationError, match="training_share"):
        ServerSettings()
    with pytest.raises(ValidationError, match="expected NAME=PATH"):
        ServerSettings(adapters=["no-path"])


def test_a_bad_value_on_the_command_line_exits_2_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "serve", "--max-queue", "0"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "max_queue" in result.stderr and "greater than or equal to 1" in result.stderr


def test_info_limits_are_every_limit_setting_with_the_served_values(http_server: Server) -> None:
    from tests.http_fixtures import MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS

    limits = httpx.get(f"{http_server.base_url}/info", timeout=30).json()["limits"]
    assert set(limits) == LIMIT_FIELDS
    # http_fixtures starts the server with these three flags and every other setting at its default.
    served = ServerSettings(
        max_input_tokens=MAX_INPUT_TOKENS, max_total_tokens=MAX_TOTAL_TOKENS, max_new_tokens=MAX_TOTAL_TOKENS
    )
    assert limits == served.limits()


def test_the_store_takes_a_postgresql_url_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings().store is None
    monkeypatch.setenv("SPECTRA_STORE", "postgresql://spectra@db:5432/spectra")
    assert ServerSettings().store == "postgresql://spectra@db:5432/spectra"
    with pytest.raises(ValidationError, match="expected postgresql://USER@HOST:PORT/DB"):
        ServerSettings(store="sqlite:///tmp/x")
