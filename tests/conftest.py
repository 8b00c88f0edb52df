"""Shared fixtures: tiny models built from configs, saved to temp dirs, loaded by the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.models.embedded import save_tiny_model, tiny_gpt2_config, tiny_llama_config
from server.spectral.bank import AdapterBank
from server.spectral.model import attach_routed_layers

TINY_LLAMA = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
}
TINY_GPT2 = {"n_embd": 64, "n_layer": 2, "n_head": 4}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama with GQA (v_proj 64 -> 32 is rectangular)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_llama_config(**TINY_LLAMA))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 whose attention and MLP are ``Conv1D`` (weights stored (d_in, d_out))."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), tiny_gpt2_config(**TINY_GPT2))


def load_base(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def load_routed(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, AdapterBank, dict]:
    model = load_base(model_dir, dtype)
    bank = AdapterBank()
    shapes = attach_routed_layers(model, bank)
    return model, bank, shapes


def greedy_continuation(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate``: the oracle for the engine's tokens."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return output[0, len(prompt_ids) :].tolist()
