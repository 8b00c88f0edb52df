"""Fine-tuning jobs in OpenAI's shapes, plus the ``adapter`` extension that says what to train."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters_store.records import JobStatus

Auto = Literal["auto"]
# Adam moves each coefficient by about the learning rate per step; beyond 1000x the base rate every
# step overshoots (and 1e38x overflows fp32 inside the optimizer).
MAX_LEARNING_RATE_MULTIPLIER = 1000.0
# float32's largest value: the adapter bank keeps each scaling in float32, where a larger one is inf.
MAX_SCALING = 3.4028234663852886e38


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | int = Field("auto", description="passes over the training file; auto: about 100 examples seen")
    batch_size: Auto | int = Field("auto", description="examples per optimizer step; auto: 0.2% of them, 1-256")
    learning_rate_multiplier: Auto | float = Field("auto", description="times the method's base learning rate")

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, value: Auto | int) -> Auto | int:
        if value != "auto" and not 1 <= value <= 1000:
            raise ValueError("n_epochs must be 'auto' or an integer in [1, 1000]")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: Auto | int) -> Auto | int:
        if value != "auto" and not 1 <= value <= 4096:
            raise ValueError("batch_size must be 'auto' or an integer in [1, 4096]")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value: Auto | float) -> Auto | float:
        if value != "auto" and not 0 < value <= MAX_LEARNING_RATE_MULTIPLIER:
            raise ValueError(f"learning_rate_multiplier must be 'auto' or in (0, {MAX_LEARNING_RATE_MULTIPLIER:g}]")
        return value


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class FineTuneMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod = Field(default_factory=SupervisedMethod)


class AdapterOptions(BaseModel):
    """What to train (Spectra's extension; defaults in docs/finetuning.md)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["fourierft", "sdctft"] = "fourierft"
    n_frequency: int | None = Field(None, ge=1, description="trained coefficients per layer; default 1000")
    scaling: float | None = Field(None, description="dW = scaling * inverse transform; default 150")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="layer names or fnmatch patterns; default q_proj, v_proj (c_attn on GPT-2)"
    )
    init: Literal["zeros", "normal"] | None = Field(None, description="initial coefficients; default zeros")
    norm: Literal["backward", "ortho"] | None = Field(None, description="sDCTFT's DCT normalisation; default backward")
    delta: float | None = Field(None, ge=0.0, le=1.0, description="sDCTFT's top-energy share per band; default 0.7")

    @field_validator("scaling")
    @classmethod
    def _scaling(cls, value: float | None) -> float | None:
        if value is not None and not (value != 0 and abs(value) <= MAX_SCALING):
            raise ValueError(f"scaling must be a non-zero number of magnitude at most {MAX_SCALING:.4g} (float32)")
        return value

    @field_validator("norm", "delta")
    @classmethod
    def _sdctft_only(cls, value: Any, info: Any) -> Any:
        if value is not None and info.data.get("type") != "sdctft":
            raise ValueError(f"{info.field_name} applies to type 'sdctft' only")
        return value


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the served base model's name (see /v1/models)")
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$", description="up to 40 of [A-Za-z0-9._-]; in the adapter id"
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    method: FineTuneMethod = Field(default_factory=FineTuneMethod)
    hyperparameters: Hyperparameters | None = Field(None, description="deprecated in OpenAI's API; method wins")
    adapter: AdapterOptions = Field(default_factory=AdapterOptions)
    metadata: dict[str, str] | None = None

    def resolved_hyperparameters(self) -> Hyperparameters:
        chosen = self.method.supervised.hyperparameters
        if self.hyperparameters is not None and chosen == Hyperparameters():
            return self.hyperparameters
        return chosen


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    """What a job ran with, as stored: no request validators, so tightening a rule never hides old jobs."""

    n_epochs: Auto | int
    batch_size: Auto | int
    learning_rate_multiplier: Auto | float


class JobSupervised(BaseModel):
    hyperparameters: JobHyperparameters


class MethodObject(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: JobSupervised


class FineTuningJob(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    model: str
    status: JobStatus
    training_file: str
    validation_file: str | None
    hyperparameters: JobHyperparameters
    method: MethodObject
    seed: int
    user_provided_suffix: str | None
    fine_tuned_model: str | None = Field(description="the adapter id to name in requests; set on success")
    trained_tokens: int | None
    error: JobError | None
    started_at: int | None = None
    finished_at: int | None
    estimated_finish: int | None
    organization_id: str = "spectra"
    result_files: list[str] = Field(default_factory=list)
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    adapter: dict[str, Any] = Field(description="the adapter being trained, with every default resolved")
    adapter_id: str = Field(description="where the adapter and its checkpoints are stored")
    step: int
    total_steps: int | None
    replica: str | None = Field(
        None,
        description="the replica training the job (holding its lease, /info's fine_tuning.replica); null once finished",
    )


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: int
    train_loss: float | None = None
    valid_loss: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="adapter id@version: servable like any adapter")
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
