"""The Python SDK (:mod:`clients.sdk`) and ``spectra adapters ...`` against a real ``spectra serve``.

The server is the session's shared ``http_server``; every id made here starts with ``sdk-`` and is
deleted after each test, so the adapters other test files count ("alpha", "beta") are untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file
from typer.testing import CliRunner

from clients.cli import app
from clients.sdk import (
    MAX_PEFT_ZIP_EXPANDED_BYTES,
    AdapterDeleted,
    AdapterDetail,
    AdapterList,
    AdapterObject,
    AsyncSpectraClient,
    SpectraAPIError,
    SpectraClient,
    SpectraConnectionError,
    SpectraError,
    SSELineSplitter,
    _Download,
    _save_download,
)
from server.spectral.formats import native
from tests.conftest import load_routed
from tests.engine_fixtures import random_adapter

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

PREFIX = "sdk-"
REPO_ROOT = Path(__file__).resolve().parent.parent
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def unused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def native_file(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, _, shapes = load_routed(tiny_llama_dir)
    path = tmp_path_factory.mktemp("sdk-native") / "adapter.safetensors"
    path.write_bytes(native.to_bytes(random_adapter(shapes, seed=5)))
    return path


@pytest.fixture
def client(http_server: Server) -> Iterator[SpectraClient]:
    with SpectraClient(http_server.base_url, timeout=60) as client:
        yield client
        for adapter in list(client.iter_adapters(PREFIX)):
            client.delete_adapter(adapter.id)


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"definitely not safetensors")
    return path


# -- SDK ---------------------------------------------------------------------------------------


def test_health_and_info(client: SpectraClient, http_server: Server) -> None:
    assert client.health().status == "ok"
    assert client.info().model_id == http_server.model_name


def test_upload_peft_dir_and_native_file(
    client: SpectraClient, peft_adapter_dirs: dict[str, Path], native_file: Path
) -> None:
    peft = client.upload_adapter(
        "sdk-peft", peft_adapter_dirs["alpha"], description="from PEFT", metadata={"team": "a", "n": 1}
    )
    assert isinstance(peft, AdapterObject)
    assert (peft.id, peft.version, peft.method, peft.source_format) == ("sdk-peft", 1, "fourierft", "peft")
    assert (peft.description, peft.metadata, peft.pinned, peft.status) == (
        "from PEFT",
        {"team": "a", "n": 1},
        False,
        "ready",
    )

    data = native_file.read_bytes()
    first = client.upload_adapter("sdk-native", native_file)
    assert (first.id, first.version, first.source_format) == ("sdk-native", 1, "native")
    assert (first.size_bytes, first.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    second = client.upload_adapter("sdk-native", str(native_file), pin=True, description="v2")
    assert (second.version, second.pinned, second.sha256) == (2, True, first.sha256)

    latest = client.get_adapter("sdk-native")
    assert isinstance(latest, AdapterDetail)
    assert (latest.version, latest.description) == (2, "v2")
    assert [version.version for version in latest.versions] == [1, 2]
    pinned = client.get_adapter("sdk-native@1")
    assert (pinned.version, pinned.pinned) == (1, False)
    assert [version.version for version in pinned.versions] == [1, 2]


def test_list_prefix_and_paging(client: SpectraClient, native_file: Path) -> None:
    ids = ["sdk-page-a", "sdk-page-b", "sdk-page-c"]
    for adapter_id in ids:
        client.upload_adapter(adapter_id, native_file)
    client.upload_adapter("sdk-page-b", native_file)  # a second version: listed once, as the latest

    first = client.list_adapters(prefix="sdk-page-", limit=2)
    assert isinstance(first, AdapterList)
    assert [adapter.id for adapter in first.data] == ids[:2]
    assert (first.first_id, first.last_id, first.has_more) == ("sdk-page-a", "sdk-page-b", True)
    assert first.data[1].version == 2
    rest = client.list_adapters(prefix="sdk-page-", after=first.last_id or "", limit=2)
    assert ([adapter.id for adapter in rest.data], rest.has_more) == (ids[2:], False)

    assert [adapter.id for adapter in client.iter_adapters("sdk-page-", page_size=1)] == ids
    assert "alpha" in {adapter.id for adapter in client.iter_adapters()}
    empty = client.list_adapters(prefix="sdk-page-zzz")
    assert (empty.data, empty.first_id, empty.last_id, empty.has_more) == ([], None, None, False)


def test_download_native_and_peft(
    client: SpectraClient, native_file: Path, peft_adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    client.upload_adapter("sdk-dl", native_file)
    written = client.download_adapter("sdk-dl", tmp_path / "out" / "copy.safetensors")
    assert written == tmp_path / "out" / "copy.safetensors"
    assert written.read_bytes() == native_file.read_bytes()
    into_dir = client.download_adapter("sdk-dl@1", tmp_path)
    assert into_dir == tmp_path / "sdk-dl-v1.safetensors"
    assert into_dir.read_bytes() == native_file.read_bytes()

    client.upload_adapter("sdk-dl-peft", peft_adapter_dirs["alpha"])
    peft_dir = client.download_adapter("sdk-dl-peft", tmp_path / "peft", format="peft")
    assert {path.name for path in peft_dir.iterdir()} == PEFT_FILES
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    original = json.loads((peft_adapter_dirs["alpha"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "FOURIERFT"
    assert (config["random_loc_seed"], config["n_frequency"]) == (original["random_loc_seed"], original["n_frequency"])
    got = load_file(peft_dir / "adapter_model.safetensors")
    expected = load_file(peft_adapter_dirs["alpha"] / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key].float(), tensor.float())


def test_delete_then_get_is_404(client: SpectraClient, native_file: Path) -> None:
    client.upload_adapter("sdk-del", native_file)
    client.upload_adapter("sdk-del", native_file)
    client.upload_adapter("sdk-del", native_file)
    one = client.delete_adapter("sdk-del@2")
    assert isinstance(one, AdapterDeleted)
    assert (one.id, one.deleted, one.versions) == ("sdk-del", True, [2])
    assert [version.version for version in client.get_adapter("sdk-del").versions] == [1, 3]

    assert client.delete_adapter("sdk-del").versions == [1, 3]
    with pytest.raises(SpectraAPIError) as caught:
        client.get_adapter("sdk-del")
    error = caught.value
    assert (error.status_code, error.type, error.param) == (404, "not_found_error", "adapter_id")
    assert error.message == "adapter 'sdk-del' not found"
    with pytest.raises(SpectraAPIError) as caught:
        client.delete_adapter("sdk-del")
    assert caught.value.status_code == 404
    with pytest.raises(SpectraAPIError) as caught:
        client.download_adapter("sdk-del", Path("unused"))
    assert caught.value.status_code == 404


def test_api_errors_carry_the_server_message(client: SpectraClient, bad_file: Path, native_file: Path) -> None:
    with pytest.raises(SpectraAPIError) as caught:
        client.upload_adapter("sdk-bad", bad_file)
    assert (caught.value.status_code, caught.value.param, caught.value.type) == (422, "file", "invalid_request_error")
    assert "safetensors" in caught.value.message
    with pytest.raises(SpectraAPIError) as caught:
        client.upload_adapter("sdk bad id!", native_file)
    assert (caught.value.status_code, caught.value.param) == (422, "adapter_id")
    assert "invalid adapter id" in caught.value.message
    with pytest.raises(SpectraAPIError) as caught:
        client.get_adapter("sdk-x@0")
    assert caught.value.status_code == 422
    assert client.list_adapters(PREFIX).data == []  # nothing was stored by the failed uploads


def test_client_side_errors(tmp_path: Path) -> None:
    with (
        SpectraClient(unused_url(), timeout=5) as offline,
        pytest.raises(SpectraConnectionError, match="cannot connect"),
    ):
        offline.health()
    with SpectraClient("http://unused", api_key="secret") as keyed:
        assert keyed._http.headers["Authorization"] == "Bearer secret"
        with pytest.raises(SpectraError, match="not a PEFT adapter directory"):
            keyed.upload_adapter("sdk-x", tmp_path)

    plain = httpx.Response(502, text="Bad gateway", request=httpx.Request("GET", "http://x/"))
    error = SpectraAPIError.from_response(plain)
    assert (error.status_code, error.message, error.type, error.param) == (502, "Bad gateway", None, None)


@pytest.mark.parametrize("member", ["../evil.txt", "/abs.txt", "a/../../evil.txt", "C:/evil.txt", "..\\evil.txt"])
def test_peft_download_refuses_unsafe_members(tmp_path: Path, member: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_config.json", "{}")
        archive.writestr(member, "x")
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(SpectraError, match="unsafe archive member"):
        _save_download(_Download(buffer.getvalue(), None, None), dest, "peft")
    assert not dest.exists()
    assert list(tmp_path.rglob("*")) == []  # checked before anything is written


def test_peft_download_refuses_a_zip_bomb_before_expanding_it(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("adapter_config.json", "{}")
        with archive.open("adapter_model.safetensors", "w", force_zip64=True) as member:
            chunk = bytes(1 << 24)
            for _ in range((MAX_PEFT_ZIP_EXPANDED_BYTES >> 24) + 1):
                member.write(chunk)
    assert len(buffer.getvalue()) < 4 << 20
    dest = tmp_path / "dest"
    with pytest.raises(SpectraError, match="expands to"):
        _save_download(_Download(buffer.getvalue(), None, None), dest, "peft")
    assert not dest.exists()


def test_sse_lines_end_only_at_cr_and_lf_whatever_the_chunking() -> None:
    """Found by bench/load.py: a token whose text is U+0085 arrives unescaped in a data line, and httpx's
    iter_lines split the event there. U+2028/U+2029 are the same case."""
    body = 'data: {"text":"\x85"}\r\n\r\ndata: {"text":"\u2028\u2029"}\n\ndata: [DONE]\r'
    expected = ['data: {"text":"\x85"}', "", 'data: {"text":"\u2028\u2029"}', "", "data: [DONE]"]
    for size in (1, 2, 3, len(body)):
        splitter = SSELineSplitter()
        lines = [line for start in range(0, len(body), size) for line in splitter.feed(body[start : start + size])]
        assert [*lines, *splitter.close()] == expected, size


def test_native_download_checks_the_announced_sha256(tmp_path: Path) -> None:
    with pytest.raises(SpectraError, match="corrupt"):
        _save_download(_Download(b"abc", "x.safetensors", "0" * 64), tmp_path / "x.safetensors", "native")
    assert not (tmp_path / "x.safetensors").exists()


def test_async_client(http_server: Server, native_file: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncSpectraClient(http_server.base_url, timeout=60) as client:
            assert (await client.health()).status == "ok"
            uploaded = await client.upload_adapter("sdk-async", native_file, metadata={"async": True})
            assert (uploaded.id, uploaded.version, uploaded.metadata) == ("sdk-async", 1, {"async": True})
            shown = await client.get_adapter("sdk-async")
            assert (shown.sha256, [version.version for version in shown.versions]) == (uploaded.sha256, [1])
            assert [adapter.id async for adapter in client.iter_adapters("sdk-async", page_size=1)] == ["sdk-async"]
            path = await client.download_adapter("sdk-async", tmp_path / "a.safetensors")
            assert path.read_bytes() == native_file.read_bytes()
            assert (await client.delete_adapter("sdk-async")).versions == [1]
            with pytest.raises(SpectraAPIError) as caught:
                await client.get_adapter("sdk-async")
            assert caught.value.status_code == 404
        async with AsyncSpectraClient(unused_url(), timeout=5) as offline:
            with pytest.raises(SpectraConnectionError):
                await offline.info()

    asyncio.run(scenario())


# -- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def cli(http_server: Server, client: SpectraClient) -> Iterator[CliRunner]:
    """A runner whose ``spectra adapters`` points at the server; ``client`` cleans up the ``sdk-`` ids."""
    yield CliRunner(env={"SPECTRA_URL": http_server.base_url, "COLUMNS": "160"})


def run(runner: CliRunner, *args: str, input: str | None = None) -> Result:
    return runner.invoke(app, ["adapters", *args], input=input)


def test_cli_upload_list_show_download_delete(
    cli: CliRunner, client: SpectraClient, peft_adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    result = run(cli, "upload", "sdk-cli", str(peft_adapter_dirs["alpha"]), "--metadata", '{"k": 1}', "--json")
    assert result.exit_code == 0, result.output
    uploaded = AdapterObject.model_validate_json(result.stdout)
    assert (uploaded.id, uploaded.version, uploaded.metadata, uploaded.source_format) == (
        "sdk-cli",
        1,
        {"k": 1},
        "peft",
    )

    result = run(cli, "upload", "sdk-cli", str(peft_adapter_dirs["alpha"]), "--description", "second", "--pin")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Uploaded sdk-cli@2 (fourierft,")

    result = run(cli, "list", "--prefix", "sdk-")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0]
    assert all(column in header for column in ("id", "ver", "method", "params", "size", "status", "created"))
    row = next(line for line in result.stdout.splitlines() if "sdk-cli" in line)
    assert " 2 " in row and "fourierft" in row and f"{uploaded.n_params:,}" in row and "ready (pinned)" in row
    page = AdapterList.model_validate_json(run(cli, "list", "--prefix", "sdk-", "--json").stdout)
    assert [adapter.id for adapter in page.data] == ["sdk-cli"]

    result = run(cli, "show", "sdk-cli@1")
    assert result.exit_code == 0, result.output
    assert uploaded.sha256 in result.stdout and "versions" in result.stdout and '{"k": 1}' in result.stdout
    detail = AdapterDetail.model_validate_json(run(cli, "show", "sdk-cli", "--json").stdout)
    assert (detail.version, detail.description, [v.version for v in detail.versions]) == (2, "second", [1, 2])

    result = run(cli, "download", "sdk-cli@1", str(tmp_path / "cli.safetensors"))
    assert result.exit_code == 0, result.output
    assert hashlib.sha256((tmp_path / "cli.safetensors").read_bytes()).hexdigest() == uploaded.sha256
    result = run(cli, "download", "sdk-cli", str(tmp_path / "peft"), "--format", "peft")
    assert result.exit_code == 0, result.output
    assert {path.name for path in (tmp_path / "peft").iterdir()} == PEFT_FILES

    result = run(cli, "delete", "sdk-cli", input="n\n")
    assert result.exit_code == 1
    assert "Delete adapter sdk-cli and every version of it?" in result.output
    assert client.get_adapter("sdk-cli").version == 2
    result = run(cli, "delete", "sdk-cli@1", input="y\n")
    assert result.exit_code == 0, result.output
    assert "Deleted sdk-cli (version 1)" in result.stdout
    deleted = AdapterDeleted.model_validate_json(run(cli, "delete", "sdk-cli", "--yes", "--json").stdout)
    assert (deleted.id, deleted.versions) == ("sdk-cli", [2])
    assert run(cli, "list", "--prefix", "sdk-").stdout == "No adapters with ids starting 'sdk-'.\n"


def test_cli_errors(cli: CliRunner, client: SpectraClient, bad_file: Path) -> None:
    with pytest.raises(SpectraAPIError) as caught:
        client.upload_adapter("sdk-cli-bad", bad_file)
    result = run(cli, "upload", "sdk-cli-bad", str(bad_file))
    assert result.exit_code == 1
    assert result.stderr == f"error (422): {caught.value.message}\n"
    assert result.stdout == ""

    result = run(cli, "show", "sdk-missing")
    assert (result.exit_code, result.stderr) == (1, "error (404): adapter 'sdk-missing' not found\n")
    result = run(cli, "delete", "sdk-missing", "--yes")
    assert (result.exit_code, result.stderr) == (1, "error (404): adapter 'sdk-missing' not found\n")

    result = run(cli, "upload", "sdk-cli-bad", str(bad_file), "--metadata", "[1]")
    assert result.exit_code == 2 and "must be a JSON object" in result.output

    result = run(cli, "--url", unused_url(), "list")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot connect to the Spectra server at http://127.0.0.1:")


def test_cli_console_entry_point(http_server: Server, client: SpectraClient, native_file: Path) -> None:
    client.upload_adapter("sdk-sub", native_file)
    command = [sys.executable, "-m", "clients.cli", "adapters", "--url", http_server.base_url, "list", "--prefix"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "160"}
    env.pop("SPECTRA_URL", None)
    table = subprocess.run([*command, "sdk-sub"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "sdk-sub" in table.stdout
    listed = subprocess.run(
        [*command, "sdk-", "--json"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert [adapter["id"] for adapter in json.loads(listed.stdout)["data"]] == ["sdk-sub"]
