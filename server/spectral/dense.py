"""Dense dW: the reference the routed path is tested against, and what merge/export use."""

from __future__ import annotations

import torch

from server.spectral import fourierft, sdctft
from server.spectral.adapter import SpectralAdapter


def delta_weight(adapter: SpectralAdapter, module: str) -> torch.Tensor:
    """``dW`` of ``module`` as an fp32 ``(d_out, d_in)`` matrix (``nn.Linear.weight`` orientation)."""
    spectrum = adapter.modules[module]
    if adapter.method == "fourierft":
        return fourierft.delta_weight(spectrum)
    return sdctft.delta_weight(spectrum, adapter.norm)
