"""What the benchmark scripts share: the machine's state, percentiles, and the real server as a subprocess."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from server.engine.model_runner import ModelRunner
from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.fourierft import peft_locations

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 300.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet_machine(max_load: float, max_wait_s: float) -> float:
    """Other engineers' test runs share these 2 cores; start when they are idle, or give up waiting."""
    deadline = time.monotonic() + max_wait_s
    load = load_1min()
    while load >= max_load and time.monotonic() < deadline:
        print(f"1-minute load {load:.2f} >= {max_load}; waiting", flush=True)
        time.sleep(15)
        load = load_1min()
    return load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    pid: int
    log_path: Path


@contextmanager
def running_server(work: Path, *serve_args: str) -> Iterator[RunningServer]:
    """``spectra serve --data-dir work/data ...`` in a subprocess, yielded once ``/health`` answers 200."""
    port = free_port()
    command = [
        sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(work / "data"), "--port", str(port),
        "--dtype", "float32", "--device", "cpu", "--log-level", "warning", *serve_args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log_path = work / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not healthy after {SERVER_START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield RunningServer(base_url, process.pid, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def generate_exactly(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` per row (no early stop), as every competitor must."""
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **kwargs,
    )


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def report_header(benchmark: str, args: argparse.Namespace, load_at_start: float, began: float) -> dict:
    """What every JSON report starts with: when, where, how loaded the machine was, with which arguments."""
    return {
        "benchmark": benchmark,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "load_1min": {"start": load_at_start, "end": load_1min()},
        "runtime_s": round(time.perf_counter() - began, 1),
        "params": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
    }


def target_shapes(model_dir: Path, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> dict[str, tuple[int, int]]:
    """The (d_out, d_in) of the served model's layers named like ``targets``."""
    shapes = ModelRunner(model_dir, dtype="float32", device="cpu").module_shapes
    return {name: shape for name, shape in shapes.items() if name.endswith(targets)}


def random_fourierft(
    shapes: dict[str, tuple[int, int]], n: int, *, coefficient_seed: int, location_seed: int, scaling: float = 150.0
) -> SpectralAdapter:
    """FourierFT on ``shapes``: PEFT's locations drawn from ``location_seed``, normal coefficients."""
    generator = torch.Generator().manual_seed(coefficient_seed)
    modules = {}
    for name, shape in sorted(shapes.items()):
        count = min(n, shape[0] * shape[1])
        rows, cols = peft_locations(location_seed, shape, count)
        modules[name] = ModuleSpectrum(torch.randn(count, generator=generator), rows, cols, shape, scaling)
    return SpectralAdapter("fourierft", modules, norm="backward", seed=location_seed)
