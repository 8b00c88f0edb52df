"""Loads the frozen base model once and runs routed forwards over a batch KV cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig

from server.spectral.bank import AdapterBank
from server.spectral.model import attach_routed_layers

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor | None


class ModelRunner:
    """Owns the model, its tokenizer and the adapter bank wired into its linear layers."""

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", device: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.bank = AdapterBank(self.device)
        self.module_shapes = attach_routed_layers(self.model, self.bank)
        self.architecture = (getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0]
        self.eos_token_ids = self._eos_token_ids()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logger.info(
            "model loaded path=%s architecture=%s dtype=%s device=%s routed_layers=%d",
            self.model_path,
            self.architecture,
            self.dtype,
            self.device,
            len(self.module_shapes),
        )

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        try:
            generation = GenerationConfig.from_pretrained(self.model_path)
            eos = generation.eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            logger.info("no generation_config.json in %s; stopping on the tokenizer's eos only", self.model_path)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @torch.inference_mode()
    def forward(self, step: StepInputs, cache: DynamicCache) -> torch.Tensor:
        """One routed forward; returns fp32 logits of each row's last position, ``[rows, vocab]``."""
        with self.bank.route(step.slots, step.weights):
            output = self.model(
                input_ids=step.input_ids,
                attention_mask=step.attention_mask,
                position_ids=step.position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return output.logits[:, -1, :].float()
