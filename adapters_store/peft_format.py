"""PEFT FourierFT directories (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT does not save the spectral locations: it regenerates them from ``random_loc_seed`` and
each layer's shape. Import therefore needs the base model's layer shapes; it stores the
regenerated locations explicitly so served adapters never depend on torch's RNG again.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from adapters_store.errors import AdapterFormatError, BaseModelMismatchError, UnsupportedAdapterTypeError
from adapters_store.native import read_safetensors
from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.fourierft import peft_locations

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ACCEPTED_PEFT_TYPES = ("FOURIERFT",)
_KEY_PREFIX = "base_model.model."
_KEY_SUFFIX = ".fourierft_spectrum"
_DEFAULTS = {"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777}


def parse_config(raw: bytes) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} must be a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in ACCEPTED_PEFT_TYPES:
        raise UnsupportedAdapterTypeError(
            f"{CONFIG_NAME} has peft_type {peft_type!r}; accepted PEFT types: {', '.join(ACCEPTED_PEFT_TYPES)} "
            "(or a Spectra native .safetensors for sdctft)"
        )
    return config


def _config_number(config: dict[str, Any], key: str, kind: type) -> Any:
    value = config.get(key, _DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise AdapterFormatError(f"{CONFIG_NAME}: {key!r} must be {'an integer' if kind is int else 'a number'}")
    return value


def _expected_n(config: dict[str, Any], module: str) -> int:
    pattern = config.get("n_frequency_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{CONFIG_NAME}: 'n_frequency_pattern' must be an object")
    for key, n in pattern.items():
        # PEFT's own rule (peft/tuners/fourierft/model.py): the first key matching ".*\.{key}$".
        try:
            if re.match(rf".*\.{key}$", module):
                return int(n)
        except re.error as error:
            raise AdapterFormatError(f"{CONFIG_NAME}: n_frequency_pattern key {key!r} is not a regex") from error
    return _config_number(config, "n_frequency", int)


def from_peft(config_raw: bytes, weights_raw: bytes, base_shapes: dict[str, tuple[int, int]]) -> SpectralAdapter:
    """Import a PEFT FourierFT adapter for a base model with the given ``(d_out, d_in)`` shapes."""
    config = parse_config(config_raw)
    seed = _config_number(config, "random_loc_seed", int)
    scaling = float(_config_number(config, "scaling", float))
    tensors, _ = read_safetensors(weights_raw)
    if not tensors:
        raise AdapterFormatError(f"{WEIGHTS_NAME} holds no tensors")
    modules = {}
    for key, coefficients in sorted(tensors.items()):
        if not (key.startswith(_KEY_PREFIX) and key.endswith(_KEY_SUFFIX)):
            raise AdapterFormatError(
                f"{WEIGHTS_NAME}: unexpected tensor {key!r}; a FourierFT adapter holds only "
                f"'{_KEY_PREFIX}<module>{_KEY_SUFFIX}' tensors"
            )
        name = key[len(_KEY_PREFIX) : -len(_KEY_SUFFIX)]
        if name not in base_shapes:
            raise BaseModelMismatchError(f"module {name!r} does not exist in the base model (or is not a linear layer)")
        if coefficients.dim() != 1:
            raise AdapterFormatError(
                f"spectrum must be 1-D, got shape {list(coefficients.shape)}", where=f"module {name}"
            )
        expected = _expected_n(config, name)
        if coefficients.numel() != expected:
            raise AdapterFormatError(
                f"spectrum has {coefficients.numel()} coefficients but the config says n_frequency={expected}",
                where=f"module {name}",
            )
        shape = tuple(base_shapes[name])
        if not 1 <= expected <= shape[0] * shape[1]:
            raise AdapterFormatError(
                f"n_frequency={expected} is out of range [1, {shape[0] * shape[1]}] for a {shape[0]}x{shape[1]} layer",
                where=f"module {name}",
            )
        rows, cols = peft_locations(seed, shape, expected)
        modules[name] = ModuleSpectrum(coefficients, rows, cols, (shape[0], shape[1]), scaling)
    extra = {
        "peft_base_model_name_or_path": str(config.get("base_model_name_or_path") or ""),
        "peft_fan_in_fan_out": json.dumps(bool(config.get("fan_in_fan_out", False))),
    }
    return SpectralAdapter("fourierft", modules, norm="backward", seed=seed, extra=extra)


def from_peft_dir(directory: Path, base_shapes: dict[str, tuple[int, int]]) -> SpectralAdapter:
    directory = Path(directory)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        raise AdapterFormatError(f"{directory} is not a PEFT adapter directory: missing {', '.join(missing)}")
    return from_peft((directory / CONFIG_NAME).read_bytes(), (directory / WEIGHTS_NAME).read_bytes(), base_shapes)


def _pattern_key(module: str) -> str:
    # Anchored by PEFT as ".*\.{key}$": drop the first component so a dot precedes the key.
    return re.escape(module.split(".", 1)[1] if "." in module else module)


def to_peft(adapter: SpectralAdapter, base_model_name_or_path: str | None = None) -> dict[str, bytes]:
    """``{file name: bytes}`` of a PEFT directory that ``PeftModel.from_pretrained`` loads."""
    if adapter.method != "fourierft":
        raise AdapterFormatError(f"PEFT has no {adapter.method} adapter type; download it in the native format")
    if adapter.seed is None:
        raise AdapterFormatError("the adapter's locations do not come from a random_loc_seed; PEFT cannot load them")
    scalings = {spectrum.scaling for spectrum in adapter.modules.values()}
    if len(scalings) != 1:
        raise AdapterFormatError("PEFT needs one scaling for all modules; this adapter has several")
    for name, spectrum in adapter.modules.items():
        rows, cols = peft_locations(adapter.seed, spectrum.shape, spectrum.n)
        if not (torch.equal(rows, spectrum.rows.long()) and torch.equal(cols, spectrum.cols.long())):
            raise AdapterFormatError(
                f"locations differ from PEFT's for random_loc_seed={adapter.seed}", where=f"module {name}"
            )
    counts = Counter(spectrum.n for spectrum in adapter.modules.values())
    n_frequency = counts.most_common(1)[0][0]
    config = {
        "peft_type": "FOURIERFT",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or adapter.extra.get("peft_base_model_name_or_path") or None,
        "target_modules": sorted(adapter.modules),
        "n_frequency": n_frequency,
        "n_frequency_pattern": {
            _pattern_key(name): spectrum.n
            for name, spectrum in sorted(adapter.modules.items())
            if spectrum.n != n_frequency
        },
        "scaling": scalings.pop(),
        "random_loc_seed": adapter.seed,
        "fan_in_fan_out": json.loads(adapter.extra.get("peft_fan_in_fan_out", "false")),
        "init_weights": False,
        "inference_mode": True,
        "bias": "none",
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {
        f"{_KEY_PREFIX}{name}{_KEY_SUFFIX}": spectrum.coefficients.detach().cpu().contiguous()
        for name, spectrum in adapter.modules.items()
    }
    return {CONFIG_NAME: json.dumps(config, indent=2).encode(), WEIGHTS_NAME: save_safetensors(tensors)}


def to_peft_dir(adapter: SpectralAdapter, directory: Path, base_model_name_or_path: str | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, data in to_peft(adapter, base_model_name_or_path).items():
        (directory / file_name).write_bytes(data)
    return directory
