"""Any HF causal LM: base-model greedy tokens through the engine equal transformers' own generate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, MistralConfig, Qwen2Config

from server.engine.types import GenerationRequest, SamplingParams
from server.models.embedded import PADDED_VOCAB_SIZE, save_tiny_model
from server.models.tokenizer import build_byte_tokenizer
from tests.engine_fixtures import make_engine, random_adapter

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": PADDED_VOCAB_SIZE,
    "max_position_embeddings": 512,
}
CONFIGS = {
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "gemma": lambda: GemmaConfig(**SMALL, head_dim=16),
}


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_engine_greedy_equals_transformers_generate(architecture: str, tmp_path: Path) -> None:
    tokenizer = build_byte_tokenizer()
    config = CONFIGS[architecture]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    model_dir = save_tiny_model(tmp_path / architecture, config)
    prompts = [tokenizer.encode("Spectral adapters"), tokenizer.encode("x")]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for prompt in prompts:
        output = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        expected.append(output[0, len(prompt) :].tolist())
    engine = make_engine(model_dir, tmp_path / "store")
    engine.registry.register("a", random_adapter(engine.runner.module_shapes, 3))
    engine.start()
    try:

        async def run() -> tuple[list[list[int]], list[int]]:
            handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=10))) for p in prompts]
            adapted = engine.submit(GenerationRequest(prompts[0], SamplingParams(max_new_tokens=10), {"a": 1.0}))
            finals = [await handle.result() for handle in handles]
            return [[t.token_id for t in f.tokens] for f in finals], [
                t.token_id for t in (await adapted.result()).tokens
            ]

        got, adapted = asyncio.run(run())
    finally:
        engine.stop()
    assert got == expected
    assert all(len(tokens) > 0 for tokens in got)
    assert adapted != got[0]
