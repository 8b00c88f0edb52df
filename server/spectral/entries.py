"""dW as a sparse map between real spectral feature vectors.

Both methods apply ``dW x`` as ``inverse(P @ forward(x))`` with ``P`` sparse (see
docs/spectral-path.md). For a layer ``(d_out, d_in) = (M, N)`` the forward features of a
real token ``x`` are laid out as

    [ Re rfft(x) (N//2+1) | Im rfft(x) (N//2+1) | dct_ortho(x) (N) ]

and the output features as

    [ Re H (M//2+1) | Im H (M//2+1) | D (M) ]   ->   y = irfft(H, M) + idct_ortho(D)

A FourierFT location ``(u, v)`` becomes two entries (real and imaginary part), an sDCTFT
location one. Each entry is ``(in_index, out_index, factor, coef_index)`` and contributes
``factor * scaling * c[coef_index] * features[in_index]`` to ``out[out_index]``. Because
every entry is linear in one coefficient, different adapters, blends of adapters and a
trainable adapter all go through the same gather -> multiply -> scatter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.spectral.adapter import DctNorm, Method, ModuleSpectrum
from server.spectral.transforms import dct_backward_scale


@dataclass(frozen=True)
class FeatureLayout:
    """Offsets of the three segments of the forward (``d_in``) or output (``d_out``) features."""

    length: int

    @property
    def half(self) -> int:
        return self.length // 2 + 1

    @property
    def imag_offset(self) -> int:
        return self.half

    @property
    def dct_offset(self) -> int:
        return 2 * self.half

    @property
    def size(self) -> int:
        return 2 * self.half + self.length


@dataclass(frozen=True)
class SpectralEntries:
    in_index: torch.Tensor
    out_index: torch.Tensor
    factor: torch.Tensor
    coef_index: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.in_index.numel())


def _fourier_entries(spectrum: ModuleSpectrum) -> SpectralEntries:
    d_out, d_in = spectrum.shape
    rows, cols = spectrum.rows.long(), spectrum.cols.long()
    layout_in, layout_out = FeatureLayout(d_in), FeatureLayout(d_out)
    # ifft_N(x)[v] = conj(rfft(x)[v]) / N for v <= N/2, and rfft(x)[N - v] / N above.
    in_bin = torch.minimum(cols, (d_in - cols) % d_in)
    in_imag_sign = torch.where(cols <= d_in // 2, -1.0, 1.0)
    # Re(ifft_M(Z)) = irfft of the Hermitian part of Z: a bin u lands on min(u, M-u), halved,
    # conjugated above M/2; the self-conjugate bins 0 and M/2 keep only the real part.
    out_bin = torch.minimum(rows, (d_out - rows) % d_out)
    self_conjugate = (rows == 0) | ((d_out % 2 == 0) & (rows == d_out // 2))
    out_real = torch.where(self_conjugate, 1.0, 0.5)
    out_imag = torch.where(self_conjugate, 0.0, torch.where(rows < d_out / 2, 0.5, -0.5))
    coef_index = torch.arange(rows.numel())
    return SpectralEntries(
        in_index=torch.cat([in_bin, layout_in.imag_offset + in_bin]),
        out_index=torch.cat([out_bin, layout_out.imag_offset + out_bin]),
        factor=torch.cat([out_real, in_imag_sign * out_imag]) / d_in,
        coef_index=torch.cat([coef_index, coef_index]),
    )


def _dct_entries(spectrum: ModuleSpectrum, norm: DctNorm) -> SpectralEntries:
    d_out, d_in = spectrum.shape
    rows, cols = spectrum.rows.long(), spectrum.cols.long()
    if norm == "backward":
        factor = 1.0 / (
            dct_backward_scale(d_out, torch.device("cpu"))[rows] * dct_backward_scale(d_in, torch.device("cpu"))[cols]
        )
    else:
        factor = torch.ones(rows.numel())
    return SpectralEntries(
        in_index=FeatureLayout(d_in).dct_offset + cols,
        out_index=FeatureLayout(d_out).dct_offset + rows,
        factor=factor.float(),
        coef_index=torch.arange(rows.numel()),
    )


def compile_entries(method: Method, norm: DctNorm, spectrum: ModuleSpectrum) -> SpectralEntries:
    if method == "fourierft":
        return _fourier_entries(spectrum)
    return _dct_entries(spectrum, norm)
