"""Real ``spectra serve`` processes for the HTTP tests: a tiny Llama with PEFT FourierFT adapters.

The servers are subprocesses on free local ports, so the tests go through uvicorn, HTTP and SSE
exactly as a client does; nothing here touches the engine in-process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.models.embedded import ensure_default_model
from tests.test_peft_parity import save_peft_adapter

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120.0
MAX_INPUT_TOKENS = 64
MAX_TOTAL_TOKENS = 4096

# (target modules, FourierFTConfig fields, seed of the initial spectrum) per served adapter id.
ADAPTERS = {
    "alpha": (["q_proj", "v_proj"], {"random_loc_seed": 123, "n_frequency": 300, "scaling": 150.0}, 11),
    "beta": (["q_proj", "v_proj", "down_proj"], {"random_loc_seed": 9, "n_frequency": 200, "scaling": 100.0}, 12),
}


@dataclass
class Server:
    base_url: str
    model_name: str
    model_dir: Path
    adapter_dirs: dict[str, Path]
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model_dir: Path,
    data_dir: Path,
    adapter_dirs: dict[str, Path],
    *extra_args: str,
    api_key: str | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """``api_key`` is sent on the start-up probes, for servers started with keys; ``env`` adds variables."""
    port = free_port()
    command = [
        sys.executable, "-m", "clients.cli", "serve",
        "--model", str(model_dir), "--data-dir", str(data_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--device", "cpu",
        "--max-input-tokens", str(MAX_INPUT_TOKENS), "--max-total-tokens", str(MAX_TOTAL_TOKENS),
        "--max-new-tokens", str(MAX_TOTAL_TOKENS),
        *(arg for adapter_id, path in adapter_dirs.items() for arg in ("--adapter", f"{adapter_id}={path}")),
        *extra_args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", "", model_dir, adapter_dirs, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.TransportError):
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            if httpx.get(f"{server.base_url}/health", headers=headers, timeout=2).status_code == 200:
                info = httpx.get(f"{server.base_url}/info", headers=headers, timeout=5)
                server.model_name = info.json()["model_id"]
                return server
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S:.0f}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=15)


@pytest.fixture(scope="session")
def peft_adapter_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        adapter_id: save_peft_adapter(
            tiny_llama_dir, tmp_path_factory.mktemp(f"http-{adapter_id}"), targets, fields, seed
        )
        for adapter_id, (targets, fields, seed) in ADAPTERS.items()
    }


@pytest.fixture(scope="session")
def http_server(
    tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(tiny_llama_dir, tmp_path_factory.mktemp("http-data"), peft_adapter_dirs)
    yield server
    stop_server(server)


# A job whose loss is not finite, by construction rather than by the luck of fp32 rounding: on a float16
# model the spectral delta (computed in fp32, about scaling * 1e-3 here) is cast to float16, so any
# |delta| > 65504 becomes inf, and inf meets the residual stream's RMSNorm as inf * rsqrt(inf) = inf * 0 =
# NaN, which attention spreads to every later position. In fp32 the same scaling is no guarantee: from
# about 1e20 to 3e37 the activations stay finite, the RMSNorm's squares overflow, rsqrt(inf) = 0 zeroes
# every hidden state and the loss is exactly ln(vocab); 1e38 sits at fp32's edge, where the outcome
# depends on the seed and on the kernels' summation order (docs/finetuning.md).
OVERFLOWING_SCALING = 1e30


@pytest.fixture(scope="session")
def float16_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The embedded default model served in float16 (see OVERFLOWING_SCALING)."""
    model_dir = ensure_default_model(tmp_path_factory.mktemp("float16-model"))
    server = start_server(model_dir, tmp_path_factory.mktemp("float16-data"), {}, "--dtype", "float16")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def single_slot_server(
    tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One running row and one queued request at most: makes queueing and cancellation observable."""
    data_dir = tmp_path_factory.mktemp("http-single-slot")
    server = start_server(tiny_llama_dir, data_dir, peft_adapter_dirs, "--max-batch-size", "1", "--max-queue", "1")
    yield server
    stop_server(server)
