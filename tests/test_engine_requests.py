"""Per-request engine features for evaluation and structured outputs, in-process.

Prompt scoring is checked against a plain forward of the routed model (the same adapter applied
by the bank outside the engine), chunked or not; grammars on the random tiny model, where nothing
but the mask can produce valid JSON; ``min_tokens`` and ``ignore_eos`` against eos-heavy prompts.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import pytest
import torch

from server.engine.engine import Engine
from server.engine.grammar import unpack_with_numpy, unpack_with_shifts
from server.engine.types import FinishEvent, GenerationRequest, Grammar, InvalidRequestError, SamplingParams
from tests.engine_fixtures import make_engine, random_adapter

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    # A small prefill budget makes a long prompt prefill in several chunks.
    engine = make_engine(tiny_llama_dir, tmp_path_factory.mktemp("store"), max_batch_size=8, prefill_token_budget=16)
    engine.registry.register("a", random_adapter(engine.runner.module_shapes, 5))
    engine.registry.register("b", random_adapter(engine.runner.module_shapes, 6, method="sdctft"))
    engine.start()
    yield engine
    engine.stop()


def _run(engine: Engine, *requests: GenerationRequest) -> list[FinishEvent]:
    async def go() -> list[FinishEvent]:
        return list(await asyncio.gather(*(engine.submit(request).result() for request in requests)))

    return asyncio.run(go())


def _reference_logprobs(engine: Engine, prompt: list[int], blend: dict[str, float]) -> torch.Tensor:
    """log p(prompt[i] | prompt[:i]) for i >= 1 from one full forward, outside the serving path."""
    runner = engine.runner
    leases = [engine.registry.lease(adapter_id) for adapter_id in blend]
    try:
        routing = runner.bank.row_routing([[lease.slot() for lease in leases]], [list(blend.values())], len(prompt))
        with torch.inference_mode(), runner.bank.routed(routing):
            logits = runner.model(input_ids=torch.tensor([prompt])).logits[0].float()
    finally:
        for lease in leases:
            lease.release()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]


BLENDS = {"base": {}, "adapter": {"a": 1.0}, "blend": {"a": 0.7, "b": 0.3}}


@pytest.mark.parametrize("blend", list(BLENDS.values()), ids=list(BLENDS))
@pytest.mark.parametrize("words", [3, 20], ids=["one-chunk", "chunked"])
def test_prompt_logprobs_equal_a_full_forward(engine: Engine, blend: dict[str, float], words: int) -> None:
    prompt = engine.tokenizer.encode(" ".join(["spectral"] * words))
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=3)
    (finish,) = _run(engine, GenerationRequest(prompt, params, blend))
    scored = finish.prompt
    assert [token.token_id for token in scored] == prompt
    assert scored[0].logprob is None
    expected = _reference_logprobs(engine, prompt, blend)
    got = torch.tensor([token.logprob for token in scored[1:]])
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    for token in scored[1:]:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0][1] >= token.logprob - 1e-6, "the most likely alternative is at least as likely"
    assert finish.tokens[0].prompt == scored, "the first token event carries the prompt scores for streams"


def test_prompt_logprobs_of_an_adapter_differ_from_the_base(engine: Engine) -> None:
    prompt = engine.tokenizer.encode("adapters change likelihoods")
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=0)
    base, adapted = _run(engine, GenerationRequest(prompt, params, {}), GenerationRequest(prompt, params, {"a": 1.0}))
    assert [t.logprob for t in base.prompt] != [t.logprob for t in adapted.prompt]
    assert all(not token.top_logprobs for token in base.prompt)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("adapter", [None, "a"], ids=["base", "adapter"])
def test_json_schema_rows_parse_and_match_in_a_mixed_batch(engine: Engine, sampled: bool, adapter: str | None) -> None:
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    constrained = [
        GenerationRequest(
            engine.tokenizer.encode(f"person {index}:"),
            SamplingParams(max_new_tokens=80, do_sample=sampled, temperature=1.5, seed=index, grammar=grammar),
            {adapter: 1.0} if adapter else {},
        )
        for index in range(4)
    ]
    free = GenerationRequest(engine.tokenizer.encode("free text"), SamplingParams(max_new_tokens=20), {})
    *answers, unconstrained = _run(engine, *constrained, free)
    for answer in answers:
        document = json.loads(answer.text)
        assert set(document) == {"name", "age", "tags"}
        assert isinstance(document["name"], str) and len(document["name"]) <= 6
        assert 0 <= document["age"] <= 150 and set(document["tags"]) <= {"x", "y"}
        assert answer.reason == "eos_token"
    with pytest.raises(json.JSONDecodeError):
        json.loads(unconstrained.text)


def test_regex_choice_and_lark_grammars(engine: Engine) -> None:
    prompt = engine.tokenizer.encode("answer:")
    grammars = {
        "regex": Grammar("regex", r"[0-9]{3}-[a-z]{2}"),
        "choice": Grammar("choice", json.dumps(["yes", "no", "maybe so"])),
        "lark": Grammar("lark", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[1-9][0-9]?/'),
        "gbnf": Grammar("lark", 'root ::= "<" [a-c] [a-c]? ">"'),
    }
    finishes = _run(
        engine, *(GenerationRequest(prompt, SamplingParams(max_new_tokens=40, grammar=g)) for g in grammars.values())
    )
    text = dict(zip(grammars, (finish.text for finish in finishes), strict=True))
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text["regex"]), text
    assert text["choice"] in {"yes", "no", "maybe so"}
    assert re.fullmatch(r"\(([1-9][0-9]?)(,[1-9][0-9]?)*\)", text["lark"]), text
    assert re.fullmatch(r"<[a-c]{1,2}>", text["gbnf"]), text


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (Grammar("json_schema", json.dumps({"type": "objekt"})), "JSON schema"),
        (Grammar("regex", "a(b", "guided_regex"), "guided_regex is not a usable regular expression"),
        (Grammar("lark", "start: missing_rule"), "missing_rule"),
    ],
)
def test_bad_grammars_are_rejected_before_queueing(engine: Engine, grammar: Grammar, message: str) -> None:
    request = GenerationRequest(engine.tokenizer.encode("x"), SamplingParams(max_new_tokens=4, grammar=grammar))

    async def submit() -> None:
        engine.submit(request)

    with pytest.raises(InvalidRequestError, match=message):
        asyncio.run(submit())
    assert engine.queue_length == 0


def test_compiled_grammars_are_cached(engine: Engine) -> None:
    grammar = Grammar("regex", "cached[0-9]")
    hits = engine.grammars.hits
    _run(engine, *(GenerationRequest([1, 2], SamplingParams(max_new_tokens=8, grammar=grammar)) for _ in range(3)))
    assert engine.grammars.hits - hits >= 2


def _eos_prompt(engine: Engine) -> tuple[list[int], int]:
    """A prompt after which greedy decoding emits eos within a few tokens (found by search)."""
    eos = engine.tokenizer.eos_token_id
    for index in range(200):
        prompt = engine.tokenizer.encode(f"p{index}")
        (finish,) = _run(engine, GenerationRequest(prompt, SamplingParams(max_new_tokens=6)))
        if finish.reason == "eos_token" and finish.tokens[-1].token_id == eos:
            return prompt, len(finish.tokens)
    pytest.skip("no prompt of the random model ends in eos within 6 tokens")


def test_min_tokens_bans_eos_and_ignore_eos_runs_to_the_limit(engine: Engine) -> None:
    prompt, length = _eos_prompt(engine)
    eos_ids = engine.runner.eos_token_ids
    (held,) = _run(engine, GenerationRequest(prompt, SamplingParams(max_new_tokens=30, min_tokens=length + 5)))
    assert len(held.tokens) >= length + 5
    assert all(token.token_id not in eos_ids for token in held.tokens[: length + 5])
    (ignored,) = _run(engine, GenerationRequest(prompt, SamplingParams(max_new_tokens=length + 8, ignore_eos=True)))
    assert ignored.reason == "length" and len(ignored.tokens) == length + 8
    assert ignored.tokens[length - 1].token_id in eos_ids, "greedy decoding is unchanged: eos is generated, no end"


def test_min_tokens_above_max_tokens_is_a_422(engine: Engine) -> None:
    async def submit() -> None:
        engine.submit(GenerationRequest([1, 2], SamplingParams(max_new_tokens=2, min_tokens=3)))

    with pytest.raises(InvalidRequestError, match="min_tokens"):
        asyncio.run(submit())


def test_both_mask_unpackings_agree_token_for_token() -> None:
    """The CPU path (numpy) and the device path (shifts) read llguidance's bit order the same way."""
    words = torch.randint(-(2**31), 2**31 - 1, (5, 9), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    vocab = 9 * 32 - 7
    shifted = unpack_with_shifts(words, vocab)
    assert torch.equal(unpack_with_numpy(words, vocab), shifted)
    assert bool(shifted[0, 33]) == bool((int(words[0, 1]) >> 1) & 1), "bit i of word w is token 32 w + i"
