"""The preallocated KV cache and the attention that reads and writes it in place.

Per layer, ``keys`` and ``values`` are ``[rows + 1, kv_heads, capacity, head_dim]`` tensors
allocated once (the first forward gives their head shape and dtype): one row per running
sequence plus the staging row (:mod:`server.engine.kv_cache_manager`), ``capacity`` =
``--max-total-tokens``. Position ``p`` of a sequence lives at column ``p`` of its row.

The model's own attention modules call :func:`spectra_attention` (registered with
transformers' ``AttentionInterface`` as ``"spectra"``), which finds the step's layout in a
context variable that the model runner sets around each forward:

- :class:`DecodeLayout`: rows ``0 .. B-1``, one query each at ``positions``. Each layer writes
  one column per row (an indexed copy) and attends over the view ``keys[:B, :, :kv_length]``
  under a ``column <= position`` mask: no other row's KV is read, copied or moved. Grouped
  query heads are folded into the query length (``[B, kv_heads, group, head_dim]``), so SDPA
  reads each KV head once, with no ``repeat_kv`` copy;
- :class:`PrefillLayout`: right-padded segments, each row's positions ``start .. start+n-1``
  written into its KV row and attended causally over ``0 .. start+n-1`` (a chunk of a long
  prompt sees the chunks before it).

Outside a serving forward (fine-tuning, oracles) the function is transformers' SDPA, with
the SDPA mask, so the same model object trains and serves.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.kv_cache_manager import RowMove

ATTENTION_IMPLEMENTATION = "spectra"


@dataclass(frozen=True)
class DecodeLayout:
    positions: torch.Tensor  # [B] long, on the device
    row_index: torch.Tensor  # [B] long: arange(B)
    visible: torch.Tensor  # [B, 1, 1, kv_length] bool: column <= position
    kv_length: int


@dataclass(frozen=True)
class PrefillSegmentLayout:
    kv_row: int
    start: int
    length: int
    visible: torch.Tensor | None  # [length, start + length] bool for a chunk; None: plain causal from 0


@dataclass(frozen=True)
class PrefillLayout:
    segments: tuple[PrefillSegmentLayout, ...]


@dataclass(frozen=True)
class _Step:
    cache: KVCache
    layout: DecodeLayout | PrefillLayout


_CURRENT: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("spectra_kv_step", default=None)


class KVCache:
    def __init__(self, rows: int, capacity: int, device: torch.device):
        self.rows = rows
        self.capacity = capacity
        self.device = device
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._keys.get(index)
        if keys is None:
            shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
            keys = self._keys[index] = torch.zeros(shape, dtype=like.dtype, device=self.device)
            self._values[index] = torch.zeros(shape, dtype=like.dtype, device=self.device)
        return keys, self._values[index]

    def move(self, moves: list[RowMove]) -> None:
        for move in moves:
            for tensors in (self._keys, self._values):
                for tensor in tensors.values():
                    tensor[move.target, :, : move.length].copy_(tensor[move.source, :, : move.length])

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._keys, self._values) for t in d.values())

    @contextmanager
    def attending(self, layout: DecodeLayout | PrefillLayout) -> Iterator[None]:
        token = _CURRENT.set(_Step(self, layout))
        try:
            yield
        finally:
            _CURRENT.reset(token)


def spectra_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[B, heads, S, D]``, ``key``/``value`` ``[B, kv_heads, S, D]`` -> ``[B, S, heads, D]``."""
    step = _CURRENT.get()
    if step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    keys, values = step.cache.layer(module.layer_idx, key)  # type: ignore[arg-type]
    if isinstance(step.layout, DecodeLayout):
        return _decode(query, key, value, keys, values, step.layout, scaling), None
    return _prefill(query, key, value, keys, values, step.layout, scaling), None


def _decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: DecodeLayout,
    scaling: float | None,
) -> torch.Tensor:
    rows, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    keys[layout.row_index, :, layout.positions] = key[:, :, 0]
    values[layout.row_index, :, layout.positions] = value[:, :, 0]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped,
        keys[:rows, :, : layout.kv_length],
        values[:rows, :, : layout.kv_length],
        attn_mask=layout.visible,
        scale=scaling,
    )
    return out.reshape(rows, 1, heads, head_dim)


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: PrefillLayout,
    scaling: float | None,
) -> torch.Tensor:
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for index, segment in enumerate(layout.segments):
        row, start, end = segment.kv_row, segment.start, segment.start + segment.length
        keys[row, :, start:end] = key[index, :, : segment.length]
        values[row, :, start:end] = value[index, :, : segment.length]
        attended = F.scaled_dot_product_attention(
            query[index : index + 1, :, : segment.length],
            keys[row : row + 1, :, :end],
            values[row : row + 1, :, :end],
            attn_mask=segment.visible,
            is_causal=segment.visible is None,
            scale=scaling,
            enable_gqa=True,
        )
        out[index, : segment.length] = attended[0].transpose(0, 1)
    return out


AttentionInterface.register(ATTENTION_IMPLEMENTATION, spectra_attention)
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
