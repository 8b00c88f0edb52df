"""Real PEFT is the oracle: our routed model with an imported PEFT FourierFT adapter equals PeftModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import FourierFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from server.spectral.formats import native
from server.spectral.formats.peft import from_peft_dir, to_peft_dir
from tests.conftest import load_base, load_routed

# (target modules, extra FourierFTConfig fields) per architecture; seeds are not PEFT's default 777.
PEFT_ADAPTERS = {
    "tiny_llama_dir": [
        (["q_proj", "v_proj"], {"random_loc_seed": 123, "n_frequency": 300, "scaling": 150.0}),
        (
            ["q_proj", "v_proj", "down_proj"],
            {
                "random_loc_seed": 9,
                "n_frequency": 200,
                "scaling": 60.0,
                "n_frequency_pattern": {"layers.1.self_attn.v_proj": 64, "down_proj": 500},
            },
        ),
        (
            ["k_proj", "o_proj"],
            {"random_loc_seed": 2024, "n_frequency": 256, "scaling": 100.0, "layers_to_transform": [1]},
        ),
    ],
    "tiny_gpt2_dir": [
        (["c_attn"], {"random_loc_seed": 42, "n_frequency": 400, "scaling": 150.0}),
        (
            ["c_attn", "c_fc"],
            {"random_loc_seed": 5, "n_frequency": 300, "scaling": 80.0, "n_frequency_pattern": {"c_fc": 128}},
        ),
        (["c_proj"], {"random_loc_seed": 31337, "n_frequency": 100, "scaling": 120.0, "layers_to_transform": [0]}),
    ],
}
CASES = [(fixture, index) for fixture, adapters in PEFT_ADAPTERS.items() for index in range(len(adapters))]


def save_peft_adapter(model_dir: Path, out_dir: Path, target_modules: list[str], fields: dict, seed: int) -> Path:
    torch.manual_seed(seed)  # PEFT draws the initial spectrum from the global RNG (init_weights=False: N(0, 1))
    config = FourierFTConfig(task_type="CAUSAL_LM", target_modules=target_modules, init_weights=False, **fields)
    peft_model = get_peft_model(load_base(model_dir), config)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict:
    saved = {}
    for fixture, index in CASES:
        targets, fields = PEFT_ADAPTERS[fixture][index]
        out = tmp_path_factory.mktemp(f"peft-{fixture}-{index}")
        saved[(fixture, index)] = save_peft_adapter(request.getfixturevalue(fixture), out, targets, fields, 100 + index)
    return saved


def _input_ids() -> torch.Tensor:
    return torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("fixture", "index"), CASES)
def test_logits_equal_peft(fixture: str, index: int, peft_adapters: dict, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    adapter_dir = peft_adapters[(fixture, index)]
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_base(model_dir), adapter_dir).eval()(_input_ids()).logits
        model, bank, shapes = load_routed(model_dir)
        slot = bank.load(from_peft_dir(adapter_dir, shapes))
        with bank.route(torch.full((2, 9), slot)):
            got = model(_input_ids()).logits
        base = load_base(model_dir)(_input_ids()).logits
    assert (got - expected).abs().max() <= 1e-4
    assert (expected - base).abs().max() > 1e-2, "the adapter must change the logits for this test to mean anything"


@pytest.mark.parametrize(("fixture", "index"), CASES)
def test_export_round_trip_loads_in_peft_with_identical_outputs(
    fixture: str, index: int, peft_adapters: dict, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model_dir = request.getfixturevalue(fixture)
    original_dir = peft_adapters[(fixture, index)]
    shapes = load_routed(model_dir)[2]
    restored = native.from_bytes(native.to_bytes(from_peft_dir(original_dir, shapes)))
    exported = to_peft_dir(restored, tmp_path / "exported")
    original_tensors = load_file(original_dir / "adapter_model.safetensors")
    exported_tensors = load_file(exported / "adapter_model.safetensors")
    assert original_tensors.keys() == exported_tensors.keys()
    for key, tensor in original_tensors.items():
        assert tensor.dtype == exported_tensors[key].dtype
        assert tensor.numpy().tobytes() == exported_tensors[key].numpy().tobytes()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_base(model_dir), original_dir).eval()(_input_ids()).logits
        got = PeftModel.from_pretrained(load_base(model_dir), exported).eval()(_input_ids()).logits
    assert torch.equal(got, expected)
