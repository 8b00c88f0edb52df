"""Load test: many concurrent streaming clients on the real server, a mix of adapters and both API families.

Against ``spectra serve`` as a subprocess (the embedded default model: no ``--model``), or ``--url`` for one
that is already running:

1. Upload ``--adapters`` random native FourierFT adapters through ``POST /v1/adapters``, as users do (n per module
   on q_proj and v_proj, each with its own location seed).
2. ``--clients`` asyncio clients loop for ``--duration-s``: pick the base model (``--base-fraction``) or a random
   adapter, an endpoint (``/generate_stream``, ``/v1/completions`` or ``/v1/chat/completions`` with
   ``stream: true``), greedy or sampled, a random prompt and ``max_new_tokens``; read the stream to its end,
   checking its shape; then the next request. 429s are counted apart and retried after ``Retry-After``. Every
   other status, a malformed or cut stream, an error event in a stream, or a transport error is an error.
3. Meanwhile the server's RSS (``/proc/PID/status``), CPU time and ``/info`` queue depth are sampled every second.

Reported: TTFT p50/p99 (from the request's first attempt to its first token event: the first TGI token event,
the first OpenAI chunk with choices after chat's role chunk), generated tokens/s over the window (tokens
timestamped as they arrive; a request still running at the deadline finishes, but its later tokens are not
counted), requests completed, 429s, errors, RSS 10 s in and at the end. Exits 1 if there was any error, if the
server died, or if the end RSS is not within ``--rss-tolerance`` of the 10 s RSS.

Usage: ``PYTHONPATH=. .venv/bin/python bench/load.py [--clients 200] [--duration-s 60] [--adapters 100] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from bench.common import (
    cpu_model,
    percentile,
    random_fourierft,
    report_header,
    rss_bytes,
    running_server,
    target_shapes,
    wait_for_quiet_machine,
    write_report,
)
from clients.sdk import SSELineSplitter
from server.spectral.adapter import SpectralAdapter
from server.spectral.formats import native

SCALING = 150.0
ENDPOINTS = ("tgi", "completions", "chat")
PATHS = {"tgi": "/generate_stream", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
RSS_BASELINE_S = 10.0
SAMPLE_INTERVAL_S = 1.0
MAX_ERROR_SAMPLES = 20
PROMPT_WORDS = (
    "spectral adapters serve many tenants from one frozen model; each request names its own fine-tune and "
    "the batch mixes them all in one forward pass over the shared weights while tokens stream back"
)
WORDS = PROMPT_WORDS.split()


# -- adapters ----------------------------------------------------------------------------------------------------


def make_adapter(shapes: dict[str, tuple[int, int]], n: int, seed: int) -> SpectralAdapter:
    """Random coefficients and its own ``random_loc_seed``, both ``seed``."""
    return random_fourierft(shapes, n, coefficient_seed=seed, location_seed=seed, scaling=SCALING)


def upload_adapters(client: httpx.Client, shapes: dict[str, tuple[int, int]], args: argparse.Namespace) -> dict:
    ids, upload_s, sizes = [], [], []
    for index in range(args.adapters):
        adapter_id = f"load/a{index:03d}"
        data = native.to_bytes(make_adapter(shapes, args.n_frequency, args.seed * 100_000 + index))
        started = time.perf_counter()
        response = client.post(
            "/v1/adapters", data={"adapter_id": adapter_id}, files={"file": ("adapter.safetensors", data)}
        )
        if response.status_code != 201:
            raise RuntimeError(f"upload of {adapter_id} failed: {response.status_code} {response.text}")
        upload_s.append(time.perf_counter() - started)
        ids.append(adapter_id)
        sizes.append(len(data))
    return {
        "ids": ids,
        "bytes_each": sizes[0] if sizes else 0,
        "upload_ms": {
            "p50": round(1000 * percentile(upload_s, 50), 2) if upload_s else None,
            "p99": round(1000 * percentile(upload_s, 99), 2) if upload_s else None,
        },
    }


# -- one streaming request ---------------------------------------------------------------------------------------


class StreamError(Exception):
    """A response the server should not have sent: wrong status, malformed or cut stream, error event."""


@dataclass
class Request:
    endpoint: str
    adapter: str | None
    prompt: str
    max_new_tokens: int
    sampled: bool
    seed: int


@dataclass
class Totals:
    """What the clients measured. Token arrivals are counted in the window only up to ``deadline``."""

    began: float
    deadline: float
    ttft_s: list[float] = field(default_factory=list)
    tokens_in_window: int = 0
    tokens_total: int = 0
    completed_in_window: int = 0
    completed_after_deadline: int = 0
    rejected_429: int = 0
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    error_samples: list[dict] = field(default_factory=list)
    by_endpoint: Counter[str] = field(default_factory=Counter)
    by_target: Counter[str] = field(default_factory=Counter)
    # Behind `spectra serve --replicas`: whether each adapter request in the window found its adapter on the
    # replica it was routed to (the `x-spectra-affinity` response header: hit or miss).
    affinity: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0

    def tokens(self, count: int) -> None:
        self.tokens_total += count
        if time.monotonic() <= self.deadline:
            self.tokens_in_window += count

    def error(self, kind: str, request: Request, request_id: str, detail: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(
                {
                    "kind": kind,
                    "endpoint": request.endpoint,
                    "adapter": request.adapter,
                    "request_id": request_id,
                    "at_s": round(time.monotonic() - self.began, 2),
                    "detail": detail[:500],
                }
            )


def request_body(request: Request, base_model: str) -> dict:
    if request.endpoint == "tgi":
        parameters: dict = {"max_new_tokens": request.max_new_tokens, "details": True}
        if request.adapter:
            parameters["adapter_id"] = request.adapter
        if request.sampled:
            parameters |= {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "seed": request.seed}
        return {"inputs": request.prompt, "parameters": parameters}
    body: dict = {
        "model": request.adapter or base_model,
        "max_tokens": request.max_new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.8 if request.sampled else 0.0,
    }
    if request.sampled:
        body |= {"top_p": 0.95, "seed": request.seed}
    if request.endpoint == "completions":
        return body | {"prompt": request.prompt}
    return body | {"messages": [{"role": "user", "content": request.prompt}]}


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines as SSE ends them (the SDK's splitter; httpx's ``aiter_lines`` also splits at U+0085)."""
    lines = SSELineSplitter()
    async for chunk in response.aiter_text():
        for line in lines.feed(chunk):
            yield line
    for line in lines.close():
        yield line


def sse_payload(line: str) -> str | None:
    """The payload of a ``data:`` line; ``None`` for blank lines, comments (keep-alive pings) and other fields."""
    if not line.startswith("data:"):
        return None
    return line.removeprefix("data:").removeprefix(" ")


class StreamReader:
    """Checks one stream event by event and reports tokens to ``totals`` as they arrive."""

    def __init__(self, request: Request, totals: Totals):
        self.request, self.totals = request, totals
        self.first_token_at: float | None = None
        self.token_events = 0
        self.generated_tokens: int | None = None
        self.finished = False
        self.done = False
        self.role_seen = False

    def feed(self, payload: str) -> None:
        if self.done:
            raise StreamError(f"data after [DONE]: {payload[:200]}")
        if payload == "[DONE]":
            if self.request.endpoint == "tgi":
                raise StreamError("[DONE] in a TGI stream")
            self.done = True
            return
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise StreamError(f"not JSON: {payload[:200]}") from exc
        if not isinstance(event, dict):
            raise StreamError(f"not an object: {payload[:200]}")
        if "error" in event:
            raise StreamError(f"error event: {payload[:300]}")
        if self.request.endpoint == "tgi":
            self._tgi(event)
        else:
            self._openai(event)

    def _first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def _tgi(self, event: dict) -> None:
        if self.finished:
            raise StreamError("TGI event after the final one")
        token = event.get("token")
        if not isinstance(token, dict) or not isinstance(token.get("id"), int):
            raise StreamError(f"TGI event without a token: {json.dumps(event)[:200]}")
        self._first_token()
        self.token_events += 1
        self.totals.tokens(1)
        details = event.get("details")
        if details is not None:
            self.finished = True
            self.generated_tokens = details.get("generated_tokens")
            if self.generated_tokens != self.token_events or not details.get("finish_reason"):
                raise StreamError(f"final event does not match the stream ({self.token_events} tokens): {details}")

    def _openai(self, event: dict) -> None:
        choices = event.get("choices")
        if not isinstance(choices, list):
            raise StreamError(f"chunk without choices: {json.dumps(event)[:200]}")
        if not choices:  # the usage chunk (stream_options.include_usage), after the finishing chunk
            usage = event.get("usage") or {}
            tokens = usage.get("completion_tokens")
            if not self.finished or not isinstance(tokens, int) or tokens < self.token_events:
                raise StreamError(f"bad usage chunk after {self.token_events} token chunks: {event}")
            self.generated_tokens = tokens
            self.totals.tokens(tokens - self.token_events)  # special tokens (eos) have no chunk of their own
            return
        if self.finished or self.generated_tokens is not None:
            raise StreamError(f"chunk after the finishing chunk: {json.dumps(event)[:200]}")
        choice = choices[0]
        if self.request.endpoint == "chat" and not self.role_seen:
            if (choice.get("delta") or {}).get("role") != "assistant":
                raise StreamError(f"chat stream does not start with the assistant role: {event}")
            self.role_seen = True
            return
        self._first_token()
        if choice.get("finish_reason"):
            self.finished = True
            return
        self.token_events += 1
        self.totals.tokens(1)

    def close(self) -> int:
        """Check the stream ended properly; the number of generated tokens."""
        if self.request.endpoint == "tgi":
            if not self.finished:
                raise StreamError(f"TGI stream cut after {self.token_events} tokens")
        elif not self.done or self.generated_tokens is None:
            raise StreamError(f"OpenAI stream cut after {self.token_events} tokens (no usage or no [DONE])")
        if self.first_token_at is None or not self.generated_tokens:
            raise StreamError("stream finished without a token")
        return self.generated_tokens


def retry_after_s(response: httpx.Response) -> float:
    """``Retry-After`` in seconds; 1 s when it is missing or an HTTP date (the server sends seconds)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


async def run_request(
    client: httpx.AsyncClient, request: Request, request_id: str, base_model: str, totals: Totals
) -> None:
    """One request to its end, retrying 429s after ``Retry-After``; records TTFT and tokens or an error."""
    body = request_body(request, base_model)
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        headers = {"X-Request-Id": f"{request_id}.{attempt}"}
        reader = StreamReader(request, totals)
        try:
            async with client.stream("POST", PATHS[request.endpoint], json=body, headers=headers) as response:
                if response.status_code == 429:
                    totals.rejected_429 += 1
                    retry_after = retry_after_s(response)
                    await response.aread()
                    if time.monotonic() + retry_after > totals.deadline:
                        return  # the window is over: a rejected request is not retried past it
                    await asyncio.sleep(retry_after)
                    continue
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise StreamError(f"HTTP {response.status_code}: {text[:300]}")
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise StreamError(f"content-type {response.headers.get('content-type')!r}")
                affinity = response.headers.get("x-spectra-affinity")
                if affinity is not None and time.monotonic() <= totals.deadline:
                    totals.affinity[affinity] += 1
                async for line in sse_lines(response):
                    payload = sse_payload(line)
                    if payload is not None:
                        reader.feed(payload)
            reader.close()
        except StreamError as exc:
            kind = str(exc).split(":", 1)[0] if str(exc).startswith("HTTP ") else "stream"
            totals.error(kind, request, headers["X-Request-Id"], str(exc))
            return
        except httpx.HTTPError as exc:
            totals.error(type(exc).__name__, request, headers["X-Request-Id"], repr(exc))
            return
        break
    assert reader.first_token_at is not None
    totals.ttft_s.append(reader.first_token_at - started)
    if time.monotonic() <= totals.deadline:
        totals.completed_in_window += 1
    else:
        totals.completed_after_deadline += 1
    totals.by_endpoint[request.endpoint] += 1
    totals.by_target["base" if request.adapter is None else "adapter"] += 1


def next_request(rng: random.Random, adapters: list[str], args: argparse.Namespace) -> Request:
    words = rng.randint(args.min_prompt_words, args.max_prompt_words)
    return Request(
        endpoint=rng.choice(args.endpoints),
        adapter=None if not adapters or rng.random() < args.base_fraction else rng.choice(adapters),
        prompt=" ".join(rng.choice(WORDS) for _ in range(words)),
        max_new_tokens=rng.randint(args.min_new_tokens, args.max_new_tokens),
        sampled=rng.random() < args.sampled_fraction,
        seed=rng.randrange(2**31),
    )


async def client_loop(
    index: int,
    client: httpx.AsyncClient,
    adapters: list[str],
    base_model: str,
    totals: Totals,
    args: argparse.Namespace,
) -> None:
    rng = random.Random(args.seed * 1_000_003 + index)
    sequence = 0
    while time.monotonic() < totals.deadline:
        sequence += 1
        totals.in_flight += 1
        try:
            await run_request(client, next_request(rng, adapters, args), f"load-{index}-{sequence}", base_model, totals)
        finally:
            totals.in_flight -= 1


# -- server sampling ---------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU time all cores have been busy since boot (``/proc/stat``: everything but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pid: int | None) -> dict[str, float | None]:
    return {
        "machine": machine_busy_s(),
        "client": time.process_time(),
        "server": cpu_seconds(pid) if pid is not None else None,
    }


def cpu_cores(before: dict[str, float | None], after: dict[str, float | None], seconds: float) -> dict:
    """Cores used between two snapshots by the server, this client, and everything else on the machine."""
    used = {}
    for name, start in before.items():
        end = after[name]
        if start is not None and end is not None:
            used[name] = (end - start) / seconds
    if "server" in used:
        used["other"] = used["machine"] - used["server"] - used["client"]
    return {name: round(value, 2) for name, value in used.items()}


async def sample_server(
    client: httpx.AsyncClient, pid: int | None, totals: Totals, stop: asyncio.Event, samples: list[dict]
) -> None:
    """Every second: the server's RSS and CPU time (if its pid is known), queued and running requests, the
    machine's busy CPU time and the tokens received so far."""
    while not stop.is_set():
        sample: dict = {
            "t_s": round(time.monotonic() - totals.began, 2),
            "tokens": totals.tokens_total,
            "machine_cpu_s": round(machine_busy_s(), 2),
        }
        if pid is not None:
            try:
                sample["rss_bytes"] = rss_bytes(pid)
                sample["cpu_s"] = round(cpu_seconds(pid), 2)
            except (OSError, RuntimeError):
                sample["rss_bytes"] = None
        try:
            info = (await client.get("/info", timeout=10)).json()
            sample["queued"] = info["queued_requests"]
            sample["running"] = info["running_requests"]
            sample["resident_adapters"] = info["adapters"]["resident"]
        except (httpx.HTTPError, KeyError, ValueError):
            sample["queued"] = None
        samples.append(sample)
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)


def rss_check(samples: list[dict], duration_s: float, tolerance: float) -> dict:
    """RSS at ``RSS_BASELINE_S`` (the first sample from then on) and at the end (the last sample in the window)."""
    with_rss = [sample for sample in samples if sample.get("rss_bytes")]
    baseline = next((sample for sample in with_rss if sample["t_s"] >= RSS_BASELINE_S), None)
    in_window = [sample for sample in with_rss if sample["t_s"] <= duration_s + SAMPLE_INTERVAL_S]
    if baseline is None or not in_window:
        return {"measured": False}
    end = in_window[-1]
    ratio = end["rss_bytes"] / baseline["rss_bytes"]
    return {
        "measured": True,
        "baseline_t_s": baseline["t_s"],
        "rss_baseline_bytes": baseline["rss_bytes"],
        "end_t_s": end["t_s"],
        "rss_end_bytes": end["rss_bytes"],
        "rss_end_over_baseline": round(ratio, 4),
        "rss_max_bytes": max(sample["rss_bytes"] for sample in in_window),
        "tolerance": tolerance,
        "pass": abs(ratio - 1) <= tolerance,
    }


# -- driver ------------------------------------------------------------------------------------------------------


async def load(
    base_url: str, pid: int | None, adapters: list[str], base_model: str, args: argparse.Namespace
) -> tuple[Totals, list[dict], float, dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.request_timeout_s, connect=30.0)
    # One client (one connection) per simulated user, as real users have, and because one shared pool of
    # hundreds of connections costs httpcore O(connections x waiting requests) per request (pool assignment): in
    # a trial with 429 retries that took ~0.9 cores of this process, as much as the server got.
    ssl_context = httpx.create_ssl_context()  # unused over http, but each client would otherwise build its own
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, verify=ssl_context)
            )
            for _ in range(args.clients)
        ]
        monitor = await stack.enter_async_context(
            httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10, verify=ssl_context)
        )
        began = time.monotonic()
        totals = Totals(began=began, deadline=began + args.duration_s)
        stop = asyncio.Event()
        samples: list[dict] = []
        cpu_before = cpu_snapshot(pid)
        sampler = asyncio.create_task(sample_server(monitor, pid, totals, stop, samples))
        tasks = [
            asyncio.create_task(client_loop(index, client, adapters, base_model, totals, args))
            for index, client in enumerate(clients)
        ]
        await asyncio.sleep(args.duration_s)
        cpu = cpu_cores(cpu_before, cpu_snapshot(pid), time.monotonic() - began)
        print(
            f"window over; {totals.in_flight} requests in flight finish (<= {args.drain_timeout_s:.0f} s)", flush=True
        )
        _, pending = await asyncio.wait(tasks, timeout=args.drain_timeout_s)
        hung = totals.in_flight
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if hung:
            totals.errors += hung
            totals.error_kinds["hung"] += hung
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                totals.errors += 1
                totals.error_kinds["client_crash"] += 1
                totals.error_samples.append({"kind": "client_crash", "detail": repr(task.exception())[:500]})
        stop.set()
        await sampler
        drain_s = time.monotonic() - totals.deadline
    return totals, samples, drain_s, cpu


@contextmanager
def target_server(work: Path, args: argparse.Namespace) -> Iterator[tuple[str, int | None, Path | None]]:
    """(base URL, pid, log) of the server under test: ``--url`` as given, or a fresh subprocess."""
    if args.url:
        yield args.url.rstrip("/"), args.server_pid, None
        return
    serve_args = [
        "--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue),
        "--torch-threads", str(args.server_threads), *shlex.split(args.serve_args),
    ]  # fmt: skip
    # A server started here gets --api-key as its admin key (through the environment, as docs/security.md
    # advises, so that it does not show in ps); without one it is open, as on loopback by default.
    saved = os.environ.get("SPECTRA_API_KEY")
    if args.api_key:
        os.environ["SPECTRA_API_KEY"] = args.api_key
    try:
        with running_server(work, *serve_args) as server:
            yield server.base_url, server.pid, server.log_path
    finally:
        if saved is None:
            os.environ.pop("SPECTRA_API_KEY", None)
        else:
            os.environ["SPECTRA_API_KEY"] = saved


def server_log_problems(log_path: Path | None) -> dict:
    if log_path is None or not log_path.exists():
        return {}
    lines = log_path.read_text(errors="replace").splitlines()
    bad = [line for line in lines if "Traceback" in line or "ERROR" in line or "CRITICAL" in line]
    return {"lines": len(lines), "error_lines": len(bad), "error_samples": bad[:20]}


def run(work: Path, args: argparse.Namespace) -> dict:
    with target_server(work, args) as (base_url, pid, log_path):
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
            info = client.get("/info")
            info.raise_for_status()
            base_model, model_path = info.json()["model_id"], Path(info.json()["model_path"])
            shapes = target_shapes(model_path)
            uploaded = upload_adapters(client, shapes, args)
            print(
                f"uploaded {args.adapters} adapters ({uploaded['bytes_each'] / 1024:.0f} KB each, n={args.n_frequency}"
                f" on {len(shapes)} modules), upload p50 {uploaded['upload_ms']['p50']} ms",
                flush=True,
            )
            if args.warm_adapters:  # every adapter resident (and, behind replicas, routed) before the window
                for adapter_id in uploaded["ids"]:
                    body = {"inputs": "warm up", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 1}}
                    client.post("/generate", json=body).raise_for_status()
            for endpoint in args.endpoints:  # torch's first-call costs, outside the window
                warm = Request(endpoint, uploaded["ids"][0] if uploaded["ids"] else None, "warm up", 4, False, 0)
                warm_totals = Totals(began=time.monotonic(), deadline=time.monotonic() + 600)
                asyncio.run(warm_up(base_url, headers, warm, base_model, warm_totals))
                if warm_totals.errors:
                    raise RuntimeError(f"warm-up request failed: {warm_totals.error_samples}")
        loadavg_before = Path("/proc/loadavg").read_text().strip()
        print(
            f"load test: {args.clients} clients for {args.duration_s:.0f} s; /proc/loadavg {loadavg_before}", flush=True
        )
        totals, samples, drain_s, cpu = asyncio.run(load(base_url, pid, uploaded["ids"], base_model, args))
        loadavg_after = Path("/proc/loadavg").read_text().strip()
        server_alive = pid is None or Path(f"/proc/{pid}").exists()
        healthy = False
        with suppress(httpx.HTTPError):
            healthy = httpx.get(f"{base_url}/health", headers=headers, timeout=10).status_code == 200
    queued = [sample["queued"] for sample in samples if sample.get("queued") is not None]
    rss = rss_check(samples, args.duration_s, args.rss_tolerance)
    ttft = totals.ttft_s
    return {
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
        "base_model": base_model,
        "adapters": {key: value for key, value in uploaded.items() if key != "ids"} | {"count": len(uploaded["ids"])},
        "requests_completed": totals.completed_in_window,
        "requests_completed_after_deadline": totals.completed_after_deadline,
        "completed_by_endpoint": dict(totals.by_endpoint),
        "completed_by_target": dict(totals.by_target),
        "ttft_ms": {
            "p50": round(1000 * percentile(ttft, 50), 1) if ttft else None,
            "p90": round(1000 * percentile(ttft, 90), 1) if ttft else None,
            "p99": round(1000 * percentile(ttft, 99), 1) if ttft else None,
            "max": round(1000 * max(ttft), 1) if ttft else None,
        },
        "tokens_in_window": totals.tokens_in_window,
        "tokens_per_s": round(totals.tokens_in_window / args.duration_s, 1),
        "tokens_total": totals.tokens_total,
        "rejected_429": totals.rejected_429,
        "affinity": dict(totals.affinity),
        "affinity_hit_rate": round(totals.affinity["hit"] / sum(totals.affinity.values()), 4)
        if totals.affinity
        else None,
        "errors": totals.errors,
        "error_kinds": dict(totals.error_kinds),
        "error_samples": totals.error_samples,
        "drain_s": round(drain_s, 2),
        "queued_max": max(queued, default=None),
        "queued_median": sorted(queued)[len(queued) // 2] if queued else None,
        "cpu_cores_in_window": cpu,
        "rss": rss,
        "server_alive": server_alive,
        "server_healthy_after": healthy,
        "server_log": server_log_problems(log_path),
        "samples": samples,
    }


async def warm_up(base_url: str, headers: dict, request: Request, base_model: str, totals: Totals) -> None:
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
        await run_request(client, request, f"load-warmup-{request.endpoint}", base_model, totals)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv``: the command line (default ``sys.argv``); bench/scale_out.py passes its own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 clients, 10 adapters, 15 s")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--n-frequency", type=int, default=1000, help="FourierFT coefficients per module")
    parser.add_argument("--base-fraction", type=float, default=0.1, help="share of requests to the base model")
    parser.add_argument("--sampled-fraction", type=float, default=0.5, help="share sampled (rest greedy)")
    parser.add_argument(
        "--endpoints", type=lambda text: text.split(","), default=list(ENDPOINTS), help="of tgi,completions,chat"
    )
    parser.add_argument("--min-new-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-prompt-words", type=int, default=4)
    parser.add_argument("--max-prompt-words", type=int, default=24)
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's --max-batch-size")
    parser.add_argument("--max-queue", type=int, default=256, help="the server's --max-queue")
    parser.add_argument("--server-threads", type=int, default=0, help="the server's --torch-threads (0 = auto)")
    parser.add_argument("--serve-args", default="", help="more `spectra serve` arguments, one shell-quoted string")
    parser.add_argument("--url", help="test this running server instead of starting one (RSS needs --server-pid)")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's pid, for RSS and CPU")
    parser.add_argument(
        "--api-key",
        help="sent as `Authorization: Bearer KEY` on every request; a server started here gets it as its key",
    )
    parser.add_argument("--request-timeout-s", type=float, default=120.0)
    parser.add_argument("--drain-timeout-s", type=float, default=60.0, help="longest wait for in-flight requests")
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="end RSS within this of the 10 s RSS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warm-adapters", action="store_true", help="one 1-token request per adapter before the window"
    )
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load below this")
    parser.add_argument("--load-wait-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.adapters, args.duration_s = 20, 10, 15.0
    unknown = set(args.endpoints) - set(ENDPOINTS)
    if unknown:
        parser.error(f"unknown endpoints {sorted(unknown)}; choose from {','.join(ENDPOINTS)}")
    if args.min_new_tokens > args.max_new_tokens or args.min_prompt_words > args.max_prompt_words:
        parser.error("a --min-* is above its --max-*")
    return args


def print_summary(result: dict, args: argparse.Namespace) -> None:
    rss = result["rss"]
    mib = 2**20
    print(
        f"\n== {args.clients} clients, {args.duration_s:.0f} s, {result['adapters']['count']} adapters\n"
        f"completed {result['requests_completed']} (+{result['requests_completed_after_deadline']} after the"
        f" window), {result['tokens_per_s']} tok/s\n"
        f"TTFT p50 {result['ttft_ms']['p50']} ms, p99 {result['ttft_ms']['p99']} ms\n"
        f"429s {result['rejected_429']}, errors {result['errors']} {result['error_kinds'] or ''}\n"
        f"queue depth max {result['queued_max']}, median {result['queued_median']}; CPU cores used in the window"
        f" {result['cpu_cores_in_window']}"
    )
    if rss["measured"]:
        verdict = "pass" if rss["pass"] else "FAIL"
        print(
            f"RSS at {rss['baseline_t_s']} s {rss['rss_baseline_bytes'] / mib:.1f} MiB, at {rss['end_t_s']} s"
            f" {rss['rss_end_bytes'] / mib:.1f} MiB: x{rss['rss_end_over_baseline']} ({verdict},"
            f" within {args.rss_tolerance:.0%})"
        )
    else:
        print(f"RSS not measured (no server pid, or a window shorter than {RSS_BASELINE_S:.0f} s)")
    for sample in result["error_samples"][:5]:
        print(f"  error: {sample}")
    if result["server_log"].get("error_lines"):
        print(f"server log: {result['server_log']['error_lines']} error lines, e.g.")
        for line in result["server_log"]["error_samples"][:5]:
            print(f"  {line}")


def main() -> None:
    args = parse_args()
    load_at_start = wait_for_quiet_machine(args.max_load, args.load_wait_s)
    print(f"torch {torch.__version__}, {cpu_model()}, load {load_at_start:.2f}", flush=True)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        result = run(Path(tmp), args)
    print_summary(result, args)
    report = {**report_header("load", args, load_at_start, began), **result}
    write_report(report, args.out)
    failed = (
        result["errors"] > 0
        or not result["server_alive"]
        or not result["server_healthy_after"]
        or (result["rss"]["measured"] and not result["rss"]["pass"])
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
