"""A job's resolved settings: what "auto" means, the defaults, and the checks against the served model.

The API layer parses the request (pydantic); this module turns it into the two frozen objects
the trainer runs on, :class:`AdapterSpec` (what is trained) and :class:`TrainingPlan` (how).
Defaults and their reasons are in docs/finetuning.md.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from server.engine.types import EngineError
from server.spectral.adapter import DctNorm, Method

Auto = Literal["auto"]
Init = Literal["zeros", "normal"]

DEFAULT_N_FREQUENCY = 1000
DEFAULT_SCALING = 150.0
DEFAULT_INIT: Init = "zeros"
DEFAULT_DELTA = 0.7
# Adam moves every coefficient by about the learning rate per step whatever the gradient's scale;
# 0.02 is where the tiny test model and the FourierFT paper's LLaMA runs both train without
# diverging at the default scaling (docs/finetuning.md).
BASE_LEARNING_RATE = 0.1
WARMUP_FRACTION = 0.1
# A checkpoint at the end of every k-th epoch, k chosen so that a job writes about ten: each is a stored
# adapter version, an fsynced optimizer state and an event, which per epoch would flood small-file jobs.
CHECKPOINTS_PER_JOB = 10
# Targets of OpenAI's documented "auto" epochs: about 100 to 25,000 examples seen in total.
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
DEFAULT_EPOCHS = 3
MAX_AUTO_EPOCHS = 25
MAX_AUTO_BATCH_SIZE = 256
# PEFT's FourierFT default targets per model type; other architectures must name theirs.
DEFAULT_TARGET_MODULES = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}


class HyperparameterError(EngineError):
    """A job setting the served model or the data cannot satisfy; ``param`` names the request field."""

    status_code = 422


@dataclass(frozen=True)
class AdapterSpec:
    method: Method
    n_frequency: int
    scaling: float
    target_modules: tuple[str, ...]
    init: Init
    norm: DctNorm
    delta: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class TrainingPlan:
    n_epochs: int
    batch_size: int
    learning_rate: float
    steps_per_epoch: int
    warmup_steps: int
    micro_batch_tokens: int

    @property
    def total_steps(self) -> int:
        return self.n_epochs * self.steps_per_epoch

    def is_checkpoint(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based): the end of every k-th epoch, and always the last step."""
        interval = self.steps_per_epoch * math.ceil(self.n_epochs / CHECKPOINTS_PER_JOB)
        return step % interval == 0 or step == self.total_steps

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_steps": self.total_steps}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingPlan:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__})


def resolve_target_modules(
    requested: list[str] | None, module_shapes: dict[str, tuple[int, int]], model_type: str
) -> tuple[str, ...]:
    """Routed layer names matched by ``requested`` (fnmatch on the full name or its last part)."""
    patterns = requested or DEFAULT_TARGET_MODULES.get(model_type)
    if not patterns:
        raise HyperparameterError(
            f"no default target_modules for model type {model_type!r}; name them, e.g. one of "
            f"{sorted({name.rsplit('.', 1)[-1] for name in module_shapes})}",
            param="adapter.target_modules",
        )
    matched = tuple(
        name
        for name in module_shapes
        if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)
    )
    if not matched:
        raise HyperparameterError(
            f"target_modules {list(patterns)} match no linear layer of the served model; its layers end in "
            f"{sorted({name.rsplit('.', 1)[-1] for name in module_shapes})}",
            param="adapter.target_modules",
        )
    return matched


def resolve_adapter(
    *,
    method: Method,
    n_frequency: int | None,
    scaling: float | None,
    target_modules: list[str] | None,
    init: Init | None,
    norm: DctNorm | None,
    delta: float | None,
    seed: int,
    module_shapes: dict[str, tuple[int, int]],
    model_type: str,
) -> AdapterSpec:
    modules = resolve_target_modules(target_modules, module_shapes, model_type)
    n = n_frequency or DEFAULT_N_FREQUENCY
    smallest = min(modules, key=lambda name: module_shapes[name][0] * module_shapes[name][1])
    capacity = module_shapes[smallest][0] * module_shapes[smallest][1]
    if n > capacity:
        raise HyperparameterError(
            f"n_frequency {n} exceeds the {capacity} entries of {smallest} {list(module_shapes[smallest])}",
            param="adapter.n_frequency",
        )
    return AdapterSpec(
        method=method,
        n_frequency=n,
        scaling=DEFAULT_SCALING if scaling is None else scaling,
        target_modules=modules,
        init=init or DEFAULT_INIT,
        norm=norm or "backward",
        delta=DEFAULT_DELTA if delta is None else delta,
        seed=seed,
    )


def auto_epochs(n_examples: int) -> int:
    if n_examples * DEFAULT_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * DEFAULT_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return DEFAULT_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    """About 0.2% of the examples, within [1, 256] (OpenAI's documented rule)."""
    return max(1, min(MAX_AUTO_BATCH_SIZE, round(0.002 * n_examples)))


def resolve_plan(
    *,
    n_examples: int,
    n_epochs: int | Auto,
    batch_size: int | Auto,
    learning_rate_multiplier: float | Auto,
    micro_batch_tokens: int,
) -> TrainingPlan:
    epochs = auto_epochs(n_examples) if n_epochs == "auto" else n_epochs
    batch = auto_batch_size(n_examples) if batch_size == "auto" else batch_size
    if batch > n_examples:
        raise HyperparameterError(
            f"batch_size {batch} is larger than the {n_examples} training examples",
            param="method.supervised.hyperparameters.batch_size",
        )
    multiplier = 1.0 if learning_rate_multiplier == "auto" else learning_rate_multiplier
    steps_per_epoch = math.ceil(n_examples / batch)
    total = epochs * steps_per_epoch
    return TrainingPlan(
        n_epochs=epochs,
        batch_size=batch,
        learning_rate=BASE_LEARNING_RATE * multiplier,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=max(1, math.ceil(WARMUP_FRACTION * total)),
        micro_batch_tokens=micro_batch_tokens,
    )
