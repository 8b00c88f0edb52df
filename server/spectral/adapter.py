"""In-memory representation of a spectral adapter, independent of any file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Method = Literal["fourierft", "sdctft"]
DctNorm = Literal["backward", "ortho"]
METHODS: tuple[Method, ...] = ("fourierft", "sdctft")
DCT_NORMS: tuple[DctNorm, ...] = ("backward", "ortho")


@dataclass(frozen=True)
class ModuleSpectrum:
    """The trained spectrum of one target module.

    ``rows``/``cols`` index the ``(d_out, d_in)`` spectrum of dW (the orientation of
    ``nn.Linear.weight``, also for GPT-2 ``Conv1D`` whose weight is stored transposed).
    """

    coefficients: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple[int, int]
    scaling: float

    @property
    def n(self) -> int:
        return int(self.coefficients.numel())

    def with_coefficients(self, coefficients: torch.Tensor) -> ModuleSpectrum:
        return ModuleSpectrum(coefficients, self.rows, self.cols, self.shape, self.scaling)


@dataclass
class SpectralAdapter:
    """A FourierFT or sDCTFT adapter: one :class:`ModuleSpectrum` per adapted module.

    ``norm`` is the DCT normalisation convention of sDCTFT; FourierFT always uses
    ``ifft2``'s backward normalisation. ``seed`` is FourierFT's ``random_loc_seed`` when
    the locations came from it (needed to export back to PEFT). ``architecture`` names
    the base model class the adapter was trained on.
    """

    method: Method
    modules: dict[str, ModuleSpectrum]
    norm: DctNorm = "backward"
    seed: int | None = None
    architecture: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(spectrum.n for spectrum in self.modules.values())
