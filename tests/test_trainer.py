"""The trainer and the engine's training policy in-process.

The oracle for the gradient path is the base model with ``W + dW(c)`` merged densely
(``torch.func.functional_call``): the routed spectral layer must give the same loss and the
same coefficient gradients without ever building dW.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.api.schemas.finetune import MAX_SCALING
from server.engine.types import GenerationRequest, SamplingParams
from server.finetune.data import TrainingExample
from server.finetune.hyperparameters import (
    HyperparameterError,
    TrainingPlan,
    auto_batch_size,
    auto_epochs,
    resolve_adapter,
    resolve_plan,
)
from server.finetune.trainer import (
    NonFiniteLossError,
    SpectralTrainer,
    batch_indices,
    initial_adapter,
    learning_rate_factor,
    micro_batches,
)
from server.spectral import fourierft, sdctft
from server.spectral.adapter import SpectralAdapter
from tests.conftest import load_base, load_routed
from tests.engine_fixtures import make_engine


def _examples(count: int, seed: int = 0) -> list[TrainingExample]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        prompt = 3 + index % 4
        completion = 2 + (index * 3) % 5
        ids = torch.randint(0, 256, (prompt + completion,), generator=generator).tolist()
        examples.append(TrainingExample(tuple(ids), tuple([False] * prompt + [True] * completion)))
    return examples


def _trained(examples: list[TrainingExample]) -> int:
    return sum(sum(example.loss_mask[1:]) for example in examples)


def _plan(**overrides) -> TrainingPlan:
    fields = {
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate": 0.05,
        "steps_per_epoch": 2,
        "warmup_steps": 1,
        "micro_batch_tokens": 4096,
        **overrides,
    }
    return TrainingPlan(**fields)


def _trainer(
    model_dir: Path,
    method: str,
    *,
    init: str = "normal",
    plan: TrainingPlan | None = None,
    seed: int = 5,
    scaling: float = 40.0,
    dtype: torch.dtype = torch.float32,
):
    model, bank, shapes = load_routed(model_dir, dtype)
    model_type = model.config.model_type
    spec = resolve_adapter(
        method=method,  # type: ignore[arg-type]
        n_frequency=300,
        scaling=scaling,
        target_modules=None,
        init=init,  # type: ignore[arg-type]
        norm=None,
        delta=None,
        seed=seed,
        module_shapes=shapes,
        model_type=model_type,
    )
    adapter = initial_adapter(model, shapes, spec, type(model).__name__)
    return SpectralTrainer(model, bank, adapter, plan or _plan(), pad_token_id=0), adapter


def _dense_loss(model_dir: Path, adapter: SpectralAdapter, coefficients: dict[str, torch.Tensor], examples):
    """The same loss through the plain model with ``W + dW(c)`` merged (Conv1D weights are stored transposed)."""
    model = load_base(model_dir)
    overrides = {}
    for name, spectrum in adapter.modules.items():
        trained = spectrum.with_coefficients(coefficients[name])
        if adapter.method == "fourierft":
            delta = fourierft.delta_weight(trained)
        else:
            delta = sdctft.delta_weight(trained, adapter.norm)
        module = model.get_submodule(name)
        weight = module.weight
        overrides[f"{name}.weight"] = weight + (delta if isinstance(module, nn.Linear) else delta.t())
    longest = max(example.n_tokens for example in examples)
    input_ids = torch.zeros(len(examples), longest, dtype=torch.long)
    attention = torch.zeros(len(examples), longest, dtype=torch.long)
    trained_mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    for row, example in enumerate(examples):
        input_ids[row, : example.n_tokens] = torch.tensor(example.input_ids)
        attention[row, : example.n_tokens] = 1
        trained_mask[row, : example.n_tokens] = torch.tensor(example.loss_mask)
    logits = torch.func.functional_call(
        model, overrides, args=(), kwargs={"input_ids": input_ids, "attention_mask": attention, "use_cache": False}
    ).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (losses * trained_mask[:, 1:]).sum() / int(trained_mask[:, 1:].sum())


@pytest.mark.parametrize(
    ("model_fixture", "method"),
    [("tiny_llama_dir", "fourierft"), ("tiny_llama_dir", "sdctft"), ("tiny_gpt2_dir", "fourierft")],
)
def test_loss_and_gradients_equal_the_merged_dense_model(model_fixture: str, method: str, request) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    trainer, adapter = _trainer(model_dir, method)
    examples = _examples(4)
    loss = trainer.accumulate(examples, _trained(examples))
    routed_grads = {name: parameter.grad.clone() for name, parameter in trainer.coefficients.items()}

    leaves = {name: parameter.detach().clone().requires_grad_() for name, parameter in trainer.coefficients.items()}
    dense = _dense_loss(model_dir, adapter, leaves, examples)
    dense.backward()
    assert loss.mean == pytest.approx(float(dense.detach()), rel=1e-5)
    for name, leaf in leaves.items():
        torch.testing.assert_close(routed_grads[name], leaf.grad, rtol=1e-4, atol=1e-6)
    assert any(bool(grad.abs().sum() > 0) for grad in routed_grads.values())


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_llama_dir: Path) -> None:
    examples = _examples(6)
    whole, _ = _trainer(tiny_llama_dir, "fourierft")
    split, _ = _trainer(tiny_llama_dir, "fourierft")
    whole.accumulate(examples, _trained(examples))
    groups = micro_batches(examples, token_budget=20)
    assert len(groups) > 2
    for group in groups:
        split.accumulate(group, _trained(examples))
    for name, parameter in whole.coefficients.items():
        torch.testing.assert_close(split.coefficients[name].grad, parameter.grad, rtol=1e-5, atol=1e-7)


def test_micro_batches_respect_the_token_budget_and_keep_order() -> None:
    examples = _examples(9)
    groups = micro_batches(examples, token_budget=24)
    assert [example for group in groups for example in group] == examples
    for group in groups:
        assert len(group) == 1 or len(group) * max(example.n_tokens for example in group) <= 24


def test_a_resumed_trainer_continues_bit_for_bit(tiny_llama_dir: Path) -> None:
    examples = _examples(8)
    plan = _plan(n_epochs=3, steps_per_epoch=2, batch_size=4)

    def run(trainer: SpectralTrainer, until: int) -> None:
        while trainer.step < until:
            batch = [examples[i] for i in batch_indices(plan, 9, trainer.step, len(examples))]
            trainer.accumulate(batch, _trained(batch))
            trainer.optimizer_step()

    straight, _ = _trainer(tiny_llama_dir, "sdctft", init="zeros", plan=plan)
    run(straight, plan.total_steps)
    first, _ = _trainer(tiny_llama_dir, "sdctft", init="zeros", plan=plan)
    run(first, 2)
    resumed, _ = _trainer(tiny_llama_dir, "sdctft", init="zeros", plan=plan)
    resumed.restore(first.state_tensors(), first.step)
    run(resumed, plan.total_steps)
    for name, parameter in straight.coefficients.items():
        assert torch.equal(resumed.coefficients[name], parameter)
    assert not torch.equal(first.coefficients[name], parameter)


def test_close_gives_the_bank_slot_back(tiny_llama_dir: Path) -> None:
    trainer, _ = _trainer(tiny_llama_dir, "fourierft")
    bank = trainer.bank
    assert bank.resident_slots == 1 and trainer.state_bytes > 0
    trainer.close()
    assert bank.resident_slots == 0 and trainer.state_bytes == 0


def test_a_non_finite_loss_raises_before_any_update(tiny_llama_dir: Path) -> None:
    from tests.http_fixtures import OVERFLOWING_SCALING

    trainer, _ = _trainer(tiny_llama_dir, "fourierft", scaling=OVERFLOWING_SCALING, dtype=torch.float16)
    examples = _examples(4)
    with pytest.raises(NonFiniteLossError, match=r"the training loss is (nan|inf) at step 1"):
        trainer.accumulate(examples, _trained(examples))


def test_the_largest_job_scaling_is_the_largest_float32() -> None:
    """The bank keeps scalings in float32; the API refuses what would be inf there."""
    assert torch.finfo(torch.float32).max == MAX_SCALING


def test_initial_locations_follow_each_methods_rule(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    _, fourier = _trainer(tiny_llama_dir, "fourierft", seed=21)
    for spectrum in fourier.modules.values():
        rows, cols = fourierft.peft_locations(21, spectrum.shape, spectrum.n)
        assert torch.equal(spectrum.rows, rows) and torch.equal(spectrum.cols, cols)
    assert fourier.seed == 21

    model = load_base(tiny_gpt2_dir)
    _, dct = _trainer(tiny_gpt2_dir, "sdctft", seed=4, init="zeros")
    for name, spectrum in dct.modules.items():
        weight = model.get_submodule(name).weight.t()  # Conv1D stores (d_in, d_out)
        rows, cols = sdctft.select_locations(weight, spectrum.n, seed=4)
        assert torch.equal(spectrum.rows, rows) and torch.equal(spectrum.cols, cols)
        assert not spectrum.coefficients.any()
    assert dct.seed is None


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    plan = _plan(n_epochs=10, steps_per_epoch=1, warmup_steps=2)
    factors = [learning_rate_factor(step, plan) for step in range(plan.total_steps)]
    assert factors[:2] == [0.5, 1.0]
    assert all(later < earlier for earlier, later in itertools.pairwise(factors[1:]))
    assert factors[-1] == pytest.approx(1 / 9)


def test_about_ten_checkpoints_per_job_and_always_the_last_step() -> None:
    plan = _plan(n_epochs=100, steps_per_epoch=3)
    steps = [step for step in range(1, plan.total_steps + 1) if plan.is_checkpoint(step)]
    assert steps == list(range(30, 301, 30))
    short = _plan(n_epochs=3, steps_per_epoch=2)
    assert [step for step in range(1, 7) if short.is_checkpoint(step)] == [2, 4, 6]
    odd = _plan(n_epochs=25, steps_per_epoch=1)
    assert [step for step in range(1, 26) if odd.is_checkpoint(step)] == [3, 6, 9, 12, 15, 18, 21, 24, 25]


def test_auto_hyperparameters_follow_the_documented_rules() -> None:
    assert auto_epochs(8) == 13 and auto_epochs(100) == 3 and auto_epochs(20_000) == 1
    assert auto_batch_size(8) == 1 and auto_batch_size(10_000) == 20 and auto_batch_size(10**6) == 256
    plan = resolve_plan(
        n_examples=10, n_epochs="auto", batch_size=4, learning_rate_multiplier=2.0, micro_batch_tokens=512
    )
    assert (plan.n_epochs, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (10, 3, 30, 3)
    with pytest.raises(HyperparameterError, match="larger than the 10 training examples"):
        resolve_plan(n_examples=10, n_epochs=1, batch_size=11, learning_rate_multiplier="auto", micro_batch_tokens=512)


def test_target_modules_default_per_architecture_and_errors_name_the_layers(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path
) -> None:
    _, _, llama_shapes = load_routed(tiny_llama_dir)
    _, _, gpt2_shapes = load_routed(tiny_gpt2_dir)
    common = {"n_frequency": 10, "scaling": None, "init": None, "norm": None, "delta": None, "seed": 0}
    llama = resolve_adapter(
        method="fourierft", target_modules=None, module_shapes=llama_shapes, model_type="llama", **common
    )
    assert {name.rsplit(".", 1)[-1] for name in llama.target_modules} == {"q_proj", "v_proj"}
    gpt2 = resolve_adapter(method="sdctft", target_modules=None, module_shapes=gpt2_shapes, model_type="gpt2", **common)
    assert {name.rsplit(".", 1)[-1] for name in gpt2.target_modules} == {"c_attn"}
    with pytest.raises(HyperparameterError, match=r"match no linear layer.*q_proj"):
        resolve_adapter(
            method="fourierft", target_modules=["qkv"], module_shapes=llama_shapes, model_type="llama", **common
        )
    with pytest.raises(HyperparameterError, match="no default target_modules"):
        resolve_adapter(
            method="fourierft", target_modules=None, module_shapes=llama_shapes, model_type="mamba", **common
        )
    with pytest.raises(HyperparameterError, match="exceeds the 2048 entries"):
        resolve_adapter(
            method="fourierft",
            target_modules=["v_proj"],
            module_shapes=llama_shapes,
            model_type="llama",
            **{**common, "n_frequency": 5000},
        )


def test_training_steps_interleave_with_serving_and_never_starve_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Serving-first: while a request runs, every training step is followed by serving time; when idle,
    training steps run back to back. Greedy tokens are the same with or without training.

    Each training step records, on the engine thread, how many tokens the running request had by then:
    the event loop's own timestamps arrive late and in bursts, so they cannot order the two.
    """
    share = 0.3
    engine = make_engine(tiny_llama_dir, tmp_path / "store", training_share=share)
    # The random model emits its EOS within a few dozen tokens; without one the request runs all 400.
    engine.runner.eos_token_ids = set()
    engine.start()
    step_seconds = 0.02
    steps: list[tuple[float, float, int | None]] = []  # start, end, tokens of the running request (None: idle)
    stop = threading.Event()

    def train() -> None:
        def work() -> None:
            started = time.monotonic()
            running = [len(sequence.generated) for sequence in engine.scheduler.running]
            time.sleep(step_seconds)
            steps.append((started, time.monotonic(), running[0] if running else None))

        while not stop.is_set():
            engine.run_training(work)

    request = GenerationRequest(engine.tokenizer.encode("Hello spectral world"), SamplingParams(max_new_tokens=400), {})

    async def tokens() -> list[int]:
        return [event.token_id for event in (await engine.submit(request).result()).tokens]

    try:
        alone = asyncio.run(tokens())
        trainer_thread = threading.Thread(target=train)
        trainer_thread.start()
        time.sleep(0.2)
        served = asyncio.run(tokens())
        time.sleep(0.2)
        stop.set()
        trainer_thread.join(timeout=10)
    finally:
        engine.stop()
    assert served == alone
    assert len(served) == 400, len(served)
    during = [step for step in steps if step[2] is not None]
    assert len(during) >= 3, "training must keep running while a request is served"
    for earlier, later in itertools.pairwise(during):
        assert later[2] > earlier[2], "a training step followed another with no serving step between them"
        assert later[0] - earlier[1] >= step_seconds * (1 - share) / share * 0.9
    last_served = max(step[1] for step in during)
    idle = [step for step in steps if step[2] is None and step[0] > last_served]
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(idle)]
    # The median, not the maximum: a preempted thread may stretch one gap, while a policy that paused
    # between idle steps would make every gap at least step_seconds * (1 - share) / share (2.3x step_seconds).
    assert gaps and statistics.median(gaps) < step_seconds, "with no requests, training steps run back to back"
