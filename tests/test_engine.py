"""The engine in-process: batch invariance, chunked prefill, cancellation, version pinning, blends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from server.engine.engine import Engine
from server.engine.types import GenerationRequest, QueueFullError, SamplingParams, UnknownAdapterError
from tests.engine_fixtures import make_engine, random_adapter

PROMPTS = ["Hello there", "The spectral adapter", "a", "Once upon a time, in a land", "0123456789", "zz top"]


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = make_engine(
        request.getfixturevalue(request.param),
        tmp_path_factory.mktemp("store"),
        max_batch_size=32,
        prefill_token_budget=64,
    )
    for index in range(32):
        method = "fourierft" if index % 2 == 0 else "sdctft"
        engine.registry.register(f"a{index}", random_adapter(engine.runner.module_shapes, 1000 + index, method=method))
    engine.start()
    yield engine
    engine.stop()


def _request(engine: Engine, index: int, adapters: dict[str, float] | None = None, **params) -> GenerationRequest:
    prompt = engine.tokenizer.encode(PROMPTS[index % len(PROMPTS)] + f" #{index}")
    sampling = SamplingParams(max_new_tokens=params.pop("max_new_tokens", 12), **params)
    return GenerationRequest(prompt, sampling, {f"a{index}": 1.0} if adapters is None else adapters)


async def _tokens(engine: Engine, request: GenerationRequest) -> list[int]:
    final = await engine.submit(request).result()
    return [event.token_id for event in final.tokens]


def test_greedy_batch_of_32_adapters_equals_each_request_alone(engine: Engine) -> None:
    async def run() -> None:
        requests = [_request(engine, index) for index in range(32)]
        alone = [await _tokens(engine, request) for request in requests]
        together = await asyncio.gather(*[_tokens(engine, request) for request in requests])
        assert together == alone
        base = await _tokens(engine, _request(engine, 0, adapters={}))
        assert sum(tokens != base for tokens in alone) >= 16, "adapters must change the greedy output"

    asyncio.run(run())


def test_long_prompt_prefilled_in_chunks_equals_one_prefill(engine: Engine) -> None:
    async def run() -> None:
        prompt = engine.tokenizer.encode("spectral " * 20)
        budget = engine.scheduler.prefill_token_budget
        assert len(prompt) > budget
        chunked = await _tokens(engine, GenerationRequest(prompt, SamplingParams(max_new_tokens=8), {"a3": 1.0}))
        engine.scheduler.prefill_token_budget = 4096
        try:
            whole = await _tokens(engine, GenerationRequest(prompt, SamplingParams(max_new_tokens=8), {"a3": 1.0}))
        finally:
            engine.scheduler.prefill_token_budget = budget
        assert chunked == whole

    asyncio.run(run())


def test_blend_runs_and_differs_from_its_parts(engine: Engine) -> None:
    async def run() -> None:
        blend = await _tokens(engine, _request(engine, 1, adapters={"a1": 0.5, "a2": 0.5}))
        first = await _tokens(engine, _request(engine, 1, adapters={"a1": 1.0}))
        same_as_first = await _tokens(engine, _request(engine, 1, adapters={"a1": 1.0, "a2": 0.0}))
        assert same_as_first == first
        assert len(blend) == 12

    asyncio.run(run())


def test_unknown_adapter_is_rejected_at_submit(engine: Engine) -> None:
    async def run() -> None:
        with pytest.raises(UnknownAdapterError, match="'nope' not found"):
            engine.submit(_request(engine, 0, adapters={"nope": 1.0}))

    asyncio.run(run())


def test_cancelled_request_leaves_the_batch(engine: Engine) -> None:
    async def run() -> None:
        handle = engine.submit(_request(engine, 2, max_new_tokens=200))
        events = handle.events()
        await anext(events)
        handle.cancel()
        final = await handle.result()
        assert final.reason == "cancelled"
        assert final.generated_tokens < 200
        assert engine.info()["running_requests"] == 0

    asyncio.run(run())


def test_replacing_an_adapter_mid_stream_keeps_the_old_version(engine: Engine) -> None:
    async def run() -> None:
        engine.registry.register("pinned", random_adapter(engine.runner.module_shapes, 7))
        request = _request(engine, 4, adapters={"pinned": 1.0}, max_new_tokens=24)
        reference = await _tokens(engine, request)
        handle = engine.submit(request)
        events = handle.events()
        await anext(events)
        engine.registry.register("pinned", random_adapter(engine.runner.module_shapes, 8))
        final = await handle.result()
        assert [event.token_id for event in final.tokens] == reference
        assert await _tokens(engine, request) != reference

    asyncio.run(run())


def test_sampling_is_reproducible_for_a_seed(engine: Engine) -> None:
    async def run() -> None:
        params = {"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 11}
        first = await _tokens(engine, _request(engine, 5, **params))
        crowd = [engine.submit(_request(engine, i)) for i in range(8)]
        again = await _tokens(engine, _request(engine, 5, **params))
        await asyncio.gather(*[h.result() for h in crowd])
        assert first == again

    asyncio.run(run())


def test_stop_sequence_and_queue_limit(tiny_llama_dir, tmp_path) -> None:
    engine = make_engine(tiny_llama_dir, tmp_path, max_batch_size=1, max_queue=1)
    engine.start()
    try:

        async def run() -> None:
            prompt = engine.tokenizer.encode("abc")
            free_run = await engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=10))).result()
            stop = free_run.text[2:4]
            stopped = await engine.submit(
                GenerationRequest(prompt, SamplingParams(max_new_tokens=10, stop=(stop,)))
            ).result()
            assert stopped.reason == "stop_sequence"
            assert stopped.text.endswith(stop) and free_run.text.startswith(stopped.text)
            running = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=300)))
            await anext(running.events())
            engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=5)))
            with pytest.raises(QueueFullError):
                engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=5)))
            running.cancel()

        asyncio.run(run())
    finally:
        engine.stop()


def test_a_cancelled_waiting_request_gives_its_queue_place_back_at_once(tiny_llama_dir, tmp_path) -> None:
    engine = make_engine(tiny_llama_dir, tmp_path, max_batch_size=1, max_queue=1)
    engine.start()
    try:

        async def run() -> None:
            prompt = engine.tokenizer.encode("abc")
            running = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=300)))
            await anext(running.events())
            waiting = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=5)))
            waiting.cancel()
            replacement = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=5)))
            assert (await waiting.result()).reason == "cancelled"
            running.cancel()
            assert (await replacement.result()).reason in ("length", "eos_token")

        asyncio.run(run())
    finally:
        engine.stop()
