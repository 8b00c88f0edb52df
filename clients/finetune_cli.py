"""``spectra finetune ...``: the fine-tuning jobs of a running server (``/v1/fine_tuning/jobs``), via the SDK.

Options, errors and exit codes are those of every server command group (:mod:`clients.cli_common`);
following a job also exits 1 when it fails or is cancelled, and 130 on Ctrl-C, which stops the
following only: the job keeps running on the server.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterable
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from clients.cli_common import (
    DEFAULT_URL,
    EXIT_API_ERROR,
    JsonOption,
    Target,
    connect,
    fail,
    print_json,
    server_command_group,
    timestamp,
    upload_progress,
)

if TYPE_CHECKING:
    from rich.console import OverflowMethod

    from clients.sdk import FineTuningJob, FineTuningJobEvent, SpectraClient

EXIT_INTERRUPTED = 130  # what a shell reports for a command stopped by SIGINT
STATUS_STYLES = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}
LEVEL_STYLES = {"warn": "yellow", "error": "red"}
N = TypeVar("N", int, float)

finetune_app = server_command_group("Fine-tune adapters of the served model: create, follow, list, show, cancel jobs.")

JobIdArgument = Annotated[str, typer.Argument(metavar="JOB_ID", help="'ftjob-...', as create printed it.")]


class AdapterType(StrEnum):
    fourierft = "fourierft"
    sdctft = "sdctft"


class Init(StrEnum):
    zeros = "zeros"
    normal = "normal"


# -- helpers -----------------------------------------------------------------------------------


def _command(ctx: typer.Context, *args: str) -> str:
    """The ``spectra finetune`` command line that does ``args`` on the same server, for hints."""
    target: Target = ctx.obj
    url = ["--url", target.url] if target.url != DEFAULT_URL else []
    return shlex.join(["spectra", "finetune", *url, *args])


def _auto(value: str, kind: Callable[[str], N], option: str) -> N | Literal["auto"]:
    if value == "auto":
        return "auto"
    try:
        return kind(value)
    except ValueError:
        raise typer.BadParameter(f"expected 'auto' or a number, got {value!r}", param_hint=option) from None


def _training_file_id(client: SpectraClient, value: str, option: str, as_json: bool) -> str:
    """An uploaded file's id: ``value`` itself, or the id the file at path ``value`` gets when uploaded now."""
    path = Path(value)
    if not path.is_file():
        if value.startswith("file-"):
            return value
        raise typer.BadParameter(f"{value!r} is neither a file nor an uploaded file's id (file-...)", param_hint=option)
    with upload_progress(path) as progress:
        uploaded = client.upload_file(path, progress=progress)
    if not as_json:  # stdout holds only JSON for scripts
        typer.echo(f"Uploaded {path} as {uploaded.id}")
    return uploaded.id


def _status(job: FineTuningJob) -> Text:
    return Text(job.status, style=STATUS_STYLES.get(job.status, ""))


def _steps(job: FineTuningJob) -> str:
    return f"{job.step}/{job.total_steps}" if job.total_steps is not None else "-"


def _adapter(job: FineTuningJob) -> Text:
    """The servable adapter id once the job succeeded; dimmed before (it holds only checkpoints, or nothing)."""
    if job.fine_tuned_model:
        return Text(job.fine_tuned_model)
    return Text(job.adapter_id, style="dim")


def _short_modules(names: list[str]) -> str:
    """``q_proj, v_proj (4 layers)``: layer kinds rather than every full name of a deep model."""
    kinds = dict.fromkeys(name.rsplit(".", 1)[-1] for name in names)
    return f"{', '.join(kinds)} ({len(names)} layers)"


def _method(adapter: dict[str, Any]) -> str:
    keys = ("n_frequency", "scaling", "init", *(("norm", "delta") if adapter.get("method") == "sdctft" else ()))
    settings = ", ".join(f"{key} {adapter[key]}" for key in keys if key in adapter)
    return f"{adapter.get('method', '-')}: {settings}" if settings else str(adapter.get("method", "-"))


def _event_line(event: FineTuningJobEvent) -> Text:
    return Text(f"{timestamp(event.created_at, '%H:%M:%S')} {event.message}", style=LEVEL_STYLES.get(event.level, ""))


def _table(*columns: str, give_way: dict[str, OverflowMethod], whole: dict[str, int] | None = None) -> Table:
    """A table with light borders and one space between columns, to fit 80 columns (rich takes a pipe as 80).

    The ``give_way`` columns narrow when it would not fit, with their overflow ('fold' wraps, losing
    nothing; 'ellipsis' cuts); the others keep their text on one line, and the ``whole`` ones (ids,
    which users copy) at least the given width even if the table then overflows the terminal.
    """
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0)
    for column in columns:
        overflow = give_way.get(column)
        table.add_column(
            column, no_wrap=overflow is None, overflow=overflow or "fold", min_width=(whole or {}).get(column)
        )
    return table


# -- following a job ---------------------------------------------------------------------------


def _eta(first: tuple[int, int], latest: tuple[int, int], total_steps: int) -> str:
    """Time left at the rate between two metrics events, as (step, server time in whole seconds)."""
    (first_step, first_at), (step, at) = first, latest
    if step <= first_step or at <= first_at:
        return "ETA -:--:--"
    seconds = (total_steps - step) * (at - first_at) / (step - first_step)
    return f"ETA {timedelta(seconds=round(seconds))}"


class _ProgressView:
    """A bar of step/total with the latest loss and an ETA, all from the metrics events; other events print above."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[eta]}"),
            console=Console(),
        )
        self.task = self.progress.add_task("starting", total=None, loss="", eta="")
        self.first: tuple[int, int] | None = None
        self.step = 0

    def __enter__(self) -> _ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.first is None:  # no step ran (the job failed or was cancelled first): an empty bar says nothing
            self.progress.update(self.task, visible=False)
        self.progress.stop()

    def event(self, event: FineTuningJobEvent) -> None:
        if event.type != "metrics" or not event.data:
            self.progress.console.print(_event_line(event))
            return
        step, total, loss = event.data["step"], event.data["total_steps"], event.data["train_loss"]
        # A job resumed after a server restart goes back to its last checkpoint: measure the rate anew.
        if self.first is None or step < self.step:
            self.first = (step, event.created_at)
        self.step = step
        self.progress.update(
            self.task,
            description="training",
            completed=step,
            total=total,
            loss=f"loss {loss:.4f}",
            eta=_eta(self.first, (step, event.created_at), total),
        )


def _echo_json(event: FineTuningJobEvent) -> None:
    typer.echo(event.model_dump_json())


def _watch(
    items: Iterable[FineTuningJobEvent | FineTuningJob], on_event: Callable[[FineTuningJobEvent], None]
) -> FineTuningJob:
    """Hand each event to ``on_event``; return the finished job, which ``follow_job`` yields last."""
    from clients.sdk import FineTuningJobEvent

    for item in items:
        if not isinstance(item, FineTuningJobEvent):
            return item
        on_event(item)
    raise AssertionError("follow_job ends with the finished job")


def _follow(ctx: typer.Context, client: SpectraClient, job_id: str, as_json: bool) -> None:
    """Show the job's events until it finishes; exit 1 unless it succeeded."""
    target: Target = ctx.obj
    try:
        if as_json:
            job: FineTuningJob = _watch(client.follow_job(job_id), _echo_json)
            typer.echo(job.model_dump_json())
        else:
            with _ProgressView() as view:
                job = _watch(client.follow_job(job_id), view.event)
    except KeyboardInterrupt:
        fail(
            f"Stopped following. Job {job_id} keeps running on the server; "
            f"cancel it with: {_command(ctx, 'cancel', job_id)}",
            EXIT_INTERRUPTED,
        )
    if job.status == "failed":
        error = f" ({job.error.code}): {job.error.message}" if job.error else ""
        fail(f"Job {job.id} failed{error}", EXIT_API_ERROR)
    if job.status == "cancelled":
        fail(f"Job {job.id} was cancelled", EXIT_API_ERROR)
    if as_json:
        return
    model = job.fine_tuned_model
    request = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 16})
    typer.echo(f"Job {job.id} succeeded: fine-tuned model {model}")
    typer.echo(
        "Use it as the model of /v1/completions and /v1/chat/completions, or the adapter_id of /generate:\n"
        f"  curl -s {target.url}/v1/completions -H 'content-type: application/json' -d '{request}'"
    )


# -- commands ----------------------------------------------------------------------------------


@finetune_app.command()
def create(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Option("--file", exists=True, dir_okay=False, help="A JSONL training file to upload first.")
    ] = None,
    training_file: Annotated[
        str | None, typer.Option(help="An uploaded training file's id instead (file-...).")
    ] = None,
    validation_file: Annotated[
        str | None, typer.Option(help="A JSONL file to upload, or an uploaded file's id; its loss is reported.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="The served base model's name; default: the served model.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Up to 40 of [A-Za-z0-9._-], put in the adapter id.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seeds the frequencies and the batch order.")] = None,
    epochs: Annotated[str, typer.Option(help="Passes over the training file, or auto.")] = "auto",
    batch_size: Annotated[str, typer.Option(help="Examples per optimizer step, or auto.")] = "auto",
    learning_rate_multiplier: Annotated[str, typer.Option(help="Times the base learning rate, or auto.")] = "auto",
    adapter_type: Annotated[AdapterType | None, typer.Option(help="What to train; default fourierft.")] = None,
    n_frequency: Annotated[int | None, typer.Option(help="Trained coefficients per layer; default 1000.")] = None,
    scaling: Annotated[float | None, typer.Option(help="dW = scaling * inverse transform; default 150.")] = None,
    target_modules: Annotated[
        str | None, typer.Option(help="Comma-separated layer names or patterns, e.g. q_proj,v_proj.")
    ] = None,
    init: Annotated[Init | None, typer.Option(help="Initial coefficients; default zeros.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Show progress until the job finishes.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Create a fine-tuning job (uploading --file first); with --follow, wait for it and exit 1 unless it succeeds."""
    if (file is None) == (training_file is None):
        raise typer.BadParameter("give either --file PATH or --training-file FILE_ID", param_hint="--file")
    n_epochs = _auto(epochs, int, "--epochs")
    batch = _auto(batch_size, int, "--batch-size")
    multiplier = _auto(learning_rate_multiplier, float, "--learning-rate-multiplier")
    modules = None if target_modules is None else [name.strip() for name in target_modules.split(",") if name.strip()]
    options = {
        "type": adapter_type.value if adapter_type else None,
        "n_frequency": n_frequency,
        "scaling": scaling,
        "target_modules": modules,
        "init": init.value if init else None,
    }
    adapter = {key: value for key, value in options.items() if value is not None} or None
    with connect(ctx) as client:
        training_id = training_file or _training_file_id(client, str(file), "--file", as_json)
        validation_id = (
            None
            if validation_file is None
            else _training_file_id(client, validation_file, "--validation-file", as_json)
        )
        job = client.create_job(
            training_file=training_id,
            model=model,
            validation_file=validation_id,
            suffix=suffix,
            seed=seed,
            n_epochs=n_epochs,
            batch_size=batch,
            learning_rate_multiplier=multiplier,
            adapter=adapter,
        )
        if not follow:
            if as_json:
                print_json(job)
                return
            typer.echo(f"Created fine-tuning job {job.id} ({job.status}); its adapter will be {job.adapter_id}")
            typer.echo(f"Follow it with: {_command(ctx, 'follow', job.id)}")
            return
        if not as_json:
            typer.echo(f"Created fine-tuning job {job.id}; following it (Ctrl-C stops following, not the job)")
        _follow(ctx, client, job.id, as_json)


@finetune_app.command()
def follow(ctx: typer.Context, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """Show a job's events and progress until it finishes; exit 1 unless it succeeds."""
    with connect(ctx) as client:
        _follow(ctx, client, job_id, as_json)


@finetune_app.command("list")
def list_jobs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Jobs per page.")] = 20,
    after: Annotated[str | None, typer.Option(help="Start after this job id (the last of the previous page).")] = None,
    as_json: JsonOption = False,
) -> None:
    """List fine-tuning jobs, newest first."""
    with connect(ctx) as client:
        page = client.list_jobs(after=after, limit=limit)
    if as_json:
        print_json(page)
        return
    if not page.data:
        typer.echo("No fine-tuning jobs.")
        return
    table = _table(
        "id",
        "status",
        "model",
        "adapter",
        "steps",
        "created",
        give_way={"model": "ellipsis"},
        whole={
            "id": max(len(job.id) for job in page.data),
            "adapter": max(len(job.fine_tuned_model or job.adapter_id) for job in page.data),
        },
    )
    for job in page.data:
        table.add_row(
            Text(job.id),
            _status(job),
            Text(job.model),
            _adapter(job),
            _steps(job),
            timestamp(job.created_at, "%m-%d %H:%M"),
        )
    Console().print(table)
    if page.has_more:
        typer.echo(f"More jobs follow: pass --after {page.data[-1].id}", err=True)


@finetune_app.command()
def show(ctx: typer.Context, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """Show one fine-tuning job: its settings, progress and outcome."""
    with connect(ctx) as client:
        job = client.get_job(job_id)
    if as_json:
        print_json(job)
        return
    status = _status(job)
    if job.error:
        status.append(f" ({job.error.code}): {job.error.message}")
    hyperparameters = job.hyperparameters
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for name, value in (
        ("id", Text(job.id)),
        ("status", status),
        ("model", Text(job.model)),
        ("fine-tuned model", Text(job.fine_tuned_model or f"- (will be {job.adapter_id})")),
        ("training file", Text(job.training_file)),
        ("validation file", Text(job.validation_file or "-")),
        ("method", Text(_method(job.adapter))),
        ("target modules", Text(_short_modules(job.adapter.get("target_modules", [])))),
        (
            "hyperparameters",
            Text(
                f"n_epochs {hyperparameters.n_epochs}, batch_size {hyperparameters.batch_size}, "
                f"learning_rate_multiplier {hyperparameters.learning_rate_multiplier}"
            ),
        ),
        ("seed", Text(str(job.seed))),
        ("steps", Text(_steps(job))),
        ("trained tokens", Text(f"{job.trained_tokens:,}" if job.trained_tokens is not None else "-")),
        ("created", Text(timestamp(job.created_at))),
        ("started", Text(timestamp(job.started_at) if job.started_at else "-")),
        ("finished", Text(timestamp(job.finished_at) if job.finished_at else "-")),
        ("estimated finish", Text(timestamp(job.estimated_finish) if job.estimated_finish else "-")),
    ):
        fields.add_row(name, value)
    Console().print(fields)


@finetune_app.command()
def events(
    ctx: typer.Context,
    job_id: JobIdArgument,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many of the latest events.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show a job's latest events, oldest first (--json: the server's page, newest first)."""
    with connect(ctx) as client:
        page = client.list_job_events(job_id, limit=limit)
    if as_json:
        print_json(page)
        return
    if not page.data:
        typer.echo("No events.")
        return
    table = _table("time", "level", "message", give_way={"message": "fold"})
    for event in reversed(page.data):
        table.add_row(
            timestamp(event.created_at, "%m-%d %H:%M:%S"),
            Text(event.level, style=LEVEL_STYLES.get(event.level, "")),
            Text(event.message),
        )
    Console().print(table)
    if page.has_more:
        typer.echo(f"Older events exist: pass a --limit above {limit} to see them", err=True)


@finetune_app.command()
def checkpoints(ctx: typer.Context, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """List a job's kept checkpoints, newest first; each is a servable adapter version."""
    with connect(ctx) as client:
        page = client.list_job_checkpoints(job_id)
    if as_json:
        print_json(page)
        return
    if not page.data:
        typer.echo("No checkpoints.")
        return
    table = _table("step", "checkpoint", "train loss", "valid loss", "created", give_way={"checkpoint": "fold"})
    for checkpoint in page.data:
        metrics = checkpoint.metrics
        table.add_row(
            str(checkpoint.step_number),
            Text(checkpoint.fine_tuned_model_checkpoint),
            f"{metrics.train_loss:.4f}" if metrics.train_loss is not None else "-",
            f"{metrics.valid_loss:.4f}" if metrics.valid_loss is not None else "-",
            timestamp(checkpoint.created_at, "%m-%d %H:%M:%S"),
        )
    Console().print(table)


@finetune_app.command()
def cancel(ctx: typer.Context, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """Cancel an unfinished job; it keeps no adapter."""
    with connect(ctx) as client:
        job = client.cancel_job(job_id)
    if as_json:
        print_json(job)
        return
    if job.status == "cancelled":
        typer.echo(f"Cancelled {job.id} at step {_steps(job)}")
    else:  # the server waits a while for the job to stop, not forever
        typer.echo(f"Cancelling {job.id}; it is still {job.status}: see {_command(ctx, 'show', job.id)}")
