"""Checks every adapter passes before it is stored or served, whatever file it came from."""

from __future__ import annotations

import torch

from server.spectral.adapter import DCT_NORMS, METHODS, SpectralAdapter
from server.spectral.formats.errors import AdapterFormatError, BaseModelMismatchError

COEFFICIENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOCATION_DTYPES = (torch.int16, torch.int32, torch.int64)
DEFAULT_MAX_N_PER_MODULE = 1 << 20
# What torch.Generator.manual_seed accepts (PEFT draws FourierFT locations with it).
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def validate_seed(seed: int | None, what: str = "seed") -> None:
    """A FourierFT ``random_loc_seed`` must be one torch can seed a generator with (PEFT export redraws with it)."""
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        text = str(seed) if len(str(seed)) <= 40 else str(seed)[:37] + "..."
        raise AdapterFormatError(f"{what} {text} is outside the range torch accepts [-2**63, 2**64 - 1]")


def validate_adapter(
    adapter: SpectralAdapter,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    *,
    base_architecture: str | None = None,
    max_n_per_module: int = DEFAULT_MAX_N_PER_MODULE,
) -> None:
    """Raise :class:`AdapterFormatError` naming the first problem; return silently if servable."""
    if adapter.method not in METHODS:
        raise AdapterFormatError(f"unknown method {adapter.method!r}; expected one of {', '.join(METHODS)}")
    if adapter.norm not in DCT_NORMS:
        raise AdapterFormatError(f"unknown DCT norm {adapter.norm!r}; expected one of {', '.join(DCT_NORMS)}")
    if not adapter.modules:
        raise AdapterFormatError("the adapter adapts no module")
    validate_seed(adapter.seed)
    if base_architecture and adapter.architecture and adapter.architecture != base_architecture:
        raise BaseModelMismatchError(
            f"adapter was made for architecture {adapter.architecture!r}, "
            f"the served base model is {base_architecture!r}"
        )
    for name, spectrum in adapter.modules.items():
        if base_shapes is not None:
            if name not in base_shapes:
                raise BaseModelMismatchError(
                    f"module {name!r} does not exist in the base model (or is not a linear layer)"
                )
            if tuple(spectrum.shape) != tuple(base_shapes[name]):
                raise BaseModelMismatchError(
                    f"module {name!r} has shape {list(spectrum.shape)} (d_out, d_in) in the adapter "
                    f"but {list(base_shapes[name])} in the base model"
                )
        _validate_spectrum(name, spectrum.coefficients, spectrum.rows, spectrum.cols, spectrum.shape, max_n_per_module)
        if not torch.isfinite(torch.tensor(spectrum.scaling)):
            raise AdapterFormatError(f"scaling {spectrum.scaling} is not finite", where=f"module {name}")


def _validate_spectrum(
    name: str,
    coefficients: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    shape: tuple[int, int],
    max_n: int,
) -> None:
    where = f"module {name}"
    d_out, d_in = shape
    if d_out < 1 or d_in < 1:
        raise AdapterFormatError(f"shape {list(shape)} must be positive", where=where)
    if coefficients.dtype not in COEFFICIENT_DTYPES:
        raise AdapterFormatError(
            f"coefficients have dtype {coefficients.dtype}; supported: float32, float16, bfloat16", where=where
        )
    if coefficients.dim() != 1:
        raise AdapterFormatError(f"coefficients must be 1-D, got shape {list(coefficients.shape)}", where=where)
    n = coefficients.numel()
    limit = min(d_out * d_in, max_n)
    if not 1 <= n <= limit:
        raise AdapterFormatError(f"n={n} is out of range [1, {limit}] for a {d_out}x{d_in} layer", where=where)
    for label, values in (("rows", rows), ("cols", cols)):
        if values.dtype not in LOCATION_DTYPES:
            raise AdapterFormatError(
                f"location {label} have dtype {values.dtype}; expected an integer type (int16, int32 or int64)",
                where=where,
            )
    if rows.shape != (n,) or cols.shape != (n,):
        raise AdapterFormatError(
            f"{n} coefficients but locations of shape {list(rows.shape)} / {list(cols.shape)}", where=where
        )
    for label, values, bound in (("row", rows, d_out), ("column", cols, d_in)):
        bad = torch.nonzero((values < 0) | (values >= bound)).flatten()
        if bad.numel():
            k = int(bad[0])
            raise AdapterFormatError(
                f"location {k} has {label} {int(values[k])}, outside [0, {bound - 1}]", where=where
            )
    flat = rows.long() * d_in + cols.long()
    if torch.unique(flat).numel() != n:
        sorted_flat, _ = torch.sort(flat)
        dup = int(sorted_flat[1:][sorted_flat[1:] == sorted_flat[:-1]][0])
        raise AdapterFormatError(f"location ({dup // d_in}, {dup % d_in}) appears more than once", where=where)
    finite = torch.isfinite(coefficients.float())
    if not bool(finite.all()):
        k = int(torch.nonzero(~finite).flatten()[0])
        raise AdapterFormatError(f"coefficient {k} is {float(coefficients[k])} (not finite)", where=where)
