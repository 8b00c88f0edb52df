"""Prometheus metrics: names, units and buckets in one place (docs/metrics.md lists them).

Events (tokens, latencies, loads, training steps) are counted where they happen. State (queue,
running requests, adapters, jobs by status) is read from the live engine at scrape time by
:class:`ServerStateCollector`, so it can never drift from what ``/info`` reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

NAMESPACE = "spectra"
# ``_created`` timestamps double the series count and no dashboard here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Buckets after vLLM's, which LLM dashboards are already built around: first tokens from 1 ms (a hot
# tiny model) to 80 s (a long queue), inter-token gaps from 1 ms to 2.5 s.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

HTTP_REQUESTS = Counter(
    "http_requests", "HTTP requests by route template, method and status.", ["route", "method", "status"],
    namespace=NAMESPACE, registry=REGISTRY,
)  # fmt: skip
HTTP_DURATION = Histogram(
    "http_request_duration_seconds", "Time to the end of the response body (streams included).", ["route", "method"],
    namespace=NAMESPACE, registry=REGISTRY, buckets=REQUEST_BUCKETS,
)  # fmt: skip
PROMPT_TOKENS = Counter("prompt_tokens", "Prompt tokens prefilled.", namespace=NAMESPACE, registry=REGISTRY)
GENERATION_TOKENS = Counter("generation_tokens", "Tokens generated.", namespace=NAMESPACE, registry=REGISTRY)
REQUESTS_FINISHED = Counter(
    "requests_finished", "Generation requests by finish reason.", ["finish_reason"],
    namespace=NAMESPACE, registry=REGISTRY,
)  # fmt: skip
TIME_TO_FIRST_TOKEN = Histogram(
    "time_to_first_token_seconds", "Submit to first token (queue and prefill included).",
    namespace=NAMESPACE, registry=REGISTRY, buckets=TTFT_BUCKETS,
)  # fmt: skip
TIME_PER_OUTPUT_TOKEN = Histogram(
    "time_per_output_token_seconds", "Mean gap between a request's tokens after the first.",
    namespace=NAMESPACE, registry=REGISTRY, buckets=TPOT_BUCKETS,
)  # fmt: skip
E2E_LATENCY = Histogram(
    "e2e_request_latency_seconds", "Submit to finish of a generation request.",
    namespace=NAMESPACE, registry=REGISTRY, buckets=REQUEST_BUCKETS,
)  # fmt: skip
QUEUE_TIME = Histogram(
    "request_queue_time_seconds", "Submit to admission into the running batch.",
    namespace=NAMESPACE, registry=REGISTRY, buckets=TTFT_BUCKETS,
)  # fmt: skip
BATCH_SIZE = Histogram(
    "batch_size", "Rows in each decode step.", namespace=NAMESPACE, registry=REGISTRY, buckets=BATCH_BUCKETS
)
ADAPTER_LOADS = Counter(
    "adapter_loads", "Adapter versions loaded into the bank.", namespace=NAMESPACE, registry=REGISTRY
)
ADAPTER_EVICTIONS = Counter(
    "adapter_evictions", "Adapter versions evicted to make room (LRU).", namespace=NAMESPACE, registry=REGISTRY
)
ADAPTER_LOAD_SECONDS = Histogram(
    "adapter_load_seconds", "Time to make an adapter version resident (read, parse, bank load).",
    namespace=NAMESPACE, registry=REGISTRY, buckets=LOAD_BUCKETS,
)  # fmt: skip
ADAPTER_REQUESTS = Counter(
    "adapter_requests", "Generation requests by adapter id (bounded: see --metrics-adapter-labels).", ["adapter"],
    namespace=NAMESPACE, registry=REGISTRY,
)  # fmt: skip
ADAPTER_CHANGES_FOLLOWED = Counter(
    "adapter_changes_followed", "Changes of a shared store's adapters applied here, by kind (put, delete, broken).",
    ["kind"], namespace=NAMESPACE, registry=REGISTRY,
)  # fmt: skip
ADAPTER_RESYNCS = Counter(
    "adapter_resyncs", "Registry resynchronisations after changes were pruned before this replica read them.",
    namespace=NAMESPACE, registry=REGISTRY,
)  # fmt: skip
FINETUNE_STEPS = Counter("finetune_steps", "Fine-tuning optimizer steps.", namespace=NAMESPACE, registry=REGISTRY)
FINETUNE_LAST_LOSS = Gauge(
    "finetune_last_train_loss", "Training loss of the latest optimizer step of any job.",
    namespace=NAMESPACE, registry=REGISTRY,
)  # fmt: skip

BASE_MODEL_LABEL = "__base__"
OTHER_ADAPTERS_LABEL = "__other__"
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


class AdapterLabels:
    """The first ``limit`` distinct adapter ids requested get a label of their own; later ones share
    ``__other__``. Thousands of adapters would otherwise mean thousands of series per scrape."""

    def __init__(self, limit: int):
        self.limit = limit
        self._labelled: set[str] = set()
        self._lock = threading.Lock()

    def label(self, adapter_id: str | None) -> str:
        if adapter_id is None:
            return BASE_MODEL_LABEL
        with self._lock:
            if adapter_id in self._labelled:
                return adapter_id
            if len(self._labelled) < self.limit:
                self._labelled.add(adapter_id)
                return adapter_id
        return OTHER_ADAPTERS_LABEL


ADAPTER_LABELS = AdapterLabels(limit=100)


class ServingState(Protocol):
    """What the serving gauges read at each scrape (the engine provides it; metrics never import it)."""

    @property
    def queue_length(self) -> int: ...

    @property
    def running_count(self) -> int: ...

    def gauges(self) -> dict[str, int]:
        """``adapters_registered``, ``adapters_resident``, ``adapter_bank_bytes``, ``kv_cache_bytes``."""
        ...

    def adapter_activity(self) -> tuple[int, list[str], list[str]]:
        """The most adapters one batch can apply, and the adapter ids of running and of waiting requests."""
        ...


class JobState(Protocol):
    def status_counts(self) -> dict[str, int]: ...


STATE_GAUGES = {
    "adapters_registered": "Adapter ids in the store.",
    "adapters_resident": "Adapter versions loaded in the bank.",
    "adapter_bank_bytes": "Bytes of the adapter bank's device tables.",
    "kv_cache_bytes": "Bytes of the preallocated KV cache.",
}


class ServerStateCollector(Collector):
    """Gauges read from the serving state and the job manager at each scrape."""

    def __init__(self) -> None:
        self.serving: ServingState | None = None
        self.jobs: JobState | None = None

    def bind(self, serving: ServingState, jobs: JobState) -> None:
        self.serving, self.jobs = serving, jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        serving, jobs = self.serving, self.jobs
        if serving is None or jobs is None:
            return
        yield GaugeMetricFamily(f"{NAMESPACE}_queue_length", "Requests waiting for a batch row.", serving.queue_length)
        yield GaugeMetricFamily(
            f"{NAMESPACE}_requests_running", "Requests prefilling or decoding.", serving.running_count
        )
        values = serving.gauges()
        for name, description in STATE_GAUGES.items():
            yield GaugeMetricFamily(f"{NAMESPACE}_{name}", description, values[name])
        yield _lora_requests_info(*serving.adapter_activity())
        by_status = jobs.status_counts()
        family = GaugeMetricFamily(f"{NAMESPACE}_finetune_jobs", "Fine-tuning jobs by status.", labels=["status"])
        for status in JOB_STATUSES:
            family.add_metric([status], by_status.get(status, 0))
        yield family


def _lora_requests_info(max_lora: int, running: list[str], waiting: list[str]) -> GaugeMetricFamily:
    """vLLM's gauge for adapter-aware routers (the Gateway API Inference Extension's model-server protocol,
    which llm-d and GIE endpoint pickers read): one sample whose labels carry the state and whose value is
    the time it was read, in vLLM's name and label spelling (comma-separated ids)."""
    family = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "Running and waiting adapters (labels); the value is when they were read (Unix seconds).",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    family.add_metric([str(max_lora), ",".join(running), ",".join(waiting)], time.time())
    return family


SERVER_STATE = ServerStateCollector()
REGISTRY.register(SERVER_STATE)
