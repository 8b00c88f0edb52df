"""``kill -9`` of the server during a burst of concurrent uploads, then a restart on the same data dir.

Every upload that got its 201 must be listed and servable with the exact bytes sent. An upload
in flight at the kill may or may not have committed (its 201 can be lost after the commit), so
what is visible must be a subset of what was sent, each with the bytes sent for that id, and
nothing half-written may remain: no temp files, no blob without a listed version.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from server.engine.model_runner import ModelRunner
from server.spectral.formats import native
from tests.engine_fixtures import random_adapter
from tests.http_fixtures import start_server, stop_server

if TYPE_CHECKING:
    from tests.http_fixtures import Server

UPLOADS = 80
CONCURRENCY = 8
KILL_AFTER_ACKS = 20


def _burst_then_kill(server: Server, files: dict[str, bytes]) -> dict[str, str]:
    """Upload ``files`` concurrently and SIGKILL the server after ``KILL_AFTER_ACKS`` 201s; returns acked id -> sha."""
    acked: dict[str, str] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def send(adapter_id: str) -> None:
        try:
            response = httpx.post(
                f"{server.base_url}/v1/adapters",
                data={"adapter_id": adapter_id},
                files={"file": ("a.safetensors", files[adapter_id])},
                timeout=30,
            )
        except httpx.TransportError:
            return
        if response.status_code == 201:
            with lock:
                acked[adapter_id] = response.json()["sha256"]
                if len(acked) >= KILL_AFTER_ACKS:
                    enough.set()

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for adapter_id in files:
            pool.submit(send, adapter_id)
        assert enough.wait(120), f"only {len(acked)} uploads acknowledged"
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        with lock:
            acknowledged_at_kill = dict(acked)
    return acknowledged_at_kill


@pytest.mark.timeout(300)
def test_kill_9_during_concurrent_uploads_loses_no_acknowledged_upload(tiny_llama_dir: Path, tmp_path: Path) -> None:
    shapes = ModelRunner(tiny_llama_dir, dtype="float32", device="cpu").module_shapes
    files = {f"crash/a{index:03d}": native.to_bytes(random_adapter(shapes, 5000 + index)) for index in range(UPLOADS)}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    acked = _burst_then_kill(start_server(tiny_llama_dir, data_dir, {}), files)
    assert len(acked) < UPLOADS, "the kill came after the burst; nothing was in flight"

    server = start_server(tiny_llama_dir, data_dir, {})
    try:
        listing = httpx.get(f"{server.base_url}/v1/adapters", params={"limit": 1000}).json()
        visible = {item["id"]: item for item in listing["data"]}
        assert set(acked) <= set(visible), f"lost acknowledged uploads: {sorted(set(acked) - set(visible))}"
        assert set(visible) <= set(files), f"unknown ids appeared: {sorted(set(visible) - set(files))}"
        for adapter_id, item in visible.items():
            assert item["version"] == 1 and item["status"] == "ready"
            assert item["sha256"] == hashlib.sha256(files[adapter_id]).hexdigest()
            download = httpx.get(f"{server.base_url}/v1/adapters/{adapter_id}/download", timeout=30)
            assert download.content == files[adapter_id], adapter_id

        store = data_dir / "adapters" / "blobs"
        assert list((store / "tmp").iterdir()) == [], "temp files left after recovery"
        blob_names = {path.name for path in store.glob("??/*")}
        assert blob_names == {item["sha256"] for item in visible.values()}, "blobs without a listed version"

        def generate(adapter_id: str) -> int:
            body = {"inputs": "after the crash", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 4}}
            return httpx.post(f"{server.base_url}/generate", json=body, timeout=60).status_code

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            assert set(pool.map(generate, visible)) == {200}
    finally:
        stop_server(server)
