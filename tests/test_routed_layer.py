"""The routed FFT/DCT path against dense dW, per token, per blend, with gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.bank import AdapterBank
from server.spectral.dense import delta_weight
from server.spectral.entries import FeatureLayout
from server.spectral.layer import MIXING_MATRIX_MIN_TOKENS, RoutedSpectralLinear
from server.spectral.routing import TrainableSpectrum
from tests.conftest import load_routed

METHODS = [("fourierft", "backward"), ("sdctft", "backward"), ("sdctft", "ortho")]


def _adapter(method: str, norm: str, shapes: dict[str, tuple[int, int]], n: int, seed: int) -> SpectralAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (d_out, d_in) in shapes.items():
        count = min(n, d_out * d_in)
        flat = torch.randperm(d_out * d_in, generator=generator)[:count]
        coefficients = torch.randn(count, generator=generator)
        modules[name] = ModuleSpectrum(coefficients, flat // d_in, flat % d_in, (d_out, d_in), 0.5 + seed % 3)
    return SpectralAdapter(method, modules, norm=norm)  # type: ignore[arg-type]


def _single_layer(shape: tuple[int, int], dtype: torch.dtype, conv1d: bool = False):
    d_out, d_in = shape
    torch.manual_seed(0)
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    nn.init.normal_(base.weight, std=0.05)
    base = base.to(dtype)
    bank = AdapterBank()
    layer = RoutedSpectralLinear(base, bank.register_layer("layer", shape), bank)
    return base, bank, layer


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).detach().abs().max() / expected.float().detach().abs().max())


@pytest.mark.parametrize(("method", "norm"), METHODS)
@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (80, 33)])
def test_fft_path_equals_dense_dw_fp32(method: str, norm: str, shape: tuple[int, int]) -> None:
    base, bank, layer = _single_layer(shape, torch.float32)
    adapters = [_adapter(method, norm, {"layer": shape}, 120, seed) for seed in range(3)]
    slots = [bank.load(adapter) for adapter in adapters]
    x = torch.randn(5, 4, shape[1])
    token_slots = torch.tensor([0, *slots, slots[0]]).repeat_interleave(4)
    with torch.no_grad(), bank.route(token_slots):
        got = layer(x)
    dense = {0: torch.zeros(shape), **{s: delta_weight(a, "layer") for s, a in zip(slots, adapters, strict=True)}}
    delta = torch.stack([x[i] @ dense[int(token_slots[4 * i])].T for i in range(5)])
    expected = base(x) + delta
    assert _relative_error(got - base(x), delta) <= 1e-4
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(("method", "norm"), METHODS)
@pytest.mark.parametrize("shape", [(64, 64), (32, 96)])
def test_fft_path_under_bf16_model(method: str, norm: str, shape: tuple[int, int]) -> None:
    """Transforms run in fp32 and the sum is rounded to bf16 twice (base output, then base + delta).

    The reference rounds once, so the two may differ by about one bf16 ulp of the output:
    2**-7 relative to the largest output (bf16 keeps 8 significant bits).
    """
    base, bank, layer = _single_layer(shape, torch.bfloat16)
    adapter = _adapter(method, norm, {"layer": shape}, 100, 1)
    slot = bank.load(adapter)
    x = torch.randn(6, shape[1]).to(torch.bfloat16)
    with torch.no_grad(), bank.route(torch.full((6,), slot)):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    expected = base(x).float() + x.float() @ delta_weight(adapter, "layer").T
    assert _relative_error(got, expected) <= 2**-7


def test_conv1d_layer_uses_linear_orientation() -> None:
    base, bank, layer = _single_layer((48, 32), torch.float32, conv1d=True)
    adapter = _adapter("fourierft", "backward", {"layer": (48, 32)}, 64, 0)
    slot = bank.load(adapter)
    x = torch.randn(3, 32)
    with torch.no_grad(), bank.route(torch.full((3,), slot)):
        got = layer(x)
    assert torch.allclose(got, base(x) + x @ delta_weight(adapter, "layer").T, atol=1e-5)


@pytest.mark.parametrize(("method", "norm"), METHODS)
def test_blend_equals_weighted_sum_of_dense_dw(method: str, norm: str) -> None:
    shape = (40, 56)
    base, bank, layer = _single_layer(shape, torch.float32)
    first, second = (
        _adapter(method, norm, {"layer": shape}, 90, 1),
        _adapter("fourierft", "backward", {"layer": shape}, 70, 2),
    )
    slot_a, slot_b = bank.load(first), bank.load(second)
    x = torch.randn(4, shape[1])
    slots = torch.tensor([[slot_a, slot_b], [slot_a, 0], [0, 0], [slot_b, slot_a]])
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.0, 0.0], [-0.5, 2.0]])
    with torch.no_grad(), bank.route(slots, weights):
        got = layer(x)
    dense = {0: torch.zeros(shape), slot_a: delta_weight(first, "layer"), slot_b: delta_weight(second, "layer")}
    for row in range(4):
        combined = sum(float(w) * dense[int(s)] for s, w in zip(slots[row], weights[row], strict=True))
        assert torch.allclose(got[row], base(x[row]) + combined @ x[row], atol=1e-5)


@pytest.mark.parametrize(("method", "norm"), METHODS)
def test_coefficient_gradients_equal_dense_path(method: str, norm: str) -> None:
    shape = (48, 40)
    base, bank, layer = _single_layer(shape, torch.float32)
    adapter = _adapter(method, norm, {"layer": shape}, 80, 4)
    other = _adapter(method, norm, {"layer": shape}, 80, 5)
    slot, other_slot = bank.load(adapter), bank.load(other)
    x = torch.randn(6, shape[1])
    target = torch.randn(6, shape[0])
    coefficients = adapter.modules["layer"].coefficients.clone().requires_grad_(True)
    token_slots = torch.tensor([slot, slot, other_slot, 0, slot, other_slot])
    with bank.route(token_slots, trainable=TrainableSpectrum(slot, {"layer": coefficients})):
        loss = ((layer(x) - target) ** 2).sum()
    loss.backward()
    dense_coefficients = coefficients.detach().clone().requires_grad_(True)
    trained = SpectralAdapter(
        method, {"layer": adapter.modules["layer"].with_coefficients(dense_coefficients)}, norm=norm
    )
    # Rows routed to other slots do not depend on these coefficients: only this slot's rows count.
    mine = token_slots == slot
    dense_out = base(x[mine]) + x[mine] @ delta_weight(trained, "layer").T
    ((dense_out - target[mine]) ** 2).sum().backward()
    assert torch.allclose(coefficients.grad, dense_coefficients.grad, rtol=1e-4, atol=1e-5)


def test_unload_frees_the_slot_and_shared_locations_survive() -> None:
    shape = (32, 32)
    base, bank, layer = _single_layer(shape, torch.float32)
    first = _adapter("fourierft", "backward", {"layer": shape}, 50, 1)
    shared = SpectralAdapter("fourierft", {"layer": first.modules["layer"].with_coefficients(torch.randn(50))})
    slot_first, slot_shared = bank.load(first), bank.load(shared)
    assert bank.layers["layer"]._locset_count == 2  # slot 0's empty set + one shared set
    bank.unload(slot_first)
    x = torch.randn(2, 32)
    with torch.no_grad(), bank.route(torch.full((2,), slot_shared)):
        got = layer(x)
    assert torch.allclose(got, base(x) + x @ delta_weight(shared, "layer").T, atol=1e-5)
    assert bank.load(first) == slot_first
    bank.unload(slot_first)
    bank.unload(slot_shared)
    assert bank.resident_slots == 0
    assert float(bank.layers["layer"].locset_factor.abs().sum()) == 0.0


def test_slot_capacity_grows_without_disturbing_resident_slots() -> None:
    shape = (16, 24)
    base, bank, layer = _single_layer(shape, torch.float32)
    adapters = [_adapter("sdctft", "ortho", {"layer": shape}, 10 + seed, seed) for seed in range(40)]
    slots = [bank.load(adapter) for adapter in adapters]
    x = torch.randn(40, 24)
    with torch.no_grad(), bank.route(torch.tensor(slots)):
        got = layer(x)
    for row, adapter in enumerate(adapters):
        assert torch.allclose(got[row], base(x[row]) + delta_weight(adapter, "layer") @ x[row], atol=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_mixed_batch_rows_equal_rows_alone(model_fixture: str, request: pytest.FixtureRequest) -> None:
    model, bank, shapes = load_routed(request.getfixturevalue(model_fixture))
    adapters = [
        _adapter("fourierft", "backward", shapes, 60, 1),
        _adapter("sdctft", "backward", shapes, 60, 2),
        _adapter("sdctft", "ortho", shapes, 60, 3),
    ]
    slots = [bank.load(adapter) for adapter in adapters]
    rows = [
        ([slots[0], 0], [1.0, 0.0]),
        ([0, 0], [0.0, 0.0]),
        ([slots[1], 0], [1.0, 0.0]),
        ([slots[0], slots[2]], [0.6, 0.4]),
        ([slots[2], slots[1]], [0.5, 0.5]),
    ]
    input_ids = torch.randint(0, 200, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    seq = input_ids.shape[1]
    batch_slots = torch.tensor([r[0] for r in rows])[:, None, :].expand(-1, seq, -1)
    batch_weights = torch.tensor([r[1] for r in rows])[:, None, :].expand(-1, seq, -1)
    with torch.no_grad(), bank.route(batch_slots, batch_weights):
        batched = model(input_ids).logits
    for i, (row_slots, row_weights) in enumerate(rows):
        with torch.no_grad(), bank.route(torch.tensor([row_slots] * seq), torch.tensor([row_weights] * seq)):
            alone = model(input_ids[i : i + 1]).logits
        assert (batched[i] - alone[0]).abs().max() <= 1e-4
    with torch.no_grad():
        plain = model(input_ids[1:2]).logits
    assert (batched[1] - plain[0]).abs().max() <= 1e-4
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_routing_shares_base_weights_and_never_writes_them(tiny_llama_dir) -> None:
    fresh = load_routed(tiny_llama_dir)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in fresh[0].named_parameters()}
    model, bank, shapes = fresh
    slot = bank.load(_adapter("fourierft", "backward", shapes, 50, 1))
    with torch.no_grad(), bank.route(torch.full((1, 5), slot)):
        model(torch.arange(5)[None])
    for name, parameter in model.named_parameters():
        pointer, values = before[name]
        assert parameter.data_ptr() == pointer and torch.equal(parameter, values)


@pytest.mark.parametrize(("method", "norm"), METHODS)
def test_prefill_rows_of_dense_and_sparse_adapters_and_base_rows_equal_dense_dw(method: str, norm: str) -> None:
    """Rows of 6 tokens: a dense adapter (prefill takes the mixing-matrix path), a sparse one (gather
    path) and base rows (skipped) in one forward, with gradients through the coefficients."""
    shape = (64, 48)
    base, bank, layer = _single_layer(shape, torch.float32)
    dense_adapter = _adapter(method, norm, {"layer": shape}, 2500, 1)
    sparse_adapter = _adapter(method, norm, {"layer": shape}, 10, 2)
    dense_slot, sparse_slot = bank.load(dense_adapter), bank.load(sparse_adapter)
    in_size, out_size = FeatureLayout(shape[1]).size, FeatureLayout(shape[0]).size
    assert layer.table.locset_in.shape[1] * MIXING_MATRIX_MIN_TOKENS >= in_size * out_size, "must take the matrix path"
    row_slots = torch.tensor([dense_slot, 0, sparse_slot, dense_slot, 0])
    x = torch.randn(5, 6, shape[1])
    trainable = TrainableSpectrum(dense_slot, {"layer": dense_adapter.modules["layer"].coefficients.clone()})
    trainable.coefficients["layer"].requires_grad_(True)
    with bank.route(row_slots[:, None].expand(-1, 6), trainable=trainable):
        got = layer(x) - base(x)
    weights = {0: torch.zeros(shape), sparse_slot: delta_weight(sparse_adapter, "layer")}
    coefficients = trainable.coefficients["layer"].detach().clone().requires_grad_(True)
    spectrum = dense_adapter.modules["layer"]
    as_trained = SpectralAdapter(
        method,  # type: ignore[arg-type]
        {"layer": ModuleSpectrum(coefficients, spectrum.rows, spectrum.cols, shape, spectrum.scaling)},
        norm=norm,  # type: ignore[arg-type]
    )
    weights[dense_slot] = delta_weight(as_trained, "layer")
    expected = torch.stack([x[row] @ weights[int(slot)].T for row, slot in enumerate(row_slots)])
    assert _relative_error(got.detach(), expected.detach()) <= 1e-4
    assert torch.equal(got[1].detach(), torch.zeros_like(got[1]))
    upstream = torch.randn_like(got)
    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert _relative_error(trainable.coefficients["layer"].grad, coefficients.grad) <= 1e-4
