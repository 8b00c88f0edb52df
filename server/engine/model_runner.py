"""Loads the frozen base model once and runs the step's routed forwards over the preallocated KV cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from server.engine.cpu_allocator import keep_freed_memory_for_reuse
from server.engine.cuda_graphs import DecodeGraphs, DecodeInputs
from server.engine.kv_cache import (
    ATTENTION_IMPLEMENTATION,
    DecodeLayout,
    KVCache,
    PrefillLayout,
    PrefillSegmentLayout,
)
from server.engine.kv_cache_manager import RowMove
from server.engine.sampler import PromptScores, score_tokens
from server.engine.scheduler import PrefillSegment
from server.engine.sequence import Sequence
from server.spectral.bank import AdapterBank
from server.spectral.model import attach_routed_layers
from server.spectral.routing import Routing

logger = logging.getLogger(__name__)

KV_LENGTH_BUCKET = 256

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _eos_token_ids(model_path: str, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    try:
        generation = GenerationConfig.from_pretrained(model_path)
        eos = generation.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        logger.info("no generation_config.json in %s; stopping on the tokenizer's eos only", model_path)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


@dataclass(frozen=True)
class PrefillOutput:
    logits: torch.Tensor  # [segments, vocab]: after each segment's last token
    prompt_scores: list[PromptScores | None]  # per segment, for requests that asked for prompt logprobs


class ModelRunner:
    """Owns the model, its tokenizer, the adapter bank wired into its linear layers and the KV cache.

    It turns a step's sequences into tensors (tokens, positions, the attention layout, the
    per-row adapter routing) and runs one forward for the prefill segments and one for the
    decode rows. Everything that decides the shape of the work is known on the host before the
    forward, so nothing inside it waits for the device.
    """

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", device: str = "auto"):
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, attn_implementation=ATTENTION_IMPLEMENTATION
        ).to(torch_device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._setup(model, tokenizer, str(model_path), _eos_token_ids(str(model_path), tokenizer))

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, *, dtype: str, device: str
    ) -> ModelRunner:
        """Random weights built on the device from ``config``: real shapes without a download (benchmarks)."""
        runner = cls.__new__(cls)
        torch_device = resolve_device(device)
        with torch_device:
            model = AutoModelForCausalLM.from_config(
                config, dtype=resolve_dtype(dtype, torch_device), attn_implementation=ATTENTION_IMPLEMENTATION
            )
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        runner._setup(model, tokenizer, f"random:{config.model_type}", eos)
        return runner

    def _setup(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_path: str, eos_token_ids: set[int]
    ) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()
        self.dtype = next(model.parameters()).dtype
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.bank = AdapterBank(self.device)
        self.module_shapes = attach_routed_layers(self.model, self.bank)
        self.architecture = (getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0]
        self.eos_token_ids = eos_token_ids
        # The logits' width: embedding tables are often padded past the tokenizer's vocabulary.
        self.vocab_size = self.model.get_output_embeddings().out_features
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.kv_cache: KVCache | None = None
        self.decode_graphs: DecodeGraphs | None = None
        logger.info(
            "model loaded path=%s architecture=%s dtype=%s device=%s routed_layers=%d",
            self.model_path,
            self.architecture,
            self.dtype,
            self.device,
            len(self.module_shapes),
        )

    def allocate_kv_cache(self, rows: int, capacity: int, *, cuda_graphs: bool = True) -> None:
        """Preallocate ``rows`` KV rows (plus the staging row) of ``capacity`` positions each; on a CUDA
        device, decode steps then run as CUDA graphs unless ``cuda_graphs`` is false."""
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
            self.bank.row_routing([[]], [[]], 1),
        )
        if cuda_graphs and self.device.type == "cuda":
            self.decode_graphs = DecodeGraphs(self)
        logger.info(
            "kv cache allocated rows=%d capacity=%d bytes=%d cuda_graphs=%s",
            rows,
            capacity,
            self.kv_cache.bytes,
            self.decode_graphs is not None,
        )

    @torch.inference_mode()
    def move_rows(self, moves: list[RowMove]) -> None:
        assert self.kv_cache is not None
        self.kv_cache.move(moves)

    def prefill(self, segments: list[PrefillSegment]) -> PrefillOutput:
        """Write the segments' KV; fp32 logits after each segment's last token, and the prompt scores of
        the segments whose request asked for ``prompt_logprobs``."""
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
        scored = [segment.sequence.request.params.prompt_logprobs is not None for segment in segments]
        sequences = [segment.sequence for segment in segments]
        # Scoring the prompt needs the logits at every position; the usual prefill keeps only the last.
        logits = self._forward(
            input_ids.to(self.device),
            positions.to(self.device),
            PrefillLayout(tuple(layouts)),
            self.bank.row_routing([s.adapter_slots for s in sequences], [s.adapter_weights for s in sequences], width),
            logits_to_keep=0 if any(scored) else last,
        )
        if not any(scored):
            return PrefillOutput(logits, [None] * len(segments))
        return PrefillOutput(
            logits.gather(1, last[:, :, None].expand(-1, -1, logits.shape[2]))[:, 0],
            [
                self._prompt_scores(logits[row], segment) if wanted else None
                for row, (segment, wanted) in enumerate(zip(segments, scored, strict=True))
            ],
        )

    def _prompt_scores(self, logits: torch.Tensor, segment: PrefillSegment) -> PromptScores:
        """Position ``i`` of the segment predicts prompt token ``start + i + 1``; the last position of the
        prompt's final segment predicts the first generated token, which is the sampler's."""
        prompt = segment.sequence.prompt
        targets = prompt[segment.start + 1 : segment.end + 1]
        top = segment.sequence.request.params.prompt_logprobs or 0
        return score_tokens(logits[: len(targets)], torch.tensor(targets, device=self.device), top)

    def decode(self, sequences: list[Sequence], *, bucketed: bool | None = None) -> torch.Tensor:
        """One token for each running row (rows ``0 .. B-1``); fp32 logits ``[B, vocab]``.

        With CUDA graphs (or ``bucketed``) the step runs at its bucket's static shapes: rows padded
        to a power of two, KV length to a multiple of 256, routing without de-duplication.
        """
        bucketed = self.decode_graphs is not None if bucketed is None else bucketed
        inputs = self._decode_inputs(sequences, bucketed)
        logits = self.decode_graphs.run(inputs) if self.decode_graphs is not None else self.decode_step(inputs)
        return logits[: len(sequences)]

    def _decode_inputs(self, sequences: list[Sequence], bucketed: bool) -> DecodeInputs:
        assert self.kv_cache is not None, "allocate_kv_cache first"
        columns = [sequence.cached_tokens for sequence in sequences]
        kv_length = max(columns) + 1
        rows = len(sequences)
        input_ids = [sequence.last_token for sequence in sequences]
        slots = [sequence.adapter_slots for sequence in sequences]
        weights = [sequence.adapter_weights for sequence in sequences]
        positions = list(columns)
        if bucketed:
            rows = min(1 << (rows - 1).bit_length(), self.kv_cache.rows - 1)
            kv_length = min(self.kv_cache.capacity, -(-kv_length // KV_LENGTH_BUCKET) * KV_LENGTH_BUCKET)
            padding = rows - len(sequences)
            # Padding rows are free rows; they write their last column, which every sequence
            # overwrites before it can see it, at model position 0.
            input_ids += [self.pad_token_id] * padding
            columns += [self.kv_cache.capacity - 1] * padding
            positions += [0] * padding
            slots += [[]] * padding
            weights += [[]] * padding
        routing = self.bank.row_routing(slots, weights, 1, static=bucketed)

        def device_longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        return DecodeInputs(
            input_ids=device_longs(input_ids)[:, None],
            positions=device_longs(positions)[:, None],
            kv_columns=device_longs(columns),
            kv_length=kv_length,
            routing=routing,
        )

    @torch.inference_mode()
    def decode_step(self, inputs: DecodeInputs) -> torch.Tensor:
        """The decode forward: every tensor it reads is in ``inputs``, and nothing in it waits for the
        device. CUDA graphs capture exactly this function (``cuda_graphs.py``); the CPU runs it as is."""
        assert self.kv_cache is not None, "allocate_kv_cache first"
        rows = inputs.kv_columns.shape[0]
        columns = torch.arange(inputs.kv_length, device=self.device)
        layout = DecodeLayout(
            positions=inputs.kv_columns,
            row_index=torch.arange(rows, device=self.device),
            visible=(columns[None, :] <= inputs.kv_columns[:, None])[:, None, None, :],
            kv_length=inputs.kv_length,
        )
        return self._forward(inputs.input_ids, inputs.positions, layout, inputs.routing)

    def _no_mask(self, rows: int) -> torch.Tensor:
        return torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=self.device)

    @torch.inference_mode()
    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: DecodeLayout | PrefillLayout,
        routing: Routing,
        logits_to_keep: int | torch.Tensor = 1,
    ) -> torch.Tensor:
        """One routed forward; fp32 logits at each row's kept position, ``[rows, vocab]``, or at every
        position, ``[rows, positions, vocab]``, for ``logits_to_keep=0``."""
        assert self.kv_cache is not None, "allocate_kv_cache first"
        # A 4-D mask makes transformers skip building its own (which inspects the inputs on the host);
        # spectra_attention reads the layout instead.
        skip_mask = layout.visible if isinstance(layout, DecodeLayout) else self._no_mask(input_ids.shape[0])
        with self.bank.routed(routing), self.kv_cache.attending(layout):
            output = self.model(
                input_ids=input_ids,
                position_ids=positions,
                attention_mask=skip_mask,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
        # logits_to_keep=0 keeps every position ([rows, positions, vocab]); otherwise one per row.
        return (
            output.logits.float()
            if isinstance(logits_to_keep, int) and logits_to_keep == 0
            else (output.logits[:, -1, :].float())
        )
