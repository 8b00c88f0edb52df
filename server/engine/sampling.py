"""Per-row sampling over a batch of logits: each row keeps its own parameters and RNG."""

from __future__ import annotations

import torch

from server.engine.types import SamplingParams


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # The CTRL rule used by transformers and TGI: shrink positive logits, grow negative ones.
    scores = logits[seen]
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_row(
    logits: torch.Tensor, params: SamplingParams, seen_tokens: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, float]:
    """Choose the next token of one row from its fp32 ``[vocab]`` logits; return it with its logprob.

    The logprob is the model's own (before penalties, temperature and filtering), as TGI and
    vLLM report it.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = logits.clone()
    if params.repetition_penalty != 1.0 and seen_tokens.numel():
        scores = _apply_repetition_penalty(scores, seen_tokens, params.repetition_penalty)
    if not params.greedy:
        filtered = _filter_top_k_top_p(scores / params.temperature, params.top_k, params.top_p)
        probabilities = filtered.softmax(-1)
        # An extreme temperature or penalty (1e-300, say) overflows scores to inf and softmax to NaN;
        # the limit of such settings is the greedy choice, taken below.
        if bool(torch.isfinite(probabilities).all()):
            token = int(torch.multinomial(probabilities, 1, generator=generator))
            return token, float(logprobs[token])
    token = int(torch.argmax(scores))
    return token, float(logprobs[token])
