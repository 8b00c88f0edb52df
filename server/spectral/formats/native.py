"""Spectra's native single-file adapter format (layout in docs/adapter-format.md).

One ``.safetensors`` file. Metadata (strings): ``format`` = ``spectra.adapter``,
``format_version``, ``method``, ``norm``, ``architecture``, ``seed`` and ``modules``, a JSON
object ``{module: {"shape": [d_out, d_in], "scaling": float, "locations": "loc.K"}}``. Tensors:
``coef.<module>`` (n,) in the dtype it was uploaded in, and ``loc.K`` (2, n) holding rows and
columns as int16 when the layer fits, else int32, one per distinct location set.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.formats.errors import AdapterFormatError, UnsupportedAdapterTypeError

FORMAT_NAME = "spectra.adapter"
FORMAT_VERSION = "1"
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)
MAX_DIM = (1 << 31) - 1  # a layer dimension; int32 locations must be able to index it


def _location_tensor(spectrum: ModuleSpectrum) -> torch.Tensor:
    dtype = torch.int16 if max(spectrum.shape) <= torch.iinfo(torch.int16).max else torch.int32
    return torch.stack([spectrum.rows, spectrum.cols]).to(dtype).contiguous()


def to_bytes(adapter: SpectralAdapter) -> bytes:
    """Serialise ``adapter`` (already validated) to the native format."""
    tensors: dict[str, torch.Tensor] = {}
    location_keys: dict[str, str] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, spectrum in sorted(adapter.modules.items()):
        locations = _location_tensor(spectrum)
        digest = hashlib.blake2b(locations.numpy().tobytes() + str(spectrum.shape).encode(), digest_size=16).hexdigest()
        if digest not in location_keys:
            location_keys[digest] = f"loc.{len(location_keys)}"
            tensors[location_keys[digest]] = locations
        tensors[f"coef.{name}"] = spectrum.coefficients.detach().cpu().contiguous()
        modules[name] = {"shape": list(spectrum.shape), "scaling": spectrum.scaling, "locations": location_keys[digest]}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": adapter.method,
        "norm": adapter.norm,
        "architecture": adapter.architecture or "",
        "seed": "" if adapter.seed is None else str(adapter.seed),
        "modules": json.dumps(modules, sort_keys=True),
        "extra": json.dumps(adapter.extra, sort_keys=True),
    }
    return _with_sorted_metadata(save_safetensors(tensors, metadata=metadata))


def _with_sorted_metadata(data: bytes) -> bytes:
    """safetensors writes ``__metadata__`` in hash-map order; sorting it makes equal adapters equal bytes
    (the store is content-addressed, and ``--adapter`` at start skips files whose bytes are already stored)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def loads_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` for untrusted input: every way it can fail is an :class:`AdapterFormatError` naming ``what``.

    Besides syntax errors that means nesting deeper than the interpreter's recursion limit
    (``RecursionError``), integers longer than Python's 4300-digit conversion limit (a plain
    ``ValueError``) and bytes that are not UTF-8.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AdapterFormatError(f"{what} is not valid JSON ({error.msg} at char {error.pos})") from error
    except UnicodeDecodeError as error:
        raise AdapterFormatError(f"{what} is not valid JSON (not UTF-8 text at byte {error.start})") from error
    except RecursionError as error:
        raise AdapterFormatError(f"{what} is not valid JSON (nested too deeply)") from error
    except ValueError as error:  # int digits over sys.get_int_max_str_digits()
        raise AdapterFormatError(f"{what} is not valid JSON (a number has too many digits)") from error


def read_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if len(data) < 8:
        raise AdapterFormatError(f"file is {len(data)} bytes: too short to be safetensors")
    header_length = int.from_bytes(data[:8], "little")
    if header_length > len(data) - 8:
        raise AdapterFormatError(
            f"safetensors header claims {header_length} bytes but the file has {len(data) - 8} after the length: "
            "truncated or not a safetensors file"
        )
    try:
        # safetensors parses (and bounds) the header itself first; our json.loads then only sees a header
        # that is already valid, so it cannot recurse deeply or meet a giant integer.
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise AdapterFormatError(f"not a valid safetensors file ({error})") from error
    header = loads_json(data[8 : 8 + header_length], "the safetensors header")
    if not isinstance(header, dict):
        raise AdapterFormatError("safetensors header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise AdapterFormatError("safetensors '__metadata__' is not a JSON object")
    return tensors, metadata


def _json_field(metadata: dict[str, str], key: str) -> Any:
    return loads_json(metadata.get(key) or "{}", f"metadata field {key!r}")


def from_bytes(data: bytes) -> SpectralAdapter:
    """Parse a native adapter file. Structural problems raise :class:`AdapterFormatError`;
    run :func:`server.spectral.formats.validation.validate_adapter` for the semantic checks."""
    tensors, metadata = read_safetensors(data)
    if metadata.get("format") != FORMAT_NAME:
        raise UnsupportedAdapterTypeError(
            f"metadata 'format' is {metadata.get('format')!r}, expected {FORMAT_NAME!r}: upload a Spectra native "
            "adapter or a PEFT FourierFT directory (adapter_config.json + adapter_model.safetensors)"
        )
    version = metadata.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise AdapterFormatError(
            f"format_version {version!r} is not supported; this server reads {', '.join(SUPPORTED_FORMAT_VERSIONS)}"
        )
    modules_meta = _json_field(metadata, "modules")
    if not isinstance(modules_meta, dict) or not modules_meta:
        raise AdapterFormatError("metadata 'modules' must be a non-empty JSON object")
    modules = {}
    for name, info in modules_meta.items():
        modules[name] = _read_module(name, info, tensors)
    expected = {f"coef.{name}" for name in modules} | {info["locations"] for info in modules_meta.values()}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise AdapterFormatError(f"unexpected tensors {unexpected[:5]}")
    seed = metadata.get("seed") or None
    extra = _json_field(metadata, "extra")
    if not isinstance(extra, dict):
        raise AdapterFormatError("metadata 'extra' must be a JSON object")
    try:
        parsed_seed = None if seed is None else int(seed)
    except ValueError as error:
        raise AdapterFormatError(f"metadata 'seed' {_short(seed)} is not an integer") from error
    return SpectralAdapter(
        method=metadata.get("method", ""),  # type: ignore[arg-type]
        modules=modules,
        norm=metadata.get("norm", "backward"),  # type: ignore[arg-type]
        seed=parsed_seed,
        architecture=metadata.get("architecture") or None,
        extra={str(k): str(v) for k, v in extra.items()},
    )


def _read_module(name: str, info: Any, tensors: dict[str, torch.Tensor]) -> ModuleSpectrum:
    where = f"module {name}"
    if not isinstance(info, dict):
        raise AdapterFormatError("module entry must be a JSON object", where=where)
    shape = info.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM for d in shape)
    ):
        raise AdapterFormatError(
            f"'shape' must be [d_out, d_in], integers in [1, {MAX_DIM}], got {_short(shape)}", where=where
        )
    scaling = info.get("scaling")
    if not isinstance(scaling, int | float) or isinstance(scaling, bool):
        raise AdapterFormatError(f"'scaling' must be a number, got {_short(scaling)}", where=where)
    try:
        scaling = float(scaling)
    except OverflowError as error:  # an integer beyond float range (JSON allows any number of digits)
        raise AdapterFormatError(f"'scaling' {_short(scaling)} is too large to be a float", where=where) from error
    if not math.isfinite(scaling):
        raise AdapterFormatError(f"scaling {scaling} is not finite", where=where)
    coefficients = tensors.get(f"coef.{name}")
    if coefficients is None:
        raise AdapterFormatError(f"tensor 'coef.{name}' is missing", where=where)
    locations = tensors.get(str(info.get("locations")))
    if locations is None:
        raise AdapterFormatError(f"locations tensor {info.get('locations')!r} is missing", where=where)
    if locations.dim() != 2 or locations.shape[0] != 2:
        raise AdapterFormatError(f"locations must have shape (2, n), got {list(locations.shape)}", where=where)
    return ModuleSpectrum(coefficients, locations[0], locations[1], (shape[0], shape[1]), scaling)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
