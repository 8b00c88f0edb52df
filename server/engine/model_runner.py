"""Loads the frozen base model once and runs the step's routed forwards over the preallocated KV cache."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from server.engine.kv_cache import (
    ATTENTION_IMPLEMENTATION,
    DecodeLayout,
    KVCache,
    PrefillLayout,
    PrefillSegmentLayout,
)
from server.engine.kv_cache_manager import RowMove
from server.engine.scheduler import PrefillSegment
from server.engine.sequence import Sequence
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


class ModelRunner:
    """Owns the model, its tokenizer, the adapter bank wired into its linear layers and the KV cache.

    It turns a step's sequences into tensors (tokens, positions, the attention layout, the
    per-row adapter routing) and runs one forward for the prefill segments and one for the
    decode rows. Everything that decides the shape of the work is known on the host before the
    forward, so nothing inside it waits for the device.
    """

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", device: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=self.dtype, attn_implementation=ATTENTION_IMPLEMENTATION
        )
        self.model = self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.bank = AdapterBank(self.device)
        self.module_shapes = attach_routed_layers(self.model, self.bank)
        self.architecture = (getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0]
        self.eos_token_ids = self._eos_token_ids()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.kv_cache: KVCache | None = None
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

    def allocate_kv_cache(self, rows: int, capacity: int) -> None:
        """Preallocate ``rows`` KV rows (plus the staging row) of ``capacity`` positions each."""
        window = getattr(self.model.config, "sliding_window", None)
        if window and getattr(self.model.config, "use_sliding_window", True) and window < capacity:
            raise ValueError(
                f"{self.architecture} uses sliding-window attention ({window} tokens), which the engine does "
                f"not implement; keep --max-total-tokens <= {window}"
            )
        self.kv_cache = KVCache(rows + 1, capacity, self.device)
        # One token into the staging row allocates every layer's tensors now, not under the first request.
        self._forward(
            torch.tensor([[self.pad_token_id]], device=self.device),
            torch.zeros(1, 1, dtype=torch.long, device=self.device),
            PrefillLayout((PrefillSegmentLayout(rows, 0, 1, None),)),
            [[]],
            [[]],
            1,
        )
        logger.info("kv cache allocated rows=%d capacity=%d bytes=%d", rows, capacity, self.kv_cache.bytes)

    @torch.inference_mode()
    def move_rows(self, moves: list[RowMove]) -> None:
        assert self.kv_cache is not None
        self.kv_cache.move(moves)

    def prefill(self, segments: list[PrefillSegment]) -> torch.Tensor:
        """Write the segments' KV; fp32 logits after each segment's last token, ``[segments, vocab]``."""
        width = max(segment.length for segment in segments)
        input_ids = torch.full((len(segments), width), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros(len(segments), width, dtype=torch.long)
        layouts = []
        for row, segment in enumerate(segments):
            tokens = segment.sequence.prompt[segment.start : segment.end]
            input_ids[row, : segment.length] = torch.tensor(tokens, dtype=torch.long)
            # Padding repeats the last real position: valid for learned position tables, never attended.
            positions[row] = segment.start + torch.arange(width).clamp(max=segment.length - 1)
            visible = None
            if segment.start:
                columns = torch.arange(segment.end, device=self.device)
                queries = torch.arange(segment.start, segment.end, device=self.device)
                visible = columns[None, :] <= queries[:, None]
            assert segment.sequence.kv_row is not None
            layouts.append(PrefillSegmentLayout(segment.sequence.kv_row, segment.start, segment.length, visible))
        last = torch.tensor([[segment.length - 1] for segment in segments], device=self.device)
        sequences = [segment.sequence for segment in segments]
        return self._forward(
            input_ids.to(self.device),
            positions.to(self.device),
            PrefillLayout(tuple(layouts)),
            [s.adapter_slots for s in sequences],
            [s.adapter_weights for s in sequences],
            width,
            logits_to_keep=last,
        )

    def decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """One token for each running row (rows ``0 .. B-1``); fp32 logits ``[B, vocab]``."""
        positions_list = [sequence.cached_tokens for sequence in sequences]
        kv_length = max(positions_list) + 1
        positions = torch.tensor(positions_list, dtype=torch.long).to(self.device, non_blocking=True)
        input_ids = torch.tensor([[s.last_token] for s in sequences], dtype=torch.long).to(
            self.device, non_blocking=True
        )
        columns = torch.arange(kv_length, device=self.device)
        layout = DecodeLayout(
            positions=positions,
            row_index=torch.arange(len(sequences), device=self.device),
            visible=(columns[None, :] <= positions[:, None])[:, None, None, :],
            kv_length=kv_length,
        )
        return self._forward(
            input_ids,
            positions[:, None],
            layout,
            [s.adapter_slots for s in sequences],
            [s.adapter_weights for s in sequences],
            1,
        )

    def _no_mask(self, rows: int) -> torch.Tensor:
        return torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=self.device)

    @torch.inference_mode()
    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: DecodeLayout | PrefillLayout,
        row_slots: list[list[int]],
        row_weights: list[list[float]],
        tokens_per_row: int,
        logits_to_keep: int | torch.Tensor = 1,
    ) -> torch.Tensor:
        assert self.kv_cache is not None, "allocate_kv_cache first"
        # A 4-D mask makes transformers skip building its own (which inspects the inputs on the host);
        # spectra_attention reads the layout instead.
        skip_mask = layout.visible if isinstance(layout, DecodeLayout) else self._no_mask(input_ids.shape[0])
        with self.bank.route_rows(row_slots, row_weights, tokens_per_row), self.kv_cache.attending(layout):
            output = self.model(
                input_ids=input_ids,
                position_ids=positions,
                attention_mask=skip_mask,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
        return output.logits[:, -1, :].float()
