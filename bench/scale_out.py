"""Scale-out: one replica against two over one PostgreSQL store, and how fast a change reaches the other replica.

Everything runs in this one process run, on a throwaway PostgreSQL cluster (``tests/postgres_fixtures.py``):

1. Propagation, two ``spectra serve --store`` processes A and B (one torch thread each): ``--uploads`` native
   adapters are uploaded to A one at a time; after each 201, B is asked for one token with the new id until it
   answers 200 (upload -> servable on the other replica). Then each id is deleted on A and B is asked until it
   answers 404, and a pinned upload on A is timed until B's ``spectra_adapters_resident`` counts it.
2. Throughput, ``spectra serve --replicas R --store ...`` behind Ray Serve's HAProxy front for R = 1 then 2, each
   replica one torch thread, under the bench/load.py mix (streaming TGI and OpenAI clients, base and
   ``--adapters`` adapters): generated tokens/s of two replicas over one (the ratio is the claim; the machine
   is noisy), and the adapter-affinity hit rate: of the adapter requests in the window, the share served by a
   replica that already had it in its routing set (the ``x-spectra-affinity`` response header).
3. The same mix against 1 then 2 plain ``spectra serve --store`` processes with no proxy, each client tied to one
   process and each process to its share of the adapters: what the machine itself gives a second replica, the
   ceiling for the Ray figure.

Targets (issue 15): throughput ratio >= 1.6, affinity hit rate >= 90% with 100 adapters, upload -> servable on
the other replica p99 <= 1 s.

Usage: ``PYTHONPATH=. .venv/bin/python bench/scale_out.py [--quick]`` (~6 min; ``--quick`` ~2 min)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench import load
from bench.common import (
    cpu_model,
    percentile,
    random_fourierft,
    report_header,
    running_server,
    target_shapes,
    wait_for_quiet_machine,
    write_report,
)
from bench.serve_throughput import LARGE_CONFIG, LARGE_MODEL
from server.models.embedded import save_tiny_model, tiny_llama_config
from server.spectral.formats import native
from tests.postgres_fixtures import fresh_database, throwaway_cluster

POLL_S = 0.005
DEADLINE_S = 10.0


def _until(condition, deadline_s: float = DEADLINE_S) -> float:
    """Seconds until ``condition()`` holds (polled every 5 ms)."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > deadline_s:
            raise RuntimeError(f"not within {deadline_s} s")
        time.sleep(POLL_S)
    return time.perf_counter() - started


def _status_of_one_token(client: httpx.Client, adapter_id: str) -> int:
    body = {"inputs": "scale out", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 1}}
    return client.post("/generate", json=body).status_code


def _resident(client: httpx.Client) -> int:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("spectra_adapters_resident "):
            return int(float(line.split()[1]))
    raise RuntimeError("no spectra_adapters_resident in /metrics")


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(1000 * percentile(values, 50), 1),
        "p99": round(1000 * percentile(values, 99), 1),
        "max": round(1000 * max(values), 1),
    }


def propagation(database: str, work: Path, args: argparse.Namespace) -> dict:
    serve = ("--store", database, "--torch-threads", "1")
    (work / "a").mkdir()
    (work / "b").mkdir()
    with running_server(work / "a", *serve) as a_server, running_server(work / "b", *serve) as b_server:
        a = httpx.Client(base_url=a_server.base_url, timeout=30)
        b = httpx.Client(base_url=b_server.base_url, timeout=30)
        shapes = target_shapes(Path(a.get("/info").json()["model_path"]))
        servable, gone, pinned = [], [], []
        for index in range(args.uploads):
            adapter_id = f"spread/a{index:03d}"
            data = native.to_bytes(random_fourierft(shapes, 64, coefficient_seed=index, location_seed=index))
            response = a.post("/v1/adapters", data={"adapter_id": adapter_id}, files={"file": ("a.safetensors", data)})
            response.raise_for_status()
            servable.append(_until(lambda adapter_id=adapter_id: _status_of_one_token(b, adapter_id) == 200))
        for index in range(args.uploads):
            adapter_id = f"spread/a{index:03d}"
            a.delete(f"/v1/adapters/{adapter_id}").raise_for_status()
            gone.append(_until(lambda adapter_id=adapter_id: _status_of_one_token(b, adapter_id) == 404))
        for index in range(args.pins):
            before = _resident(b)
            data = native.to_bytes(random_fourierft(shapes, 64, coefficient_seed=10_000 + index, location_seed=index))
            response = a.post(
                "/v1/adapters",
                data={"adapter_id": f"spread/pin{index:03d}", "pin": "true"},
                files={"file": ("a.safetensors", data)},
            )
            response.raise_for_status()
            pinned.append(_until(lambda before=before: _resident(b) > before))
    result = {
        "uploads": args.uploads,
        "upload_to_servable_on_other_ms": _ms(servable),
        "delete_to_404_on_other_ms": _ms(gone),
        "pin_to_resident_on_other_ms": _ms(pinned),
    }
    print(
        f"propagation A -> B over {args.uploads} adapters: upload -> servable p50 "
        f"{result['upload_to_servable_on_other_ms']['p50']} ms, p99 {result['upload_to_servable_on_other_ms']['p99']}"
        f" ms; delete -> 404 p99 {result['delete_to_404_on_other_ms']['p99']} ms; pin -> resident p99 "
        f"{result['pin_to_resident_on_other_ms']['p99']} ms",
        flush=True,
    )
    return result


def throughput(database: str, work: Path, replicas: int, model: Path | None, args: argparse.Namespace) -> dict:
    """bench/load.py's mix through Ray Serve's HAProxy front and router to ``replicas`` replicas (one torch thread
    each)."""
    serve = (
        "--store", database, "--replicas", str(replicas), "--cpus-per-replica", "1", "--torch-threads", "1",
        "--max-batch-size", str(args.max_batch_size), *(("--model", str(model)) if model else ()),
    )  # fmt: skip
    work.mkdir()
    started = time.perf_counter()
    with running_server(work, *serve) as server:
        ready_s = time.perf_counter() - started
        load_args = load.parse_args(
            [
                "--url", server.base_url, "--clients", str(args.clients), "--duration-s", str(args.duration_s),
                "--adapters", str(args.adapters), "--warm-adapters", "--max-batch-size", str(args.max_batch_size),
                "--seed", str(replicas),
            ]
        )  # fmt: skip
        result = load.run(work, load_args)
    summary = {
        "replicas": replicas,
        "ready_s": round(ready_s, 1),
        "tokens_per_s": result["tokens_per_s"],
        "requests_completed": result["requests_completed"],
        "ttft_ms": result["ttft_ms"],
        "errors": result["errors"],
        "error_kinds": result["error_kinds"],
        "rejected_429": result["rejected_429"],
        "affinity": result["affinity"],
        "affinity_hit_rate": result["affinity_hit_rate"],
        "loadavg_after": result["loadavg_after"],
    }
    print(
        f"{replicas} replica(s): {summary['tokens_per_s']} tok/s, TTFT p50 {summary['ttft_ms']['p50']} ms, "
        f"affinity {summary['affinity']} (hit rate {summary['affinity_hit_rate']}), errors {summary['errors']}",
        flush=True,
    )
    return summary


def without_proxy(database: str, work: Path, processes: int, model: Path | None, args: argparse.Namespace) -> dict:
    """The same mix against ``processes`` plain ``spectra serve --store`` processes (one torch thread each) and no
    Ray: each client sticks to one process, and each process gets its own share of the adapters (perfect
    affinity by construction). What this machine gives two replicas without Ray (HAProxy, the router, Ray's own
    processes)."""
    serve = (
        "--store", database, "--torch-threads", "1", "--max-batch-size", str(args.max_batch_size),
        *(("--model", str(model)) if model else ()),
    )  # fmt: skip
    work.mkdir()
    load_args = load.parse_args(
        [
            "--clients", str(args.clients // processes), "--duration-s", str(args.duration_s),
            "--adapters", str(args.adapters), "--max-batch-size", str(args.max_batch_size), "--seed", str(processes),
        ]
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        servers = []
        for index in range(processes):
            (work / str(index)).mkdir()
            servers.append(stack.enter_context(running_server(work / str(index), *serve)))
        with httpx.Client(base_url=servers[0].base_url, timeout=120) as client:
            info = client.get("/info").json()
            uploaded = load.upload_adapters(client, target_shapes(Path(info["model_path"])), load_args)
        shares = [uploaded["ids"][index::processes] for index in range(processes)]
        for server, share in zip(servers, shares, strict=True):
            with httpx.Client(base_url=server.base_url, timeout=120) as client:
                for adapter_id in share:
                    body = {"inputs": "warm up", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 1}}
                    client.post("/generate", json=body).raise_for_status()

        async def all_at_once() -> list:
            return await asyncio.gather(
                *(
                    load.load(server.base_url, server.pid, share, info["model_id"], load_args)
                    for server, share in zip(servers, shares, strict=True)
                )
            )

        totals = [result[0] for result in asyncio.run(all_at_once())]
    summary = {
        "processes": processes,
        "tokens_per_s": round(sum(total.tokens_in_window for total in totals) / args.duration_s, 1),
        "errors": sum(total.errors for total in totals),
    }
    print(f"{processes} process(es) without a proxy: {summary['tokens_per_s']} tok/s, errors {summary['errors']}")
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 uploads, 5 pins, 15 s windows")
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--pins", type=int, default=20)
    parser.add_argument("--adapters", type=int, default=100, help="adapters in the throughput mix")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=45.0, help="each throughput window")
    parser.add_argument("--max-batch-size", type=int, default=16, help="each replica's --max-batch-size")
    parser.add_argument("--repeats", type=int, default=1, help="alternating 1- and 2-replica windows; medians")
    parser.add_argument(
        "--model",
        choices=("embedded", LARGE_MODEL),
        default="embedded",
        help=f"served in the throughput windows: the embedded default, or {LARGE_MODEL} (bench/serve_throughput.py)",
    )
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load below this")
    parser.add_argument("--load-wait-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale_out.json"))
    args = parser.parse_args()
    if args.quick:
        args.uploads, args.pins, args.duration_s = 20, 5, 15.0
    return args


def main() -> None:
    args = parse_args()
    load_at_start = wait_for_quiet_machine(args.max_load, args.load_wait_s)
    print(f"torch {torch.__version__}, {cpu_model()}, load {load_at_start:.2f}", flush=True)
    began = time.perf_counter()
    with throwaway_cluster() as cluster, tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        work = Path(tmp)
        (work / "propagation").mkdir()
        result: dict = {"propagation": propagation(fresh_database(cluster), work / "propagation", args)}
        model = (
            None if args.model == "embedded" else save_tiny_model(work / args.model, tiny_llama_config(**LARGE_CONFIG))
        )
        runs: dict[int, list[dict]] = {1: [], 2: []}
        plain: dict[int, list[dict]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for replicas in (1, 2):
                runs[replicas].append(
                    throughput(fresh_database(cluster), work / f"replicas-{replicas}-{repeat}", replicas, model, args)
                )
            for processes in (1, 2):
                plain[processes].append(
                    without_proxy(fresh_database(cluster), work / f"plain-{processes}-{repeat}", processes, model, args)
                )
    ratios = [two["tokens_per_s"] / one["tokens_per_s"] for one, two in zip(runs[1], runs[2], strict=True)]
    plain_ratios = [two["tokens_per_s"] / one["tokens_per_s"] for one, two in zip(plain[1], plain[2], strict=True)]
    hit_rates = [run["affinity_hit_rate"] for run in runs[2] if run["affinity_hit_rate"] is not None]
    result["throughput"] = {
        "runs": runs,
        "two_over_one": [round(ratio, 3) for ratio in ratios],
        "two_over_one_median": round(statistics.median(ratios), 3),
        "affinity_hit_rate_two_replicas_median": round(statistics.median(hit_rates), 4) if hit_rates else None,
        "without_proxy": plain,
        "without_proxy_two_over_one": [round(ratio, 3) for ratio in plain_ratios],
        "without_proxy_two_over_one_median": round(statistics.median(plain_ratios), 3),
    }
    servable_p99 = result["propagation"]["upload_to_servable_on_other_ms"]["p99"]
    verdicts = {
        "throughput_ratio_ge_1_6": result["throughput"]["two_over_one_median"] >= 1.6,
        "affinity_hit_rate_ge_0_9": (result["throughput"]["affinity_hit_rate_two_replicas_median"] or 0) >= 0.9,
        "upload_to_servable_p99_le_1s": servable_p99 <= 1000,
    }
    result["targets"] = verdicts
    print(
        f"\n== two replicas / one: {result['throughput']['two_over_one']} (median "
        f"{result['throughput']['two_over_one_median']}); without the proxy "
        f"{result['throughput']['without_proxy_two_over_one']}; affinity hit rate "
        f"{result['throughput']['affinity_hit_rate_two_replicas_median']}; upload -> servable on the other p99 "
        f"{servable_p99} ms; targets {verdicts}"
    )
    report = {**report_header("scale_out", args, load_at_start, began), **result}
    write_report(report, args.out)
    sys.exit(0 if all(verdicts.values()) else 1)


if __name__ == "__main__":
    main()
