"""The model runner's decode step: no device->host sync inside it, KV written in place, one column per row."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine
from server.engine.handle import RequestHandle
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams
from tests.engine_fixtures import make_engine, random_adapter

SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique")


@contextmanager
def host_syncs_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every tensor -> Python value conversion raises: on a GPU each is a device->host synchronisation."""

    def forbidden(name: str):
        def raise_(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the decode step")

        return raise_

    with monkeypatch.context() as patch:
        for name in SYNCING_METHODS:
            patch.setattr(torch.Tensor, name, forbidden(name))
        patch.setattr(torch, "unique", forbidden("unique"))
        yield


@pytest.fixture(params=["tiny_llama_dir", "tiny_gpt2_dir"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    engine = make_engine(request.getfixturevalue(request.param), tmp_path, max_batch_size=4)
    engine.registry.register("f", random_adapter(engine.runner.module_shapes, 1, method="fourierft"))
    engine.registry.register("d", random_adapter(engine.runner.module_shapes, 2, method="sdctft"))
    return engine


def running_rows(engine: Engine, adapters: list[dict[str, float]]) -> list[Sequence]:
    """Admit and prefill one request per entry (without the engine thread); they are then running."""
    loop = asyncio.new_event_loop()
    sequences = []
    for index, blend in enumerate(adapters):
        prompt = engine.tokenizer.encode(f"row {index} says hello" + "!" * index)
        request = GenerationRequest(prompt, SamplingParams(max_new_tokens=8), blend)
        leases = [(engine.registry.lease(adapter_id), weight) for adapter_id, weight in blend.items()]
        sequence = Sequence(
            request, RequestHandle("", len(prompt), loop), leases, IncrementalDetokenizer(engine.tokenizer)
        )
        engine.scheduler.add(sequence)
        sequences.append(sequence)
    plan = engine.scheduler.schedule()
    for sequence in plan.admitted:
        sequence.adapter_slots = [lease.slot() for lease, _ in sequence.leases]
    logits = engine.runner.prefill(plan.prefill).logits
    for row, segment in enumerate(plan.prefill):
        engine.scheduler.prefilled(segment)
        segment.sequence.generated.append(int(logits[row].argmax()))
    return sequences


MIXED = [{"f": 1.0}, {}, {"d": 1.0}, {"f": 0.5, "d": 0.5}]


@pytest.mark.parametrize("bucketed", [False, True], ids=["exact", "bucketed"])
def test_a_decode_step_with_mixed_adapters_makes_no_host_sync(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, bucketed: bool
) -> None:
    sequences = running_rows(engine, MIXED)
    with host_syncs_forbidden(monkeypatch):
        logits = engine.runner.decode(sequences, bucketed=bucketed)
    assert logits.shape == (4, engine.runner.model.config.vocab_size) and bool(torch.isfinite(logits).all())


def test_the_static_shape_step_that_cuda_graphs_capture_equals_the_exact_step(engine: Engine) -> None:
    """Rows padded to a power of two, KV length to a bucket, routing without de-duplication: same logits."""
    sequences = running_rows(engine, MIXED[:3])
    inputs = engine.runner._decode_inputs(sequences, bucketed=True)
    assert inputs.kv_columns.shape == (4,) and inputs.kv_length % 256 == 0 and inputs.routing.every_layer
    exact = engine.runner.decode(sequences, bucketed=False)
    bucketed = engine.runner.decode(sequences, bucketed=True)
    assert torch.allclose(bucketed, exact, atol=1e-5)
    assert exact.argmax(-1).tolist() == bucketed.argmax(-1).tolist()


def test_decode_writes_one_position_per_row_in_place(engine: Engine) -> None:
    sequences = running_rows(engine, MIXED)
    cache = engine.runner.kv_cache
    assert cache is not None
    layer_keys = cache._keys[0]
    before = layer_keys.clone()
    pointer = layer_keys.data_ptr()
    engine.runner.decode(sequences)
    assert cache._keys[0].data_ptr() == pointer, "the cache is preallocated, never reallocated"
    changed = (cache._keys[0] != before).any(dim=(1, 3))  # [rows, positions]
    for sequence in sequences:
        row = changed[sequence.kv_row]
        assert row.nonzero().flatten().tolist() == [sequence.cached_tokens], "exactly the new position"
    assert not changed[len(sequences) :].any(), "free and staging rows are untouched"


def test_decode_after_a_row_leaves_equals_decode_without_it(engine: Engine) -> None:
    """The last row moves into the leaver's place; its next logits are the same as if nothing moved."""
    sequences = running_rows(engine, MIXED)
    expected = engine.runner.decode(sequences)
    engine.scheduler.finish(sequences[0])
    plan = engine.scheduler.schedule()
    engine.runner.move_rows(plan.kv_moves)
    assert [s.kv_row for s in plan.decode] == [0, 1, 2] and plan.decode[0] is sequences[3]
    moved = engine.runner.decode(plan.decode)
    assert torch.allclose(moved[0], expected[3], atol=1e-5)
    assert torch.allclose(moved[1:], expected[1:3], atol=1e-5)


def test_a_reused_routing_never_serves_entries_of_an_unloaded_adapter(engine: Engine) -> None:
    """Decode steps reuse the previous routing (and its gathered entries) only while the bank is unchanged."""
    sequences = running_rows(engine, [{"f": 1.0}])
    bank = engine.runner.bank
    first = engine.runner.decode(sequences)
    assert torch.equal(engine.runner.decode(sequences), first), "the reused routing gives the same step"
    slot = sequences[0].adapter_slots[0]
    bank.unload(slot)
    replacement = bank.load(random_adapter(engine.runner.module_shapes, 99))
    assert replacement == slot, "the freed slot is reused, so the rows' slots are unchanged"
    fresh = engine.runner.decode(sequences)
    assert not torch.allclose(fresh, first)
    bank._last_routing = None
    assert torch.equal(engine.runner.decode(sequences), fresh)
