"""PEFT FourierFT directories (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT does not save the spectral locations: it regenerates them from ``random_loc_seed`` and
each layer's shape. Import therefore needs the base model's layer shapes; it stores the
regenerated locations explicitly so served adapters never depend on torch's RNG again.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import regex
import torch
from safetensors.torch import save as save_safetensors

from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.formats.errors import AdapterFormatError, BaseModelMismatchError, UnsupportedAdapterTypeError
from server.spectral.formats.native import loads_json, read_safetensors
from server.spectral.formats.validation import validate_seed
from server.spectral.fourierft import peft_locations

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ACCEPTED_PEFT_TYPES = ("FOURIERFT",)
_KEY_PREFIX = "base_model.model."
_KEY_SUFFIX = ".fourierft_spectrum"
_DEFAULTS = {"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777}
# Pattern keys and target_modules are user regexes matched against module names; a pathological one
# (nested quantifiers) backtracks exponentially in Python's re, so they run under the `regex` module
# with one time budget per config (and without holding the GIL, so other requests go on meanwhile).
REGEX_BUDGET_S = 2.0


class _RegexBudget:
    def __init__(self, seconds: float = REGEX_BUDGET_S):
        self.deadline = time.monotonic() + seconds

    def match(self, pattern: str, text: str, *, full: bool, what: str) -> bool:
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            matcher = regex.fullmatch if full else regex.match
            return matcher(pattern, text, timeout=remaining, concurrent=True) is not None
        except regex.error as error:
            raise AdapterFormatError(f"{CONFIG_NAME}: {what} is not a valid regex ({error})") from error
        except TimeoutError as error:
            raise AdapterFormatError(
                f"{CONFIG_NAME}: matching {what} against the module names took more than {REGEX_BUDGET_S:g} s; "
                "use plain module names"
            ) from error


def parse_config(raw: bytes) -> dict[str, Any]:
    config = loads_json(raw, CONFIG_NAME)
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
    if kind is float:
        try:
            value = float(value)
        except OverflowError as error:  # JSON integers have no size limit
            raise AdapterFormatError(f"{CONFIG_NAME}: {key!r} is too large to be a float") from error
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expected_n(config: dict[str, Any], module: str, budget: _RegexBudget) -> int:
    pattern = config.get("n_frequency_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{CONFIG_NAME}: 'n_frequency_pattern' must be an object")
    for key, n in pattern.items():
        # PEFT's own rule (peft/tuners/fourierft/model.py): the first key matching ".*\.{key}$".
        if budget.match(rf".*\.{key}$", module, full=False, what=f"n_frequency_pattern key {_short(key)}"):
            if isinstance(n, bool) or not isinstance(n, int):
                raise AdapterFormatError(
                    f"{CONFIG_NAME}: n_frequency_pattern[{_short(key)}] must be an integer, got {_short(n)}"
                )
            return n
    return _config_number(config, "n_frequency", int)


def _suffixes(module: str) -> list[str]:
    """``a.b.c`` -> ``[a.b.c, b.c, c]``: the names a PEFT ``target_modules`` list entry selects it by."""
    parts = module.split(".")
    return [".".join(parts[index:]) for index in range(len(parts))]


def _check_targets(
    config: dict[str, Any], modules: Iterable[str], base_modules: Iterable[str], budget: _RegexBudget
) -> None:
    """``target_modules`` must name modules of the served model and select every module in the weights.

    PEFT's rules: a list entry selects a module named exactly that or ending in ``.<entry>``; a
    string is a regex the whole name must match. PEFT refuses a config none of whose targets exist;
    an entry the served model lacks means the adapter was made for another model, so it is refused
    too. A spectrum for a module the targets do not select is one PEFT would silently drop.
    """
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    base_modules = list(base_modules)
    if isinstance(targets, str):
        what = f"target_modules {_short(targets)}"

        def selected(module: str) -> bool:
            return budget.match(targets, module, full=True, what=what)

        if not any(selected(module) for module in base_modules):
            raise BaseModelMismatchError(f"{CONFIG_NAME}: {what} matches no linear layer of the base model")
    elif isinstance(targets, list) and all(isinstance(target, str) for target in targets):
        known = {suffix for module in base_modules for suffix in _suffixes(module)}
        missing = [target for target in targets if target not in known]
        if missing:
            raise BaseModelMismatchError(
                f"{CONFIG_NAME}: target module {_short(missing[0])} does not exist in the base model "
                "(or is not a linear layer)"
            )
        wanted = set(targets)

        def selected(module: str) -> bool:
            return any(suffix in wanted for suffix in _suffixes(module))

    else:
        raise AdapterFormatError(f"{CONFIG_NAME}: 'target_modules' must be a list of module names or a regex string")
    for module in modules:
        if not selected(module):
            raise AdapterFormatError(
                f"{WEIGHTS_NAME} holds a spectrum for {module!r}, which target_modules {_short(targets)} "
                "does not select"
            )


def from_peft(config_raw: bytes, weights_raw: bytes, base_shapes: dict[str, tuple[int, int]]) -> SpectralAdapter:
    """Import a PEFT FourierFT adapter for a base model with the given ``(d_out, d_in)`` shapes."""
    config = parse_config(config_raw)
    seed = _config_number(config, "random_loc_seed", int)
    validate_seed(seed, f"{CONFIG_NAME}: random_loc_seed")
    scaling = _config_number(config, "scaling", float)
    budget = _RegexBudget()
    tensors, _ = read_safetensors(weights_raw)
    if not tensors:
        raise AdapterFormatError(f"{WEIGHTS_NAME} holds no tensors")
    spectra = {}
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
        expected = _expected_n(config, name, budget)
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
        spectra[name] = (coefficients, shape, expected)
    _check_targets(config, spectra, base_shapes, budget)
    modules = {}
    for name, (coefficients, shape, n) in spectra.items():
        rows, cols = peft_locations(seed, shape, n)
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
