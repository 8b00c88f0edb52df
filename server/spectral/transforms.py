"""1-D spectral transforms along the last dimension, in fp32, built on torch.fft.

torch has no DCT, so the orthonormal DCT-II and its inverse are computed with one
length-L FFT plus a reordering and a twiddle (Makhoul, 1980). Twiddles are cached per
(length, device) because every routed layer calls these on every forward. They are built
outside inference mode: the engine serves under ``torch.inference_mode`` and fine-tuning needs
autograd through the same cached tensors.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=256)
@torch.inference_mode(False)
def _dct_twiddle(length: int, device: torch.device) -> torch.Tensor:
    k = torch.arange(length, dtype=torch.float64)
    twiddle = torch.exp(-1j * math.pi * k / (2 * length))
    ortho = torch.full((length,), math.sqrt(2.0 / length), dtype=torch.float64)
    ortho[0] = math.sqrt(1.0 / length)
    return (twiddle * ortho).to(torch.complex64).to(device)


@lru_cache(maxsize=256)
@torch.inference_mode(False)
def _idct_twiddle(length: int, device: torch.device) -> torch.Tensor:
    k = torch.arange(length, dtype=torch.float64)
    twiddle = torch.exp(1j * math.pi * k / (2 * length))
    ortho = torch.full((length,), math.sqrt(length / 2.0), dtype=torch.float64)
    ortho[0] = math.sqrt(length)
    return (twiddle * ortho).to(torch.complex64).to(device)


def dct_ortho(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim (scipy.fft.dct(x, norm="ortho"))."""
    length = x.shape[-1]
    reordered = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(reordered.float())
    return (spectrum * _dct_twiddle(length, x.device)).real


def idct_ortho(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct_ortho` along the last dim (scipy.fft.idct(y, norm="ortho"))."""
    length = y.shape[-1]
    y = y.float()
    mirrored = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], dim=-1)
    spectrum = torch.complex(y, -mirrored) * _idct_twiddle(length, y.device)
    reordered = torch.fft.ifft(spectrum).real
    out = torch.empty_like(reordered)
    half = (length + 1) // 2
    out[..., ::2] = reordered[..., :half]
    out[..., 1::2] = reordered[..., half:].flip(-1)
    return out


def dct2_ortho(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of the last two dims."""
    return dct_ortho(dct_ortho(matrix).transpose(-1, -2)).transpose(-1, -2)


def idct2_ortho(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2_ortho`."""
    return idct_ortho(idct_ortho(matrix).transpose(-1, -2)).transpose(-1, -2)


@lru_cache(maxsize=256)
@torch.inference_mode(False)
def dct_backward_scale(length: int, device: torch.device) -> torch.Tensor:
    """``s_L`` with ``dct_unnormalised = dct_ortho * s_L``: [2 sqrt(L), sqrt(2L), sqrt(2L), ...]."""
    scale = torch.full((length,), math.sqrt(2.0 * length), dtype=torch.float32)
    scale[0] = 2.0 * math.sqrt(length)
    return scale.to(device)
