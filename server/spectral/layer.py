"""The routed spectral linear layer: ``y = base(x) + dW[slot(token)] x`` for every token at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.spectral.bank import AdapterBank, LayerTable
from server.spectral.entries import FeatureLayout
from server.spectral.routing import Routing, RowEntries
from server.spectral.transforms import dct_ortho, idct_ortho


def _forward_features(x: torch.Tensor, layout: FeatureLayout, routing: Routing) -> torch.Tensor:
    if routing.needs_fourier:
        spectrum = torch.fft.rfft(x)
        parts = [spectrum.real, spectrum.imag]
    else:
        parts = [x.new_zeros(x.shape[0], layout.dct_offset)]
    if routing.needs_dct:
        parts.append(dct_ortho(x))
    return torch.cat(parts, dim=-1)


def _inverse_features(spectrum: torch.Tensor, layout: FeatureLayout, routing: Routing) -> torch.Tensor:
    result = None
    if routing.needs_fourier:
        half = layout.half
        result = torch.fft.irfft(torch.complex(spectrum[:, :half], spectrum[:, half : 2 * half]), n=layout.length)
    if routing.needs_dct:
        dct_part = idct_ortho(spectrum[:, layout.dct_offset :])
        result = dct_part if result is None else result + dct_part
    assert result is not None
    return result


def _slot_coefficients(table: LayerTable, routing: Routing) -> torch.Tensor:
    coefficients = table.slot_coef.index_select(0, routing.unique_slots)
    trainable = routing.trainable
    if trainable is None or table.name not in trainable.coefficients:
        return coefficients
    parameter = trainable.coefficients[table.name]
    padded = F.pad(parameter.float(), (0, coefficients.shape[1] - parameter.numel()))
    return torch.where((routing.unique_slots == trainable.slot)[:, None], padded[None, :], coefficients)


# A prefill row multiplies its features by a dense [out, in] spectral mixing matrix once the adapter's
# entries are dense enough that a few tokens pay for building it (docs/spectral-path.md, "prefill").
MIXING_MATRIX_MIN_TOKENS = 8


def spectral_delta(x: torch.Tensor, table: LayerTable, routing: Routing) -> torch.Tensor:
    """``dW x`` in fp32 for ``x`` of shape ``[tokens, d_in]``, each token with its routed slot(s).

    Per slot present: gather the entry tables of its location set and its coefficients into
    weights ``[U, E]``. Rows whose slots are all 0 (no adapter) are skipped. Per row of tokens,
    either gather the forward features at the entries' input indices, multiply and scatter-add
    into output features (decode, sparse adapters), or scatter the entries once into a dense
    mixing matrix and multiply (prefill of dense adapters); then inverse transform.
    """
    index = routing.adapter_rows
    if index is None:
        return _delta_rows(x, table, routing, None)
    rows, per_row = routing.inverse.shape[0], routing.tokens_per_row
    result = x.new_zeros(rows, per_row, table.shape[0], dtype=torch.float32)
    if index.numel():
        subset = x.view(rows, per_row, -1)[index].reshape(-1, x.shape[-1])
        result[index] = _delta_rows(subset, table, routing, index).view(len(index), per_row, -1)
    return result.view(rows * per_row, -1)


def _row_entries(table: LayerTable, routing: Routing, row_index: torch.Tensor | None) -> RowEntries:
    """Per row: every entry's weight (factor x coefficient x scaling x blend weight) and indices.

    index_select, not advanced indexing: on CPU it is several times faster for these tables, and
    composing the row -> slot -> location-set indices first gathers each table once.
    """
    inverse = routing.inverse if row_index is None else routing.inverse.index_select(0, row_index)
    slots = routing.unique_slots
    locsets = table.slot_locset.index_select(0, slots)
    entry_weights = (
        table.locset_factor.index_select(0, locsets)
        * _slot_coefficients(table, routing).gather(1, table.locset_coef.index_select(0, locsets))
        * table.slot_scale.index_select(0, slots)[:, None]
    )
    rows = inverse.shape[0]
    flat_inverse = inverse.reshape(-1)
    weights = entry_weights.index_select(0, flat_inverse).view(rows, inverse.shape[1], -1)
    if routing.weights is not None:
        blend = routing.weights if row_index is None else routing.weights.index_select(0, row_index)
        weights = weights * blend[..., None]
    row_locsets = locsets.index_select(0, flat_inverse)
    return RowEntries(
        weights=weights.flatten(1),
        in_index=table.locset_in.index_select(0, row_locsets).view(rows, -1),
        out_index=table.locset_out.index_select(0, row_locsets).view(rows, -1),
    )


def _delta_rows(x: torch.Tensor, table: LayerTable, routing: Routing, row_index: torch.Tensor | None) -> torch.Tensor:
    d_out, d_in = table.shape
    if routing.trainable is None and not routing.every_layer:
        # The same rows decode with the same adapters step after step: their entries are kept on the
        # routing, which the bank reuses while the batch and the resident adapters stay the same. A
        # static routing (CUDA graphs) recomputes them: a replay must gather the slots copied in.
        entries = routing.entries.get(table.name)
        if entries is None:
            entries = routing.entries[table.name] = _row_entries(table, routing, row_index)
    else:
        entries = _row_entries(table, routing, row_index)
    rows, per_row = entries.weights.shape[0], routing.tokens_per_row
    row_weights, in_index, out_index = entries.weights, entries.in_index, entries.out_index
    layout_in, layout_out = FeatureLayout(d_in), FeatureLayout(d_out)
    features = _forward_features(x.float(), layout_in, routing).view(rows, per_row, -1)
    in_size = features.shape[-1]
    out_size = layout_out.size if routing.needs_dct else layout_out.dct_offset
    if per_row > 1 and in_index.shape[1] * MIXING_MATRIX_MIN_TOKENS >= in_size * out_size:
        mixing = features.new_zeros(rows, out_size * in_size).scatter_add(
            1, out_index * in_size + in_index, row_weights
        )
        spectrum = torch.bmm(features, mixing.view(rows, out_size, in_size).transpose(1, 2))
    else:
        contributions = features.gather(2, in_index[:, None, :].expand(-1, per_row, -1)) * row_weights[:, None, :]
        spectrum = features.new_zeros(rows, per_row, out_size).scatter_add(
            2, out_index[:, None, :].expand(-1, per_row, -1), contributions
        )
    return _inverse_features(spectrum.reshape(rows * per_row, out_size), layout_out, routing)


class RoutedSpectralLinear(nn.Module):
    """Wraps an ``nn.Linear`` or GPT-2 ``Conv1D`` (sharing, never copying, its weights)."""

    def __init__(self, base_layer: nn.Module, table: LayerTable, bank: AdapterBank):
        super().__init__()
        self.base_layer = base_layer
        self.table = table
        self.bank = bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self.bank.routing
        if routing is None or not routing.any_adapter:
            return out
        if not routing.every_layer and self.table.covered_slots.isdisjoint(routing.unique_slot_list):
            return out
        tokens = x.reshape(-1, x.shape[-1])
        if tokens.shape[0] != routing.token_count:
            raise RuntimeError(
                f"{self.table.name}: routing has {routing.token_count} token slots "
                f"but the layer got {tokens.shape[0]} tokens"
            )
        delta = spectral_delta(tokens, self.table, routing)
        return out + delta.reshape(out.shape).to(out.dtype)
