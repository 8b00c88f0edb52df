"""sDCTFT (arXiv 2410.09103): a sparse 2-D DCT spectrum of dW at energy-selected locations."""

from __future__ import annotations

import math

import torch

from server.spectral.adapter import DctNorm, ModuleSpectrum
from server.spectral.transforms import dct2_ortho, dct_backward_scale, idct2_ortho

DEFAULT_DELTA = 0.7
BAND_COUNT = 3


def delta_weight(spectrum: ModuleSpectrum, norm: DctNorm) -> torch.Tensor:
    """Dense ``dW = scaling * idctn(S, type=2, norm=norm)`` of shape ``(d_out, d_in)`` in fp32."""
    d_out, d_in = spectrum.shape
    device = spectrum.coefficients.device
    dense = torch.zeros(spectrum.shape, dtype=torch.float32, device=device)
    dense[spectrum.rows, spectrum.cols] = spectrum.coefficients.float()
    if norm == "backward":
        dense = dense / dct_backward_scale(d_out, device)[:, None] / dct_backward_scale(d_in, device)[None, :]
    return idct2_ortho(dense) * spectrum.scaling


def _band_quotas(n: int, band_sizes: list[int]) -> list[int]:
    """``n // 3`` per band with the remainder to the low band; a band too small passes its excess on."""
    quotas = [n // BAND_COUNT] * BAND_COUNT
    quotas[0] += n - sum(quotas)
    for band in range(BAND_COUNT):
        excess = quotas[band] - band_sizes[band]
        if excess > 0:
            quotas[band] = band_sizes[band]
            receivers = [other for other in range(BAND_COUNT) if other != band]
            for other in receivers:
                room = band_sizes[other] - quotas[other]
                moved = min(room, excess)
                quotas[other] += moved
                excess -= moved
    return quotas


def select_locations(
    weight: torch.Tensor, n: int, *, delta: float = DEFAULT_DELTA, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sDCTFT selection rule on a pretrained ``(d_out, d_in)`` weight.

    Energy ``E = dctn(W0)**2``; three radial bands around the DC corner split at a third and
    two thirds of the largest radius; ``n/3`` locations per band (remainder to the low band),
    of which the top ``floor(delta * quota)`` by energy and the rest drawn uniformly from the
    band's remaining entries with a generator seeded by ``seed``. Returns ``(rows, cols)``.
    """
    d_out, d_in = weight.shape
    if not 0 < n <= d_out * d_in:
        raise ValueError(f"n must be in [1, {d_out * d_in}] for a {d_out}x{d_in} weight, got {n}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    energy = dct2_ortho(weight.detach().float().cpu()).square().flatten()
    rows = torch.arange(d_out, dtype=torch.float64)[:, None]
    cols = torch.arange(d_in, dtype=torch.float64)[None, :]
    radius = torch.sqrt(rows**2 + cols**2).flatten()
    r_max = float(radius.max()) or 1.0
    band = torch.where(radius <= r_max / 3, 0, torch.where(radius <= 2 * r_max / 3, 1, 2))
    members = [torch.nonzero(band == b).flatten() for b in range(BAND_COUNT)]
    quotas = _band_quotas(n, [int(m.numel()) for m in members])
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for band_members, quota in zip(members, quotas, strict=True):
        if quota == 0:
            continue
        order = torch.argsort(energy[band_members], descending=True, stable=True)
        top = math.floor(delta * quota)
        chosen.append(band_members[order[:top]])
        rest = band_members[order[top:]]
        chosen.append(rest[torch.randperm(rest.numel(), generator=generator)[: quota - top]])
    flat = torch.cat(chosen)
    return flat // d_in, flat % d_in
