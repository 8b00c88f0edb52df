"""Tiny, deterministically generated causal LMs that ship "inside" Spectra.

The server needs a real Hugging Face model without network access, so the default model is
generated on first use from a fixed seed: every machine builds byte-identical weights, and
adapters trained against one copy apply to any other. Tests use the same helpers to build
other tiny architectures (Llama with GQA, GPT-2 with ``Conv1D``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from server.models.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    PAD_TOKEN,
    VOCAB_SIZE,
    build_byte_tokenizer,
    byte_generation_config,
    special_token_id,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "spectra-tiny-llama"
DEFAULT_SEED = 0
# Embedding tables padded to a multiple of 8 keep matmul shapes aligned; the padding ids
# are never produced by the tokenizer.
PADDED_VOCAB_SIZE = -(-VOCAB_SIZE // 8) * 8


def _special_ids() -> dict[str, int]:
    return {
        "bos_token_id": special_token_id(BOS_TOKEN),
        "eos_token_id": special_token_id(EOS_TOKEN),
        "pad_token_id": special_token_id(PAD_TOKEN),
    }


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """Config of the default embedded model; ``overrides`` replace any field.

    Two key-value heads for eight query heads (GQA) make ``k_proj``/``v_proj`` rectangular
    (256 -> 64), which adapters must handle.
    """
    fields: dict[str, Any] = {
        "vocab_size": PADDED_VOCAB_SIZE,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "tie_word_embeddings": False,
        **_special_ids(),
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_gpt2_config(**overrides: Any) -> GPT2Config:
    """A tiny GPT-2 (``Conv1D`` projections, fused ``c_attn``); ``overrides`` replace any field."""
    fields: dict[str, Any] = {
        "vocab_size": PADDED_VOCAB_SIZE,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 512,
        **_special_ids(),
    }
    fields.update(overrides)
    return GPT2Config(**fields)


def save_tiny_model(directory: Path, config: PretrainedConfig, *, seed: int = DEFAULT_SEED) -> Path:
    """Initialise a float32 model from ``config`` with ``seed`` and save it, the byte tokenizer and
    the generation config to ``directory``, loadable offline by the ``Auto*`` classes.

    The same config and seed always produce the same ``model.safetensors`` bytes.
    """
    tokenizer = build_byte_tokenizer()
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} does not cover the {len(tokenizer)} tokenizer ids")
    # Seed a forked RNG so that building a model never perturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = byte_generation_config()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def ensure_default_model(data_dir: Path) -> Path:
    """Return ``data_dir/models/spectra-tiny-llama``, generating it first if it is missing.

    The model is written to a temporary sibling and renamed into place, so the target
    directory either does not exist or is complete, even after a crash or a concurrent call.
    """
    target = data_dir / "models" / DEFAULT_MODEL_NAME
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", suffix=".tmp", dir=target.parent))
    try:
        logger.info("generating embedded model %s in %s", DEFAULT_MODEL_NAME, target)
        save_tiny_model(staging, tiny_llama_config())
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its copy is byte-identical, so keep it.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
