"""FourierFT / sDCTFT maths against scipy and against each other."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from server.spectral import fourierft, sdctft
from server.spectral.adapter import ModuleSpectrum
from server.spectral.transforms import dct2_ortho, dct_backward_scale, dct_ortho, idct2_ortho, idct_ortho


def _random_spectrum(shape: tuple[int, int], n: int, seed: int = 0) -> ModuleSpectrum:
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(shape[0] * shape[1], generator=generator)[:n]
    coefficients = torch.randn(n, generator=generator)
    return ModuleSpectrum(coefficients, flat // shape[1], flat % shape[1], shape, 2.5)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])
def test_dct_and_idct_match_scipy(length: int) -> None:
    x = torch.randn(3, length, dtype=torch.float64)
    assert np.abs(dct_ortho(x).numpy() - scipy.fft.dct(x.numpy(), norm="ortho")).max() < 1e-5
    assert np.abs(idct_ortho(x).numpy() - scipy.fft.idct(x.numpy(), norm="ortho")).max() < 1e-5
    assert torch.allclose(idct_ortho(dct_ortho(x)).double(), x, atol=1e-5)


def test_2d_dct_matches_scipy() -> None:
    matrix = torch.randn(12, 20)
    assert np.abs(dct2_ortho(matrix).numpy() - scipy.fft.dctn(matrix.numpy(), norm="ortho")).max() < 1e-5
    assert np.abs(idct2_ortho(matrix).numpy() - scipy.fft.idctn(matrix.numpy(), norm="ortho")).max() < 1e-5


@pytest.mark.parametrize("norm", ["backward", "ortho"])
@pytest.mark.parametrize("shape", [(16, 16), (24, 40), (40, 9)])
def test_sdctft_reconstruction_equals_scipy_idctn(norm: str, shape: tuple[int, int]) -> None:
    spectrum = _random_spectrum(shape, 50)
    dense = np.zeros(shape)
    dense[spectrum.rows.numpy(), spectrum.cols.numpy()] = spectrum.coefficients.numpy()
    expected = spectrum.scaling * scipy.fft.idctn(dense, type=2, norm=norm)
    got = sdctft.delta_weight(spectrum, norm).numpy()
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_fourierft_delta_weight_matches_numpy_ifft2() -> None:
    spectrum = _random_spectrum((32, 48), 100)
    dense = np.zeros(spectrum.shape)
    dense[spectrum.rows.numpy(), spectrum.cols.numpy()] = spectrum.coefficients.numpy()
    expected = spectrum.scaling * np.fft.ifft2(dense).real
    assert np.abs(fourierft.delta_weight(spectrum).numpy() - expected).max() < 1e-6


@pytest.mark.parametrize("shape", [(2048, 2048), (1024, 2048)])
def test_fourierft_delta_weight_is_right_where_torch_ifft2_is_not(shape: tuple[int, int]) -> None:
    spectrum = _random_spectrum(shape, 300)
    dense = np.zeros(shape)
    dense[spectrum.rows.numpy(), spectrum.cols.numpy()] = spectrum.coefficients.numpy()
    expected = spectrum.scaling * np.fft.ifft2(dense).real
    error = np.abs(fourierft.delta_weight(spectrum).numpy() - expected).max()
    assert error <= 1e-5 * np.abs(expected).max()


def test_peft_locations_follow_randperm_of_the_seed() -> None:
    rows, cols = fourierft.peft_locations(777, (32, 48), 100)
    flat = torch.randperm(32 * 48, generator=torch.Generator().manual_seed(777))[:100]
    assert torch.equal(rows, flat // 48) and torch.equal(cols, flat % 48)


class TestSdctSelection:
    weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(3))

    def _bands(self) -> np.ndarray:
        rows, cols = np.meshgrid(np.arange(48), np.arange(40), indexing="ij")
        radius = np.sqrt(rows**2 + cols**2)
        r_max = radius.max()
        return np.where(radius <= r_max / 3, 0, np.where(radius <= 2 * r_max / 3, 1, 2))

    def test_quota_top_energy_and_random_fill_per_band(self) -> None:
        n, delta = 301, 0.7
        rows, cols = sdctft.select_locations(self.weight, n, delta=delta, seed=5)
        assert rows.numel() == n
        flat = (rows * 40 + cols).numpy()
        assert len(set(flat.tolist())) == n
        energy = scipy.fft.dctn(self.weight.numpy().astype(np.float64), norm="ortho") ** 2
        bands = self._bands()
        quotas = [n // 3 + n - 3 * (n // 3), n // 3, n // 3]
        for band, quota in enumerate(quotas):
            chosen = [f for f in flat if bands.flat[f] == band]
            assert len(chosen) == quota
            members = np.flatnonzero(bands == band)
            top = members[np.argsort(-energy.flat[members], kind="stable")[: int(delta * quota)]]
            assert set(top.tolist()) <= set(chosen)

    def test_deterministic_for_a_seed_and_random_fill_depends_on_it(self) -> None:
        first = sdctft.select_locations(self.weight, 90, seed=1)
        again = sdctft.select_locations(self.weight, 90, seed=1)
        other = sdctft.select_locations(self.weight, 90, seed=2)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert not torch.equal(first[0] * 40 + first[1], other[0] * 40 + other[1])

    def test_small_band_passes_its_quota_on(self) -> None:
        weight = torch.randn(4, 4)
        rows, cols = sdctft.select_locations(weight, 16, seed=0)
        assert sorted((rows * 4 + cols).tolist()) == list(range(16))

    def test_rejects_bad_n(self) -> None:
        with pytest.raises(ValueError, match="n must be in"):
            sdctft.select_locations(self.weight, 48 * 40 + 1)


def test_transforms_first_used_under_inference_mode_still_support_autograd() -> None:
    """The engine serves under inference_mode; fine-tuning then needs gradients through the cached twiddles."""
    length = 37  # a length no other test uses, so the caches are cold here
    with torch.inference_mode():
        dct_ortho(torch.randn(2, length))
        idct_ortho(torch.randn(2, length))
        dct_backward_scale(length, torch.device("cpu"))
    x = torch.randn(2, length, requires_grad=True)
    (idct_ortho(dct_ortho(x)) * dct_backward_scale(length, torch.device("cpu"))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
