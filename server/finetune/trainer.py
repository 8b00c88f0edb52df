"""One job's trainable state on the shared, frozen base model.

The job's adapter occupies one bank slot (its location sets compiled like any served
adapter's); training routes every token of its batches to that slot with a
:class:`TrainableSpectrum` whose fp32 coefficient parameters override the slot's bank rows,
so gradients flow through the same routed spectral layer that serves requests and no dense
dW is ever built. Only the coefficients and their AdamW moments are allocated per job.

Everything here is deterministic for a given seed: the epoch order is a function of
``(seed, epoch)`` alone, so a job resumed from a checkpoint continues exactly as it would
have without the interruption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.finetune.data import TrainingExample
from server.finetune.hyperparameters import AdapterSpec, TrainingPlan
from server.spectral import fourierft, sdctft
from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.bank import AdapterBank
from server.spectral.layer import RoutedSpectralLinear
from server.spectral.routing import TrainableSpectrum

ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the coefficients can no longer be trusted."""


def _base_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The frozen ``(d_out, d_in)`` weight under a routed layer (GPT-2 ``Conv1D`` stores it transposed)."""
    layer = model.get_submodule(name)
    base = layer.base_layer if isinstance(layer, RoutedSpectralLinear) else layer
    weight = base.weight
    return weight if isinstance(base, nn.Linear) else weight.t()


def initial_adapter(
    model: nn.Module, module_shapes: dict[str, tuple[int, int]], spec: AdapterSpec, architecture: str
) -> SpectralAdapter:
    """Locations chosen once, at job start (FourierFT: PEFT's draw from the seed; sDCTFT: the energy rule
    on the base weights), and the initial coefficients (zeros, or N(0, 1) from the seed)."""
    generator = torch.Generator().manual_seed(spec.seed)
    modules = {}
    for name in spec.target_modules:
        shape = module_shapes[name]
        if spec.method == "fourierft":
            rows, cols = fourierft.peft_locations(spec.seed, shape, spec.n_frequency)
        else:
            rows, cols = sdctft.select_locations(
                _base_weight(model, name), spec.n_frequency, delta=spec.delta, seed=spec.seed
            )
        if spec.init == "normal":
            coefficients = torch.randn(spec.n_frequency, generator=generator)
        else:
            coefficients = torch.zeros(spec.n_frequency)
        modules[name] = ModuleSpectrum(coefficients, rows, cols, shape, spec.scaling)
    return SpectralAdapter(
        spec.method,
        modules,
        norm=spec.norm,
        seed=spec.seed if spec.method == "fourierft" else None,
        architecture=architecture,
    )


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def batch_indices(plan: TrainingPlan, seed: int, step: int, size: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based)."""
    epoch, index = divmod(step, plan.steps_per_epoch)
    order = epoch_order(seed, epoch, size)
    return order[index * plan.batch_size : (index + 1) * plan.batch_size]


def micro_batches(examples: list[TrainingExample], token_budget: int) -> list[list[TrainingExample]]:
    """Consecutive groups whose padded size (rows x longest) stays within ``token_budget`` (one example at least)."""
    groups: list[list[TrainingExample]] = []
    current: list[TrainingExample] = []
    longest = 0
    for example in examples:
        candidate = max(longest, example.n_tokens)
        if current and candidate * (len(current) + 1) > token_budget:
            groups.append(current)
            current, candidate = [], example.n_tokens
        current.append(example)
        longest = candidate
    if current:
        groups.append(current)
    return groups


def learning_rate_factor(step: int, plan: TrainingPlan) -> float:
    """Linear warmup to the peak at step ``warmup_steps - 1``, then linear decay towards zero after the last step."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    return max(0.0, (plan.total_steps - step) / (plan.total_steps - plan.warmup_steps + 1))


@dataclass(frozen=True)
class LossSum:
    """Summed token cross-entropy and the number of trained tokens it covers."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else math.nan


class SpectralTrainer:
    def __init__(
        self,
        model: nn.Module,
        bank: AdapterBank,
        adapter: SpectralAdapter,
        plan: TrainingPlan,
        pad_token_id: int,
    ):
        self.model = model
        self.bank = bank
        self.plan = plan
        self.pad_token_id = pad_token_id
        self.template = adapter
        self.coefficients = {
            name: nn.Parameter(spectrum.coefficients.detach().float().clone().to(bank.device))
            for name, spectrum in adapter.modules.items()
        }
        self.optimizer = torch.optim.AdamW(
            list(self.coefficients.values()), lr=plan.learning_rate, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY
        )
        self.slot = bank.load(adapter)
        self.step = 0

    def close(self) -> None:
        """Give the bank slot back and drop the parameters and optimizer state."""
        self.bank.unload(self.slot)
        self.optimizer.state.clear()
        self.coefficients = {}

    @property
    def state_bytes(self) -> int:
        """Bytes this job allocated: coefficients, their gradients and the two AdamW moments."""
        return sum(4 * parameter.numel() * 4 for parameter in self.coefficients.values())

    def _batch_tensors(self, examples: list[TrainingExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        longest = max(example.n_tokens for example in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(examples), longest, dtype=torch.long)
        trained = torch.zeros(len(examples), longest, dtype=torch.bool)
        for row, example in enumerate(examples):
            length = example.n_tokens
            input_ids[row, :length] = torch.tensor(example.input_ids)
            attention[row, :length] = 1
            trained[row, :length] = torch.tensor(example.loss_mask)
        device = self.bank.device
        return input_ids.to(device), attention.to(device), trained.to(device)

    def _loss_sum(self, examples: list[TrainingExample]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy of the trained tokens.

        The output head runs only at the positions that predict a trained token (a boolean
        ``logits_to_keep``): with a 32k vocabulary the head and its softmax are half of a step, and
        prompts are never trained (bench/finetune_step.py, docs/benchmarks.md).
        """
        input_ids, attention, trained = self._batch_tensors(examples)
        predicts = torch.zeros_like(trained)
        predicts[:, :-1] = trained[:, 1:]
        slots = torch.full(input_ids.shape, self.slot, dtype=torch.long)
        trainable = TrainableSpectrum(self.slot, self.coefficients)
        with self.bank.route(slots, trainable=trainable):
            logits = self.model(
                input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=predicts
            ).logits
        targets = input_ids[:, 1:][trained[:, 1:]]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum"), targets.numel()

    def accumulate(self, examples: list[TrainingExample], batch_tokens: int) -> LossSum:
        """Forward and backward of one micro-batch; gradients add up to the mean over the batch's tokens."""
        with torch.enable_grad():
            total, tokens = self._loss_sum(examples)
            if not torch.isfinite(total):
                raise NonFiniteLossError(f"the training loss is {float(total.detach())} at step {self.step + 1}")
            (total / batch_tokens).backward()
        return LossSum(float(total.detach()), tokens)

    @torch.no_grad()
    def evaluate(self, examples: list[TrainingExample]) -> LossSum:
        total, tokens = self._loss_sum(examples)
        return LossSum(float(total), tokens)

    def optimizer_step(self) -> float:
        """Apply the accumulated gradients at this step's scheduled learning rate; returns that rate."""
        learning_rate = self.plan.learning_rate * learning_rate_factor(self.step, self.plan)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not all(torch.isfinite(parameter).all() for parameter in self.coefficients.values()):
            raise NonFiniteLossError(f"the coefficients became non-finite at step {self.step}")
        return learning_rate

    def adapter(self) -> SpectralAdapter:
        """The adapter as trained so far (coefficients copied to the CPU)."""
        modules = {
            name: spectrum.with_coefficients(self.coefficients[name].detach().cpu().clone())
            for name, spectrum in self.template.modules.items()
        }
        return SpectralAdapter(
            self.template.method,
            modules,
            norm=self.template.norm,
            seed=self.template.seed,
            architecture=self.template.architecture,
            extra=dict(self.template.extra),
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Coefficients and AdamW moments: what a resumed job needs to continue bit for bit."""
        tensors: dict[str, torch.Tensor] = {}
        for name, parameter in self.coefficients.items():
            tensors[f"coef.{name}"] = parameter.detach().cpu().clone()
            state = self.optimizer.state.get(parameter)
            if state:
                tensors[f"exp_avg.{name}"] = state["exp_avg"].detach().cpu().clone()
                tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().cpu().clone()
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        with torch.no_grad():
            for name, parameter in self.coefficients.items():
                parameter.copy_(tensors[f"coef.{name}"].to(parameter.device))
                if f"exp_avg.{name}" in tensors:
                    self.optimizer.state[parameter] = {
                        "step": torch.tensor(float(step)),
                        "exp_avg": tensors[f"exp_avg.{name}"].to(parameter.device).clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(parameter.device).clone(),
                    }
        self.step = step
