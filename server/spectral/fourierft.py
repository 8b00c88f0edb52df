"""FourierFT (arXiv 2405.03003) with PEFT's exact semantics."""

from __future__ import annotations

import torch

from server.spectral.adapter import ModuleSpectrum


def peft_locations(seed: int, shape: tuple[int, int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(rows, cols)`` PEFT draws for a ``(d_out, d_in)`` layer: randperm with ``random_loc_seed``."""
    d_out, d_in = shape
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return flat // d_in, flat % d_in


def delta_weight(spectrum: ModuleSpectrum) -> torch.Tensor:
    """Dense ``dW = scaling * Re(ifft2(S))`` of shape ``(d_out, d_in)`` in fp32."""
    dense = torch.zeros(spectrum.shape, dtype=torch.float32, device=spectrum.coefficients.device)
    dense[spectrum.rows, spectrum.cols] = spectrum.coefficients.float()
    # Two 1-D inverse FFTs, not torch.fft.ifft2: torch 2.13's CPU ifft2 returns wrong values for a
    # 2048x2048 fp32 input with 2 threads (tests/test_spectral_maths.py pins the shape).
    rows_done = torch.fft.ifft(dense.to(torch.complex64), dim=1)
    return torch.fft.ifft(rows_done, dim=0).real * spectrum.scaling
