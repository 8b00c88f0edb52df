"""Two real ``spectra serve --store postgresql://...`` processes on one database: what one stores, both serve.

Each replica has its own ``--data-dir`` and shares the store (training files and jobs: tests/test_replicas_jobs.py),
here the adapters. An id B has never seen resolves through the store on a miss, so an upload acknowledged by A is
listed, downloadable and servable by B. Deletes reaching B's resident adapters need the change feed (not yet).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.test_adapters_api import greedy, peft_files, upload

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures", "tests.postgres_fixtures"]


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir: Path, postgres_url: str, tmp_path_factory) -> Iterator[tuple[Server, Server]]:
    from tests.http_fixtures import start_server, stop_server
    from tests.postgres_fixtures import fresh_database

    database = fresh_database(postgres_url)
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            servers.append(
                start_server(tiny_llama_dir, tmp_path_factory.mktemp(f"replica-{name}"), {}, "--store", database)
            )
        yield servers[0], servers[1]
    finally:
        for server in servers:
            stop_server(server)


def test_an_upload_to_one_replica_is_listed_downloaded_and_served_by_the_other(
    replicas: tuple[Server, Server], peft_adapter_dirs: dict[str, Path]
) -> None:
    a, b = replicas
    base = greedy(b, None)
    response = upload(a, "team/shared", peft_files(peft_adapter_dirs["alpha"]))
    assert response.status_code == 201, response.text
    sha256 = response.json()["sha256"]
    listing = httpx.get(f"{b.base_url}/v1/adapters", timeout=10).json()["data"]
    assert [(item["id"], item["version"], item["sha256"]) for item in listing] == [("team/shared", 1, sha256)]
    download = httpx.get(f"{b.base_url}/v1/adapters/team/shared/download", params={"format": "native"}, timeout=10)
    assert download.status_code == 200, download.text
    assert hashlib.sha256(download.content).hexdigest() == sha256
    tokens = greedy(b, "team/shared")
    assert tokens == greedy(a, "team/shared") and tokens != base


def test_versions_are_numbered_across_replicas(
    replicas: tuple[Server, Server], peft_adapter_dirs: dict[str, Path]
) -> None:
    a, b = replicas
    versions = [
        upload(server, "team/counted", peft_files(peft_adapter_dirs["beta"])).json()["version"] for server in (a, b, a)
    ]
    assert versions == [1, 2, 3]
    assert httpx.get(f"{a.base_url}/v1/adapters/team/counted", timeout=10).json()["version"] == 3
