"""``spectra serve --replicas 1 --ray-address HOST:PORT``: joining a Ray cluster someone else runs.

The cluster is started with Ray's own ``ray start --head`` on loopback and stopped with ``ray stop`` (the
command that owns it), in a temporary ``--temp-dir``. Stopping the server must remove only its application:
the cluster, and Serve's proxy with it, stay up for their owner.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.http_fixtures import free_port

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures", "tests.postgres_fixtures"]

RAY = Path(sys.executable).with_name("ray")
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def _ray(*args: str, temp_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RAY), *args],
        env={**os.environ, **RAY_ENV, "RAY_TMPDIR": temp_dir},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def ray_head() -> Iterator[str]:
    """``HOST:PORT`` of a Ray head node on loopback, stopped by ``ray stop`` afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="spectra-rj-", dir="/tmp")
    port = free_port()
    started = _ray(
        "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
        "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir,
        temp_dir=temp_dir,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stopped = _ray("stop", "--force", temp_dir=temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_a_server_joins_an_existing_cluster_and_leaves_it_running(
    ray_head: str, tiny_llama_dir: Path, postgres_url: str, tmp_path: Path
) -> None:
    from tests.http_fixtures import start_server
    from tests.postgres_fixtures import fresh_database

    server: Server = start_server(
        tiny_llama_dir, tmp_path, {}, "--store", fresh_database(postgres_url), "--replicas", "1",
        "--ray-address", ray_head, env=RAY_ENV,
    )  # fmt: skip
    try:
        body = {"inputs": "Spectral", "parameters": {"max_new_tokens": 4}}
        response = httpx.post(f"{server.base_url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["x-spectra-replica"]
    finally:
        server.process.terminate()
        assert server.process.wait(timeout=60) == 0, server.log_tail()
    # The application is gone, the proxy (the cluster's) still answers, and the cluster is alive.
    assert httpx.post(f"{server.base_url}/generate", json=body, timeout=30).status_code == 404
    status = subprocess.run([str(RAY), "status", "--address", ray_head], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
