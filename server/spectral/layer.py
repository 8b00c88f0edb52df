"""The routed spectral linear layer: ``y = base(x) + dW[slot(token)] x`` for every token at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.spectral.bank import AdapterBank, LayerTable
from server.spectral.entries import FeatureLayout
from server.spectral.routing import Routing
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
    coefficients = table.slot_coef[routing.unique_slots]
    trainable = routing.trainable
    if trainable is None or table.name not in trainable.coefficients:
        return coefficients
    parameter = trainable.coefficients[table.name]
    padded = F.pad(parameter.float(), (0, coefficients.shape[1] - parameter.numel()))
    return torch.where((routing.unique_slots == trainable.slot)[:, None], padded[None, :], coefficients)


def spectral_delta(x: torch.Tensor, table: LayerTable, routing: Routing) -> torch.Tensor:
    """``dW x`` in fp32 for ``x`` of shape ``[tokens, d_in]``, each token with its routed slot(s).

    Per slot present: gather the entry tables of its location set and its coefficients into
    weights ``[U, E]``; per row of tokens: gather the forward features at the entries' input
    indices, multiply, scatter-add into output features; inverse transform.
    """
    d_out, d_in = table.shape
    locsets = table.slot_locset[routing.unique_slots]
    entry_weights = (
        table.locset_factor[locsets]
        * _slot_coefficients(table, routing).gather(1, table.locset_coef[locsets])
        * table.slot_scale[routing.unique_slots][:, None]
    )
    row_weights = entry_weights[routing.inverse]
    if routing.weights is not None:
        row_weights = row_weights * routing.weights[..., None]
    rows, per_row = routing.inverse.shape[0], routing.tokens_per_row
    row_weights = row_weights.flatten(1)[:, None, :]
    in_index = table.locset_in[locsets][routing.inverse].flatten(1)[:, None, :].expand(-1, per_row, -1)
    out_index = table.locset_out[locsets][routing.inverse].flatten(1)[:, None, :].expand(-1, per_row, -1)
    layout_in, layout_out = FeatureLayout(d_in), FeatureLayout(d_out)
    features = _forward_features(x.float(), layout_in, routing).view(rows, per_row, -1)
    contributions = features.gather(2, in_index) * row_weights
    out_size = layout_out.size if routing.needs_dct else layout_out.dct_offset
    spectrum = features.new_zeros(rows, per_row, out_size).scatter_add(2, out_index, contributions)
    return _inverse_features(spectrum.view(rows * per_row, out_size), layout_out, routing)


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
        if routing is None or not routing.any_adapter or self.table.covered_slots.isdisjoint(routing.unique_slot_list):
            return out
        tokens = x.reshape(-1, x.shape[-1])
        if tokens.shape[0] != routing.token_count:
            raise RuntimeError(
                f"{self.table.name}: routing has {routing.token_count} token slots "
                f"but the layer got {tokens.shape[0]} tokens"
            )
        delta = spectral_delta(tokens, self.table, routing)
        return out + delta.reshape(out.shape).to(out.dtype)
