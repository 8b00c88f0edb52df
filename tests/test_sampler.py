"""The batched sampler against per-row references: greedy, penalties, filters, seeds, logprobs."""

from __future__ import annotations

import torch

from server.engine.sampler import SamplingBatch, sample
from server.engine.types import SamplingParams

CPU = torch.device("cpu")


def draw(logits: torch.Tensor, params: list[SamplingParams], counters: list[int] | None = None, seen=None):
    batch = SamplingBatch.build(params, counters or [0] * len(params), seen, CPU)
    return sample(logits, batch)


def test_greedy_rows_take_the_argmax_and_report_the_models_logprob() -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    chosen = draw(logits, [SamplingParams()] * 5)
    assert chosen.tokens.tolist() == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, chosen.tokens[:, None])[:, 0]
    assert torch.allclose(chosen.logprobs, expected, atol=1e-5)


def test_repetition_penalty_is_the_ctrl_rule_on_seen_tokens_only() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1], [2.0, 1.9, -1.0, -1.1]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    # Row 0 saw token 0, so 2.0 / 2 = 1.0 < 1.9; row 1 has no penalty and keeps token 0.
    assert draw(logits, params, seen=[[0], [0]]).tokens.tolist() == [1, 0]
    negative = torch.tensor([[-1.0, -1.5, -3.0]])
    # A seen negative logit grows more negative: -1.0 * 2 = -2.0 < -1.5.
    assert draw(negative, [SamplingParams(repetition_penalty=2.0)], seen=[[0]]).tokens.tolist() == [1]


def test_sampled_frequencies_follow_the_filtered_distribution() -> None:
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log().repeat(20_000, 1)
    counters = list(range(20_000))
    cases = {
        "plain": (SamplingParams(do_sample=True, seed=3), probabilities),
        "top_k": (SamplingParams(do_sample=True, seed=3, top_k=2), torch.tensor([0.625, 0.375, 0, 0])),
        "top_p": (SamplingParams(do_sample=True, seed=3, top_p=0.85), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95),
    }
    for name, (params, expected) in cases.items():
        tokens = draw(logits, [params] * 20_000, counters).tokens
        observed = torch.bincount(tokens, minlength=4) / 20_000
        assert torch.allclose(observed, expected, atol=0.015), (name, observed)


def test_a_rows_draws_depend_on_its_seed_and_position_not_on_the_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 1000, generator=generator)
    params = [SamplingParams(do_sample=True, temperature=1.5, top_k=40, top_p=0.9, seed=s) for s in range(6)]
    together = draw(logits, params, counters=[7] * 6).tokens.tolist()
    alone = [draw(logits[i : i + 1], [params[i]], counters=[7]).tokens.item() for i in range(6)]
    assert together == alone
    reordered = draw(logits.flip(0), params[::-1], counters=[7] * 6).tokens.tolist()
    assert reordered == together[::-1]
    later = draw(logits, params, counters=[8] * 6).tokens.tolist()
    assert later != together, "the next position draws fresh noise"


def test_extreme_temperature_falls_back_to_greedy() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(do_sample=True, temperature=1e-45, seed=1)] * 3
    assert draw(logits, params).tokens.tolist() == logits.argmax(-1).tolist()


def test_top_logprobs_are_the_most_likely_alternatives() -> None:
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(4))
    chosen = draw(logits, [SamplingParams(top_logprobs=3), SamplingParams(top_logprobs=1)])
    expected = torch.log_softmax(logits, -1).topk(3)
    assert chosen.top_ids is not None and chosen.top_logprobs is not None
    assert torch.equal(chosen.top_ids, expected.indices)
    assert torch.allclose(chosen.top_logprobs, expected.values, atol=1e-5)
