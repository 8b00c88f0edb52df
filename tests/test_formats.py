"""Native single-file format and validation: round trips, size, and every rejected case."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save as save_safetensors

from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.formats import native
from server.spectral.formats.errors import AdapterFormatError, BaseModelMismatchError, UnsupportedAdapterTypeError
from server.spectral.formats.peft import from_peft, to_peft
from server.spectral.formats.validation import validate_adapter
from server.spectral.fourierft import peft_locations
from tests.engine_fixtures import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (32, 64)}


def _adapter(method: str = "sdctft", dtype: torch.dtype = torch.float16, n: int = 40) -> SpectralAdapter:
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name, (d_out, d_in) in SHAPES.items():
        flat = torch.randperm(d_out * d_in, generator=generator)[:n]
        modules[name] = ModuleSpectrum(
            torch.randn(n, generator=generator).to(dtype), flat // d_in, flat % d_in, (d_out, d_in), 120.0
        )
    return SpectralAdapter(method, modules, norm="ortho", architecture="LlamaForCausalLM")  # type: ignore[arg-type]


def _native_with(mutate) -> bytes:
    """A native file whose tensors/metadata went through ``mutate(tensors, metadata)``."""
    data = native.to_bytes(_adapter())
    tensors, metadata = native.read_safetensors(data)
    mutate(tensors, metadata)
    return save_safetensors(tensors, metadata=metadata)


def _load_and_validate(data: bytes) -> SpectralAdapter:
    adapter = native.from_bytes(data)
    validate_adapter(adapter, SHAPES, base_architecture="LlamaForCausalLM")
    return adapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_round_trip_keeps_dtype_bits_and_locations(dtype: torch.dtype) -> None:
    adapter = _adapter(dtype=dtype)
    restored = _load_and_validate(native.to_bytes(adapter))
    assert (restored.method, restored.norm, restored.architecture) == ("sdctft", "ortho", "LlamaForCausalLM")
    for name, spectrum in adapter.modules.items():
        got = restored.modules[name]
        assert got.coefficients.dtype == dtype
        assert torch.equal(
            got.coefficients.view(torch.int16 if dtype != torch.float32 else torch.int32),
            spectrum.coefficients.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )
        assert torch.equal(got.rows.long(), spectrum.rows) and torch.equal(got.cols.long(), spectrum.cols)
        assert (got.shape, got.scaling) == (spectrum.shape, spectrum.scaling)


def test_llama2_7b_shaped_qv_n1000_fp16_file_is_at_most_300kb() -> None:
    rows, cols = peft_locations(777, (4096, 4096), 1000)
    modules = {
        f"model.layers.{layer}.self_attn.{proj}": ModuleSpectrum(
            torch.randn(1000).half(), rows, cols, (4096, 4096), 150.0
        )
        for layer in range(32)
        for proj in ("q_proj", "v_proj")
    }
    data = native.to_bytes(SpectralAdapter("fourierft", modules, seed=777, architecture="LlamaForCausalLM"))
    assert len(data) <= 300 * 1024
    tensors, _ = native.read_safetensors(data)
    assert sum(key.startswith("loc.") for key in tensors) == 1, "shared locations are stored once"


def test_locations_shared_by_modules_are_stored_once_and_distinct_ones_separately() -> None:
    tensors, _ = native.read_safetensors(native.to_bytes(_adapter()))
    assert sorted(k for k in tensors if k.startswith("loc.")) == ["loc.0", "loc.1"]
    assert tensors["loc.0"].dtype == torch.int16


def _set_meta(key: str, value: str):
    return lambda tensors, metadata: metadata.__setitem__(key, value)


def _set_module_field(field: str, value):
    def mutate(tensors, metadata):
        modules = json.loads(metadata["modules"])
        modules["model.layers.0.self_attn.q_proj"][field] = value
        metadata["modules"] = json.dumps(modules)

    return mutate


def _set_tensor(key: str, make):
    return lambda tensors, metadata: tensors.__setitem__(key, make(tensors[key]))


Q = "coef.model.layers.0.self_attn.q_proj"


def _duplicate_location(loc: torch.Tensor) -> torch.Tensor:
    loc = loc.clone()
    loc[:, 5] = loc[:, 3]
    return loc


REJECTED = {
    "unknown method": (_set_meta("method", "lora"), "unknown method 'lora'"),
    "unknown format version": (_set_meta("format_version", "9"), "format_version '9' is not supported"),
    "unknown norm": (_set_meta("norm", "forward"), "unknown DCT norm 'forward'"),
    "not our format": (_set_meta("format", "something.else"), "expected 'spectra.adapter'"),
    "module missing in base": (
        lambda t, m: (
            m.__setitem__("modules", m["modules"].replace("layers.0.self_attn.q_proj", "layers.7.self_attn.q_proj")),
            t.__setitem__("coef.model.layers.7.self_attn.q_proj", t.pop(Q)),
        ),
        "module 'model.layers.7.self_attn.q_proj' does not exist in the base model",
    ),
    "shape mismatch": (
        _set_module_field("shape", [64, 32]),
        "has shape [64, 32] (d_out, d_in) in the adapter but [64, 64]",
    ),
    "location out of bounds": (
        _set_tensor("loc.0", lambda loc: loc.index_fill(1, torch.tensor([2]), 64)),
        "location 2 has row 64, outside [0, 63]",
    ),
    "negative location": (
        _set_tensor("loc.0", lambda loc: loc.index_fill(1, torch.tensor([0]), -1)),
        "location 0 has row -1",
    ),
    "duplicate location": (_set_tensor("loc.0", _duplicate_location), "appears more than once"),
    "nan coefficient": (
        _set_tensor(Q, lambda c: c.index_fill(0, torch.tensor([7]), float("nan"))),
        "coefficient 7 is nan (not finite)",
    ),
    "inf coefficient": (
        _set_tensor(Q, lambda c: c.index_fill(0, torch.tensor([1]), float("inf"))),
        "coefficient 1 is inf (not finite)",
    ),
    "integer coefficients": (_set_tensor(Q, lambda c: c.to(torch.int32)), "dtype torch.int32; supported: float32"),
    "float64 coefficients": (_set_tensor(Q, lambda c: c.double()), "dtype torch.float64"),
    "float locations": (_set_tensor("loc.0", lambda loc: loc.float()), "expected an integer type"),
    "2-D coefficients": (_set_tensor(Q, lambda c: c.reshape(2, -1)), "coefficients must be 1-D"),
    "count mismatch": (_set_tensor(Q, lambda c: c[:-1].clone()), "39 coefficients but locations of shape [40]"),
    "missing coefficients": (lambda t, m: t.pop(Q), f"tensor '{Q}' is missing"),
    "stray tensor": (lambda t, m: t.__setitem__("evil", torch.zeros(1)), "unexpected tensors ['evil']"),
    "bad modules json": (_set_meta("modules", "{not json"), "metadata field 'modules' is not valid JSON"),
    "string scaling": (_set_module_field("scaling", "big"), "'scaling' must be a number"),
    "other architecture": (_set_meta("architecture", "GPT2LMHeadModel"), "made for architecture 'GPT2LMHeadModel'"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_invalid_native_files_are_rejected_with_what_and_where(case: str) -> None:
    mutate, message = REJECTED[case]
    with pytest.raises(AdapterFormatError) as raised:
        _load_and_validate(_native_with(mutate))
    assert message in raised.value.message
    assert raised.value.status_code in (415, 422)


def test_shape_mismatch_is_a_base_model_mismatch_naming_the_module() -> None:
    with pytest.raises(BaseModelMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        _load_and_validate(_native_with(_set_module_field("shape", [64, 32])))


@pytest.mark.parametrize("n", [0, 11])
def test_n_outside_one_to_layer_size_is_rejected(n: int) -> None:
    locations = torch.zeros(n, dtype=torch.long)
    spectrum = ModuleSpectrum(torch.zeros(n), locations, locations, (2, 5), 1.0)
    with pytest.raises(AdapterFormatError, match=rf"module m: n={n} is out of range \[1, 10\]"):
        validate_adapter(SpectralAdapter("fourierft", {"m": spectrum}))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short to be safetensors"),
        (pickle.dumps({"coef": [1.0, 2.0]}), "not a valid safetensors file|header claims"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "header claims 16 bytes"),
        ((2**40).to_bytes(8, "little") + b"{}", "header claims"),
    ],
)
def test_non_safetensors_bytes_are_rejected_without_unpickling(data: bytes, message: str) -> None:
    with pytest.raises(AdapterFormatError, match=message):
        native.from_bytes(data)


def test_truncated_file_is_rejected() -> None:
    data = native.to_bytes(_adapter())
    with pytest.raises(AdapterFormatError, match="not a valid safetensors file"):
        native.from_bytes(data[: len(data) - 10])


PEFT_SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64)}
PEFT_KEY = "base_model.model.model.layers.0.self_attn.q_proj.fourierft_spectrum"


def _peft_config(**fields) -> bytes:
    return json.dumps(
        {"peft_type": "FOURIERFT", "n_frequency": 50, "scaling": 100.0, "random_loc_seed": 3, **fields}
    ).encode()


def test_peft_import_regenerates_seeded_locations_and_exports_back() -> None:
    coefficients = torch.randn(50)
    adapter = from_peft(_peft_config(), save_safetensors({PEFT_KEY: coefficients}), PEFT_SHAPES)
    spectrum = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert torch.equal(spectrum.rows, peft_locations(3, (64, 64), 50)[0])
    files = to_peft(adapter)
    assert json.loads(files["adapter_config.json"])["random_loc_seed"] == 3


@pytest.mark.parametrize(
    ("config", "tensors", "error", "message"),
    [
        (
            json.dumps({"peft_type": "LORA", "r": 8}).encode(),
            {PEFT_KEY: torch.zeros(50)},
            UnsupportedAdapterTypeError,
            "peft_type 'LORA'; accepted PEFT types: FOURIERFT",
        ),
        (b"[1, 2", {PEFT_KEY: torch.zeros(50)}, AdapterFormatError, "adapter_config.json is not valid JSON"),
        (
            _peft_config(),
            {PEFT_KEY: torch.zeros(49)},
            AdapterFormatError,
            "49 coefficients but the config says n_frequency=50",
        ),
        (
            _peft_config(),
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
            AdapterFormatError,
            "unexpected tensor",
        ),
        (
            _peft_config(),
            {"base_model.model.model.layers.9.mlp.up_proj.fourierft_spectrum": torch.zeros(50)},
            BaseModelMismatchError,
            "'model.layers.9.mlp.up_proj' does not exist in the base model",
        ),
        (
            _peft_config(n_frequency=5000),
            {PEFT_KEY: torch.zeros(5000)},
            AdapterFormatError,
            "n_frequency=5000 is out of range",
        ),
        (
            _peft_config(random_loc_seed="x"),
            {PEFT_KEY: torch.zeros(50)},
            AdapterFormatError,
            "'random_loc_seed' must be an integer",
        ),
    ],
)
def test_invalid_peft_adapters_are_rejected(config: bytes, tensors: dict, error: type, message: str) -> None:
    with pytest.raises(error) as raised:
        from_peft(config, save_safetensors(tensors), PEFT_SHAPES)
    assert message in raised.value.message


def test_sdctft_cannot_be_exported_to_peft() -> None:
    with pytest.raises(AdapterFormatError, match="PEFT has no sdctft adapter type"):
        to_peft(_adapter())


def test_the_same_adapter_always_serialises_to_the_same_bytes() -> None:
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.1.self_attn.v_proj": (32, 64)}
    adapter = random_adapter(shapes, 3)
    encodings = {native.to_bytes(adapter) for _ in range(20)}
    assert len(encodings) == 1
    assert native.from_bytes(encodings.pop()).modules.keys() == adapter.modules.keys()
