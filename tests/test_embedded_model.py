"""The embedded byte tokenizer and the deterministically generated tiny models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.pytorch_utils import Conv1D

from server.models.embedded import (
    DEFAULT_MODEL_NAME,
    ensure_default_model,
    save_tiny_model,
    tiny_gpt2_config,
    tiny_llama_config,
)
from server.models.tokenizer import build_byte_tokenizer

UNICODE_TEXT = "Grüße, 世界! 👋🏽 tabs\tand\nnewlines  . ,"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi 👋"},
]
EXPECTED_CHAT = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n"
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("data"))


def test_tokenizer_round_trips_unicode_one_token_per_byte() -> None:
    tokenizer = build_byte_tokenizer()
    ids = tokenizer(UNICODE_TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == list(UNICODE_TEXT.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == UNICODE_TEXT


def test_special_token_ids_follow_the_bytes() -> None:
    tokenizer = build_byte_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [256, 257, 258, 259, 260]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)


def test_chat_template_renders_chatml() -> None:
    tokenizer = build_byte_tokenizer()
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered == EXPECTED_CHAT
    without_prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert without_prompt == EXPECTED_CHAT.removesuffix("<|im_start|>assistant\n")


def test_tokenizer_survives_save_and_auto_load(tmp_path: Path) -> None:
    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(UNICODE_TEXT)["input_ids"] == tokenizer(UNICODE_TEXT)["input_ids"]
    assert loaded.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) == EXPECTED_CHAT
    assert loaded.all_special_ids == tokenizer.all_special_ids
    assert loaded.decode(loaded(UNICODE_TEXT)["input_ids"], skip_special_tokens=True) == UNICODE_TEXT


def test_default_model_loads_and_runs(default_model_dir: Path) -> None:
    assert default_model_dir.name == DEFAULT_MODEL_NAME
    assert default_model_dir.parent.name == "models"
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert model.dtype == torch.float32
    assert model.model.layers[0].self_attn.v_proj.weight.shape == (64, 256)
    assert model.config.vocab_size >= len(tokenizer)
    inputs = tokenizer("hello", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    generation_config = GenerationConfig.from_pretrained(default_model_dir)
    assert generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_default_model_is_not_regenerated(default_model_dir: Path) -> None:
    weights = default_model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert ensure_default_model(default_model_dir.parent.parent) == default_model_dir
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in default_model_dir.parent.iterdir()] == [DEFAULT_MODEL_NAME]


def test_default_model_generation_is_deterministic(default_model_dir: Path, tmp_path: Path) -> None:
    rng_state = torch.random.get_rng_state()
    again = ensure_default_model(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert _sha256(again / "model.safetensors") == _sha256(default_model_dir / "model.safetensors")


def test_save_tiny_model_rejects_a_vocab_smaller_than_the_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        save_tiny_model(tmp_path, tiny_llama_config(vocab_size=256))


def test_tiny_gpt2_loads_through_auto_classes_with_conv1d(tmp_path: Path) -> None:
    directory = save_tiny_model(tmp_path / "gpt2", tiny_gpt2_config())
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    attention = model.transformer.h[0].attn
    assert isinstance(attention.c_attn, Conv1D)
    assert attention.c_attn.weight.shape == (64, 3 * 64)
    inputs = tokenizer(UNICODE_TEXT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] >= len(tokenizer)
