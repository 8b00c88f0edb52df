"""Batch KV cache: one left-padded, compacted ``DynamicCache`` for all running rows.

Rows join by left-padding the shorter side and concatenating along the batch dim; rows leave
by index-select; columns that are padding in every row are trimmed. The scheme and why we
chose it over paging is in docs/engine.md.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _layers(cache: DynamicCache) -> list:
    return list(cache.layers)


def left_pad(tensor: torch.Tensor, columns: int, dim: int, value: float = 0) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([torch.full(shape, value, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def concat(
    first: DynamicCache, first_mask: torch.Tensor, second: DynamicCache, second_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Rows of ``first`` then rows of ``second``; masks are ``[rows, columns]`` with 1 for real tokens."""
    length = max(first_mask.shape[1], second_mask.shape[1])
    pad_first, pad_second = length - first_mask.shape[1], length - second_mask.shape[1]
    for a, b in zip(_layers(first), _layers(second), strict=True):
        a.keys = torch.cat([left_pad(a.keys, pad_first, 2), left_pad(b.keys, pad_second, 2)])
        a.values = torch.cat([left_pad(a.values, pad_first, 2), left_pad(b.values, pad_second, 2)])
    mask = torch.cat([left_pad(first_mask, pad_first, 1), left_pad(second_mask, pad_second, 1)])
    return first, mask


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep ``rows`` (in this order) and drop the columns that are then padding everywhere."""
    mask = mask[rows]
    live_columns = mask.any(dim=0).nonzero()
    start = int(live_columns[0]) if live_columns.numel() else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys[rows, :, start:]
        layer.values = layer.values[rows, :, start:]
    return mask[:, start:]
