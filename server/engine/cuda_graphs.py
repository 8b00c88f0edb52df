"""CUDA graphs of the decode step: a thin wrapper, after gpt-fast.

:meth:`ModelRunner.decode_step` has static shapes per bucket (rows padded to a power of two, KV
length to a multiple of 256, routing without de-duplication) and makes no device->host
synchronisation, so it can be captured as is. One graph per bucket and routing kind (adapters or
not, Fourier and/or DCT terms, blend width) is captured on first use, in one shared memory pool;
a replay copies the step's inputs into the captured ones. The function captured is the one the
CPU tests run (``tests/test_model_runner.py`` runs it at bucket shapes), so no GPU-only branch
goes untested. A capture holds the bank's table pointers: when a table grows (more slots, longer
entry lists) the graphs are dropped and captured again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.spectral.routing import Routing

if TYPE_CHECKING:
    from server.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeInputs:
    """Everything one decode step reads: ``[rows, 1]`` ids and model positions, ``[rows]`` KV columns."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    kv_columns: torch.Tensor
    kv_length: int
    routing: Routing

    def key(self) -> tuple:
        routing = self.routing
        width = routing.inverse.shape[1]
        return (self.kv_columns.shape[0], self.kv_length, routing.needs_fourier, routing.needs_dct, width)

    def copy_into(self, captured: DecodeInputs) -> None:
        captured.input_ids.copy_(self.input_ids, non_blocking=True)
        captured.positions.copy_(self.positions, non_blocking=True)
        captured.kv_columns.copy_(self.kv_columns, non_blocking=True)
        captured.routing.unique_slots.copy_(self.routing.unique_slots, non_blocking=True)
        if self.routing.weights is not None and captured.routing.weights is not None:
            captured.routing.weights.copy_(self.routing.weights, non_blocking=True)


@dataclass(frozen=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: DecodeInputs
    logits: torch.Tensor


class DecodeGraphs:
    WARMUP_RUNS = 2

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._tables_version = runner.bank.tables_version

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        bank = self.runner.bank
        with bank.lock:
            if bank.tables_version != self._tables_version:
                logger.info("adapter bank tables grew; dropping %d captured decode graphs", len(self._graphs))
                self._graphs.clear()
                self._tables_version = bank.tables_version
            captured = self._graphs.get(inputs.key())
            if captured is None:
                captured = self._graphs[inputs.key()] = self._capture(inputs)
            inputs.copy_into(captured.inputs)
            captured.graph.replay()
            return captured.logits

    def _capture(self, inputs: DecodeInputs) -> _Captured:
        """Warm up on a side stream (the warm-up steps compute this step, so what they write is right), then capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_RUNS):
                self.runner.decode_step(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.runner.decode_step(inputs)
        logger.info("captured decode graph key=%s", inputs.key())
        return _Captured(graph, inputs, logits)
