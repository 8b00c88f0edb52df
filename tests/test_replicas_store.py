"""Two real ``spectra serve --store postgresql://...`` processes on one database: what one stores, both serve.

Each replica has its own ``--data-dir`` and shares the store (training files and jobs: tests/test_replicas_jobs.py),
here the adapters. An id B has never seen resolves through the store on a miss, so an upload acknowledged by A is
listed, downloadable and servable by B at once; deletes and pins reach the other replica's resident adapters
through the change feed within a second.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from server.engine.model_runner import ModelRunner
from server.spectral.formats import native
from tests.engine_fixtures import random_adapter
from tests.test_adapters_api import greedy, peft_files, upload
from tests.test_crash_recovery import _burst_then_kill

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures", "tests.postgres_fixtures"]

FOLLOW_DEADLINE_S = 1.0


def _resident(server: Server) -> int:
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return int(
        float(next(line for line in metrics.splitlines() if line.startswith("spectra_adapters_resident ")).split()[1])
    )


def _within(deadline_s: float, condition: Callable[[], bool]) -> float:
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < deadline_s, f"not within {deadline_s} s"
        time.sleep(0.02)
    return time.monotonic() - started


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
    acknowledged = time.monotonic()
    first_tokens = greedy(b, "team/shared")
    assert time.monotonic() - acknowledged < FOLLOW_DEADLINE_S, "servable on B within a second of A's 201"
    sha256 = response.json()["sha256"]
    listing = httpx.get(f"{b.base_url}/v1/adapters", timeout=10).json()["data"]
    assert [(item["id"], item["version"], item["sha256"]) for item in listing] == [("team/shared", 1, sha256)]
    download = httpx.get(f"{b.base_url}/v1/adapters/team/shared/download", params={"format": "native"}, timeout=10)
    assert download.status_code == 200, download.text
    assert hashlib.sha256(download.content).hexdigest() == sha256
    tokens = greedy(b, "team/shared")
    assert tokens == first_tokens == greedy(a, "team/shared") and tokens != base


def test_versions_are_numbered_across_replicas(
    replicas: tuple[Server, Server], peft_adapter_dirs: dict[str, Path]
) -> None:
    a, b = replicas
    versions = [
        upload(server, "team/counted", peft_files(peft_adapter_dirs["beta"])).json()["version"] for server in (a, b, a)
    ]
    assert versions == [1, 2, 3]
    assert httpx.get(f"{a.base_url}/v1/adapters/team/counted", timeout=10).json()["version"] == 3


def test_a_delete_on_one_replica_is_404_on_the_other_and_unloads_its_copy_within_a_second(
    replicas: tuple[Server, Server], peft_adapter_dirs: dict[str, Path]
) -> None:
    a, b = replicas
    assert upload(b, "team/gone", peft_files(peft_adapter_dirs["beta"])).status_code == 201
    resident_before = _resident(a)
    greedy(a, "team/gone")
    assert _resident(a) == resident_before + 1
    assert httpx.delete(f"{b.base_url}/v1/adapters/team/gone", timeout=10).status_code == 200
    deleted = time.monotonic()
    body = {"inputs": "Spectral", "parameters": {"adapter_id": "team/gone", "max_new_tokens": 2}}
    assert httpx.post(f"{a.base_url}/generate", json=body, timeout=10).status_code == 404
    assert httpx.get(f"{a.base_url}/v1/adapters/team/gone", timeout=10).status_code == 404
    _within(FOLLOW_DEADLINE_S - (time.monotonic() - deleted), lambda: _resident(a) == resident_before)


def test_a_pinned_upload_on_one_replica_is_resident_on_the_other_within_a_second(
    replicas: tuple[Server, Server], peft_adapter_dirs: dict[str, Path]
) -> None:
    a, b = replicas
    resident_before = _resident(b)
    assert upload(a, "team/pinned", peft_files(peft_adapter_dirs["alpha"]), pin="true").status_code == 201
    _within(FOLLOW_DEADLINE_S, lambda: _resident(b) == resident_before + 1)
    assert httpx.delete(f"{a.base_url}/v1/adapters/team/pinned", timeout=10).status_code == 200
    _within(FOLLOW_DEADLINE_S, lambda: _resident(b) == resident_before)


@pytest.mark.timeout(300)
def test_kill_9_of_a_replica_during_uploads_loses_nothing_it_acknowledged_on_the_other(
    tiny_llama_dir: Path, postgres_url: str, tmp_path: Path
) -> None:
    """As tests/test_crash_recovery.py, across replicas: every 201 from A is served by B with the exact bytes;
    an upload in flight at the kill is all there or not at all."""
    from tests.http_fixtures import start_server, stop_server
    from tests.postgres_fixtures import fresh_database

    shapes = ModelRunner(tiny_llama_dir, dtype="float32", device="cpu").module_shapes
    files = {f"crash/a{index:03d}": native.to_bytes(random_adapter(shapes, 7000 + index)) for index in range(80)}
    database = fresh_database(postgres_url)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    b = start_server(tiny_llama_dir, tmp_path / "b", {}, "--store", database)
    try:
        a = start_server(tiny_llama_dir, tmp_path / "a", {}, "--store", database)
        acked = _burst_then_kill(a, files)
        assert len(acked) < len(files), "the kill came after the burst; nothing was in flight"
        listing = httpx.get(f"{b.base_url}/v1/adapters", params={"limit": 1000}, timeout=30).json()
        visible = {item["id"]: item for item in listing["data"]}
        assert set(acked) <= set(visible), f"lost acknowledged uploads: {sorted(set(acked) - set(visible))}"
        assert set(visible) <= set(files), f"unknown ids appeared: {sorted(set(visible) - set(files))}"
        for adapter_id, item in visible.items():
            assert item["version"] == 1 and item["sha256"] == hashlib.sha256(files[adapter_id]).hexdigest()
            download = httpx.get(f"{b.base_url}/v1/adapters/{adapter_id}/download", timeout=30)
            assert download.content == files[adapter_id], adapter_id
        for adapter_id in sorted(acked)[:3]:
            body = {"inputs": "after the crash", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 4}}
            assert httpx.post(f"{b.base_url}/generate", json=body, timeout=60).status_code == 200
    finally:
        stop_server(b)
