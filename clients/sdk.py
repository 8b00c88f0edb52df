"""A typed Python client for a Spectra server: :class:`SpectraClient` (sync) and :class:`AsyncSpectraClient`.

Both clients expose the same methods and return the server's own pydantic response models.
Everything that does not touch the network lives in module-level helpers shared by the two
transports: an endpoint is a :class:`_Call` (what to send plus how to read the answer), so each
client method is one line and a new endpoint is one ``_Call`` builder plus two thin methods.

Every non-2xx answer, and an ``error`` event in a stream, raises :class:`SpectraAPIError` (status,
message, type and param from the standard ``{"error": {...}}`` body, and the response's
``X-Request-Id`` to quote); a server that cannot be reached raises :class:`SpectraConnectionError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path, PurePosixPath
from typing import Any, Generic, Literal, TypedDict, TypeVar, Unpack
from urllib.parse import quote

import anyio
import httpx
from pydantic import BaseModel, ValidationError

from adapters_store.records import TERMINAL_STATUSES
from server.api.request_id import REQUEST_ID_HEADER
from server.api.schemas.adapters import AdapterDeleted, AdapterDetail, AdapterList, AdapterObject
from server.api.schemas.common import HealthResponse, InfoResponse
from server.api.schemas.files import FileDeleted, FileList, FileObject
from server.api.schemas.finetune import (
    AdapterOptions,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
)
from server.api.schemas.openai import ChatCompletion, ChatMessage, Completion
from server.api.schemas.tgi import GenerateResponse, StreamResponse

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AdapterDeleted",
    "AdapterDetail",
    "AdapterList",
    "AdapterObject",
    "AdapterOptions",
    "AsyncSpectraClient",
    "ChatCompletion",
    "ChatMessage",
    "Completion",
    "DownloadFormat",
    "FileDeleted",
    "FileList",
    "FileObject",
    "FineTuningJob",
    "FineTuningJobCheckpoint",
    "FineTuningJobCheckpointList",
    "FineTuningJobEvent",
    "FineTuningJobEventList",
    "FineTuningJobList",
    "GenerateOptions",
    "GenerateResponse",
    "HealthResponse",
    "InfoResponse",
    "OpenAIOptions",
    "SpectraAPIError",
    "SpectraClient",
    "SpectraConnectionError",
    "SpectraError",
    "StreamResponse",
]

DEFAULT_TIMEOUT_S = 60.0
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DownloadFormat = Literal["native", "peft"]
Auto = Literal["auto"]
JOBS_PATH = "/v1/fine_tuning/jobs"
# Events read per request while following a job: one request per poll for any job that logs less
# than this between polls (a step is one event).
FOLLOW_PAGE_SIZE = 100

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


# -- errors ------------------------------------------------------------------------------------


class SpectraError(Exception):
    """Base class of everything this SDK raises on its own (bad responses, unsafe archives, ...)."""


class SpectraAPIError(SpectraError):
    """The server answered with a non-2xx status, or ended a stream with an ``error`` event.

    ``request_id`` is the response's ``X-Request-Id``: the server's log lines about the request carry it.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.body = body
        self.request_id = request_id

    @classmethod
    def from_response(cls, response: httpx.Response) -> SpectraAPIError:
        text = response.text
        try:
            body = response.json()
        except ValueError:
            body = None
        request_id = response.headers.get(REQUEST_ID_HEADER)
        error = cls.from_body(response.status_code, body, request_id)
        if error is not None:
            return error
        message = text.strip() or response.reason_phrase or "no message"
        return cls(response.status_code, message, body=body if body is not None else text, request_id=request_id)

    @classmethod
    def from_body(cls, status_code: int, body: Any, request_id: str | None) -> SpectraAPIError | None:
        """The error a standard ``{"error": {...}}`` body describes; None if ``body`` is not one."""
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return None
        param = error.get("param")
        error_type = error.get("type")
        return cls(
            status_code,
            error["message"],
            type=error_type if isinstance(error_type, str) else None,
            param=param if isinstance(param, str) else None,
            body=body,
            request_id=request_id,
        )


class SpectraConnectionError(SpectraError):
    """The server could not be reached, or did not answer in time."""


# -- shared request building and response parsing ------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request, transport-free: what to send and how to turn a 2xx response into ``T``."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, str | int] | None = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = field(default=None, repr=False)
    json_body: dict[str, Any] | None = None

    def build(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        return client.build_request(
            self.method, self.path, params=self.params, data=self.data, files=self.files, json=self.json_body
        )


@dataclass(frozen=True)
class _Stream(Generic[M]):
    """One Server-Sent Events request, transport-free: the JSON body to POST and the model of each ``data:`` event."""

    path: str
    json_body: dict[str, Any]
    event: type[M]


@dataclass(frozen=True)
class _Download:
    content: bytes
    filename: str | None
    sha256: str | None


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as error:
            raise SpectraError(
                f"unexpected {model.__name__} response from {response.request.url}: {error.error_count()} error(s); "
                f"body starts {response.text[:200]!r}"
            ) from error

    return parse


def _download(response: httpx.Response) -> _Download:
    disposition = response.headers.get("content-disposition", "")
    match = re.search(r'filename="([^"]+)"', disposition)
    return _Download(response.content, match.group(1) if match else None, response.headers.get("x-adapter-sha256"))


def _content(response: httpx.Response) -> bytes:
    return response.content


class SSELineSplitter:
    """Lines of an SSE body as SSE ends them: at CRLF, LF or CR only.

    Not httpx's ``iter_lines``: it splits like ``str.splitlines``, also at U+0085, U+2028 and U+2029,
    which JSON strings may hold unescaped (a token whose text is U+0085 arrives that way), cutting one
    event in two.
    """

    _LINE_END = re.compile(r"\r\n|\r|\n")

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, chunk: str) -> list[str]:
        self._buffer += chunk
        # A trailing CR may be the first half of a CRLF: keep it until the next chunk says.
        complete = len(self._buffer) - 1 if self._buffer.endswith("\r") else len(self._buffer)
        *lines, rest = self._LINE_END.split(self._buffer[:complete])
        self._buffer = rest + self._buffer[complete:]
        return lines

    def close(self) -> list[str]:
        rest, self._buffer = self._buffer.removesuffix("\r"), ""
        return [rest] if rest else []


def _stream_event(stream: _Stream[M], response: httpx.Response, line: str) -> M | None:
    """The event a ``data:`` line holds; None for the lines between events (blank separators, ``: ping``).

    An ``error`` event (the server's standard error body) raises :class:`SpectraAPIError`.
    """
    if not line.startswith("data:"):
        return None
    data = line.removeprefix("data:").strip()
    try:
        payload = json.loads(data)
    except ValueError as error:
        raise SpectraError(f"unexpected event from {response.request.url}: {data[:200]!r}") from error
    if isinstance(payload, dict) and "error" in payload:
        # The response itself was a 200; the event's own code says what went wrong.
        code = payload["error"].get("code") if isinstance(payload["error"], dict) else None
        status = code if isinstance(code, int) else 500
        request_id = response.headers.get(REQUEST_ID_HEADER)
        error = SpectraAPIError.from_body(status, payload, request_id)
        raise error or SpectraAPIError(status, data, body=payload, request_id=request_id)
    try:
        return stream.event.model_validate(payload)
    except ValidationError as error:
        raise SpectraError(
            f"unexpected {stream.event.__name__} event from {response.request.url}: {error.error_count()} error(s); "
            f"event starts {data[:200]!r}"
        ) from error


def _finish(call: _Call[T], response: httpx.Response) -> T:
    if not response.is_success:
        raise SpectraAPIError.from_response(response)
    return call.parse(response)


def _connection_error(base_url: str, error: httpx.TransportError) -> SpectraConnectionError:
    detail = str(error) or type(error).__name__
    if isinstance(error, httpx.TimeoutException):
        return SpectraConnectionError(f"the Spectra server at {base_url} did not answer in time ({detail})")
    if isinstance(error, httpx.ConnectError):
        return SpectraConnectionError(f"cannot connect to the Spectra server at {base_url} ({detail}); is it running?")
    return SpectraConnectionError(f"the connection to the Spectra server at {base_url} failed ({detail})")


def _adapter_path(ref: str, suffix: str = "") -> str:
    if not ref:
        raise ValueError("an adapter id or id@N is required")
    # Ids may hold one '/' (namespace/name) which the routes take as part of the path.
    return f"/v1/adapters/{quote(ref, safe='/@')}{suffix}"


def _adapter_files(path: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The ``file`` parts of an upload: a PEFT directory's two files, or one native .safetensors file."""
    path = Path(path)
    if path.name == PEFT_CONFIG_NAME:  # a PEFT directory named by its config file, as the server accepts too
        path = path.parent
    if path.is_dir():
        missing = [name for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME) if not (path / name).is_file()]
        if missing:
            raise SpectraError(
                f"{path} is not a PEFT adapter directory: missing {', '.join(missing)} "
                f"(expected {PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME})"
            )
        return [
            ("file", (PEFT_CONFIG_NAME, (path / PEFT_CONFIG_NAME).read_bytes(), "application/json")),
            ("file", (PEFT_WEIGHTS_NAME, (path / PEFT_WEIGHTS_NAME).read_bytes(), "application/octet-stream")),
        ]
    if not path.is_file():
        raise SpectraError(f"{path} does not exist")
    return [("file", (path.name, path.read_bytes(), "application/octet-stream"))]


def _upload_call(
    adapter_id: str, path: Path, description: str, metadata: dict[str, Any] | None, pin: bool, public: bool
) -> _Call[AdapterObject]:
    data = {
        "adapter_id": adapter_id,
        "description": description,
        "metadata": json.dumps(metadata or {}),
        "pin": "true" if pin else "false",
        "public": "true" if public else "false",
    }
    return _Call("POST", "/v1/adapters", _model(AdapterObject), data=data, files=_adapter_files(path))


def _list_call(prefix: str, after: str, limit: int) -> _Call[AdapterList]:
    params: dict[str, str | int] = {"limit": limit}
    if prefix:
        params["prefix"] = prefix
    if after:
        params["after"] = after
    return _Call("GET", "/v1/adapters", _model(AdapterList), params=params)


def _get_call(ref: str) -> _Call[AdapterDetail]:
    return _Call("GET", _adapter_path(ref), _model(AdapterDetail))


def _download_call(ref: str, format: DownloadFormat) -> _Call[_Download]:
    if format not in ("native", "peft"):
        raise ValueError(f"format must be 'native' or 'peft', got {format!r}")
    return _Call("GET", _adapter_path(ref, "/download"), _download, params={"format": format})


def _delete_call(ref: str) -> _Call[AdapterDeleted]:
    return _Call("DELETE", _adapter_path(ref), _model(AdapterDeleted))


def _health_call() -> _Call[HealthResponse]:
    return _Call("GET", "/health", _model(HealthResponse))


def _info_call() -> _Call[InfoResponse]:
    return _Call("GET", "/info", _model(InfoResponse))


# -- generation --------------------------------------------------------------------------------


class GenerateOptions(TypedDict, total=False):
    """``parameters`` of ``/generate`` (TGI/LoRAX); unset ones take the server's defaults (greedy decoding).

    ``adapter_id`` names one adapter (``id`` or ``id@N``), ``adapters`` a weighted blend; neither is the
    base model. ``temperature`` other than 1, ``top_k`` or ``top_p`` < 1 turn sampling on, as in TGI.
    """

    adapter_id: str | None
    adapters: dict[str, float] | None
    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    do_sample: bool | None
    seed: int | None
    stop: list[str] | None
    repetition_penalty: float | None
    details: bool
    return_full_text: bool | None


class OpenAIOptions(TypedDict, total=False):
    """Sampling fields of ``/v1/completions`` and ``/v1/chat/completions``; unset ones take the server's defaults.

    ``temperature`` defaults to 1 (sampling), as in OpenAI; 0 is greedy. ``adapters`` blends adapters of the
    base model (``model`` must then be left unset).
    """

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    seed: int | None
    stop: str | list[str] | None
    adapters: dict[str, float] | None


def _given(options: Mapping[str, Any], allowed: type) -> dict[str, Any]:
    """The options that were set; a name the server does not know is refused here, because the server
    ignores unknown fields (as TGI and vLLM do) and a misspelt option would silently do nothing."""
    unknown = sorted(set(options) - set(allowed.__annotations__))
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)}; known: {', '.join(allowed.__annotations__)}")
    return {name: value for name, value in options.items() if value is not None}


def _tgi_body(inputs: str, options: GenerateOptions) -> dict[str, Any]:
    return {"inputs": inputs, "parameters": _given(options, GenerateOptions)}


def _generate_call(inputs: str, options: GenerateOptions) -> _Call[GenerateResponse]:
    return _Call("POST", "/generate", _model(GenerateResponse), json_body=_tgi_body(inputs, options))


def _generate_stream(inputs: str, options: GenerateOptions) -> _Stream[StreamResponse]:
    return _Stream("/generate_stream", _tgi_body(inputs, options), StreamResponse)


def _completion_call(model: str, prompt: str, options: OpenAIOptions) -> _Call[Completion]:
    body = {"model": model, "prompt": prompt, **_given(options, OpenAIOptions)}
    return _Call("POST", "/v1/completions", _model(Completion), json_body=body)


def _chat_call(
    model: str, messages: Sequence[ChatMessage | Mapping[str, Any]], options: OpenAIOptions
) -> _Call[ChatCompletion]:
    sent = [
        message.model_dump(exclude_none=True) if isinstance(message, ChatMessage) else dict(message)
        for message in messages
    ]
    body = {"model": model, "messages": sent, **_given(options, OpenAIOptions)}
    return _Call("POST", "/v1/chat/completions", _model(ChatCompletion), json_body=body)


def _query(**values: str | int | None) -> dict[str, str | int]:
    """Query parameters without the unset ones (the server's defaults apply)."""
    return {name: value for name, value in values.items() if value is not None}


def _id_path(prefix: str, resource_id: str, suffix: str = "") -> str:
    if not resource_id:
        raise ValueError(f"an id is required for {prefix}")
    # File and job ids never hold '/': quoting everything keeps a bad id from reaching another route.
    return f"{prefix}/{quote(resource_id, safe='')}{suffix}"


class _ProgressReader(io.BytesIO):
    """The upload's bytes, reporting each chunk httpx reads to ``progress`` as the body is sent."""

    def __init__(self, data: bytes, progress: Callable[[int], None]):
        super().__init__(data)
        self._progress = progress

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self._progress(len(chunk))
        return chunk


def _upload_file_call(
    path: Path, purpose: str, progress: Callable[[int], None] | None, public: bool
) -> _Call[FileObject]:
    if not path.is_file():
        raise SpectraError(f"{path} is not a file")
    data = path.read_bytes()
    body = data if progress is None else _ProgressReader(data, progress)
    files = [("file", (path.name, body, "application/jsonl"))]
    form = {"purpose": purpose, "public": "true" if public else "false"}
    return _Call("POST", "/v1/files", _model(FileObject), data=form, files=files)


def _list_files_call(purpose: str | None, after: str | None, limit: int) -> _Call[FileList]:
    return _Call("GET", "/v1/files", _model(FileList), params=_query(purpose=purpose, after=after, limit=limit))


def _get_file_call(file_id: str) -> _Call[FileObject]:
    return _Call("GET", _id_path("/v1/files", file_id), _model(FileObject))


def _file_content_call(file_id: str) -> _Call[bytes]:
    return _Call("GET", _id_path("/v1/files", file_id, "/content"), _content)


def _delete_file_call(file_id: str) -> _Call[FileDeleted]:
    return _Call("DELETE", _id_path("/v1/files", file_id), _model(FileDeleted))


def _create_job_call(
    *,
    model: str,
    training_file: str,
    validation_file: str | None,
    suffix: str | None,
    seed: int | None,
    n_epochs: int | Auto,
    batch_size: int | Auto,
    learning_rate_multiplier: float | Auto,
    adapter: dict[str, Any] | AdapterOptions | None,
) -> _Call[FineTuningJob]:
    hyperparameters = {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": learning_rate_multiplier,
    }
    # A dict goes as given, so the server (not a local copy of its rules) says what is wrong with it.
    adapter_body = adapter.model_dump(exclude_none=True) if isinstance(adapter, AdapterOptions) else adapter
    optional = {"validation_file": validation_file, "suffix": suffix, "seed": seed, "adapter": adapter_body}
    body = {
        "model": model,
        "training_file": training_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        **{name: value for name, value in optional.items() if value is not None},
    }
    return _Call("POST", JOBS_PATH, _model(FineTuningJob), json_body=body)


def _list_jobs_call(after: str | None, limit: int) -> _Call[FineTuningJobList]:
    return _Call("GET", JOBS_PATH, _model(FineTuningJobList), params=_query(after=after, limit=limit))


def _get_job_call(job_id: str) -> _Call[FineTuningJob]:
    return _Call("GET", _id_path(JOBS_PATH, job_id), _model(FineTuningJob))


def _list_job_events_call(job_id: str, after: str | None, limit: int) -> _Call[FineTuningJobEventList]:
    path = _id_path(JOBS_PATH, job_id, "/events")
    return _Call("GET", path, _model(FineTuningJobEventList), params=_query(after=after, limit=limit))


def _list_job_checkpoints_call(job_id: str) -> _Call[FineTuningJobCheckpointList]:
    return _Call("GET", _id_path(JOBS_PATH, job_id, "/checkpoints"), _model(FineTuningJobCheckpointList))


def _cancel_job_call(job_id: str) -> _Call[FineTuningJob]:
    return _Call("POST", _id_path(JOBS_PATH, job_id, "/cancel"), _model(FineTuningJob))


def _unseen_events(
    page: FineTuningJobEventList, newest_seen: str | None
) -> tuple[list[FineTuningJobEvent], str | None]:
    """The events of a newest-first page that are newer than ``newest_seen``, newest first, and the ``after``
    cursor of the next older page when that page may hold more of them (None once the seen ones or the job's
    first event are reached)."""
    unseen = list(takewhile(lambda event: event.id != newest_seen, page.data))
    if len(unseen) < len(page.data) or not page.has_more or not page.data:
        return unseen, None
    return unseen, page.data[-1].id


def _job_ended(job: FineTuningJob) -> bool:
    return job.status in TERMINAL_STATUSES


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _safe_member(name: str) -> PurePosixPath:
    """The relative path of a zip member, refusing anything that could land outside the destination."""
    member = PurePosixPath(name.replace("\\", "/"))
    if (
        not member.parts
        or member.is_absolute()
        or ".." in member.parts
        or re.match(r"^[A-Za-z]:", name)  # a Windows drive, absolute or drive-relative
    ):
        raise SpectraError(f"refusing to extract unsafe archive member {name!r}")
    return member


# Far above any adapter a server accepts (--max-adapter-bytes is at most a few hundred MiB in practice).
MAX_PEFT_ZIP_EXPANDED_BYTES = 1 << 30


def _extract_zip(data: bytes, dest: Path) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        raise SpectraError(f"the server sent a PEFT download that is not a zip ({error})") from error
    with archive:
        infos = archive.infolist()
        members = [(info, _safe_member(info.filename)) for info in infos]  # check every name before writing any
        # zipfile stops each member at its declared size, so the declared total bounds what is written.
        expanded = sum(info.file_size for info in infos)
        if expanded > MAX_PEFT_ZIP_EXPANDED_BYTES:
            raise SpectraError(
                f"the PEFT download expands to {expanded} bytes, over the {MAX_PEFT_ZIP_EXPANDED_BYTES} this client "
                "accepts; it is not an adapter this server could have stored"
            )
        dest.mkdir(parents=True, exist_ok=True)
        for info, member in members:
            target = dest.joinpath(*member.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            _write_atomically(target, archive.read(info))


def _save_download(download: _Download, dest: Path, format: DownloadFormat) -> Path:
    """Write a download: native to ``dest`` (or into it, if it is a directory); peft unzipped into ``dest``."""
    dest = Path(dest)
    if format == "peft":
        _extract_zip(download.content, dest)
        return dest
    if download.sha256 is not None and hashlib.sha256(download.content).hexdigest() != download.sha256:
        raise SpectraError(f"download is corrupt: its sha256 is not the {download.sha256} the server announced")
    if dest.is_dir():
        dest = dest / (download.filename or "adapter.safetensors")
    _write_atomically(dest, download.content)
    return dest


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "spectra-sdk"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


# -- transports --------------------------------------------------------------------------------


class SpectraClient:
    """Blocking client. Use as a context manager, or call :meth:`close`."""

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT_S, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=_headers(api_key))
        self._base_model: str | None = None

    def __enter__(self) -> SpectraClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        try:
            response = self._http.send(call.build(self._http))
        except httpx.TransportError as error:
            raise _connection_error(self.base_url, error) from error
        return _finish(call, response)

    def _stream(self, stream: _Stream[M]) -> Iterator[M]:
        try:
            with self._http.stream("POST", stream.path, json=stream.json_body) as response:
                if not response.is_success:
                    response.read()
                    raise SpectraAPIError.from_response(response)
                lines = SSELineSplitter()
                for chunk in response.iter_text():
                    for line in lines.feed(chunk):
                        if (event := _stream_event(stream, response, line)) is not None:
                            yield event
                for line in lines.close():
                    if (event := _stream_event(stream, response, line)) is not None:
                        yield event
        except httpx.TransportError as error:
            raise _connection_error(self.base_url, error) from error

    def _model_id(self, model: str | None) -> str:
        """``model``, or for None the served base model's name (asked once per client)."""
        if model is not None:
            return model
        if self._base_model is None:
            self._base_model = self.info().model_id
        return self._base_model

    # -- server ----------------------------------------------------------------------------

    def health(self) -> HealthResponse:
        return self._send(_health_call())

    def info(self) -> InfoResponse:
        return self._send(_info_call())

    # -- generation ------------------------------------------------------------------------

    def generate(self, inputs: str, **options: Unpack[GenerateOptions]) -> GenerateResponse:
        """``POST /generate``: the generated text (with ``details=True``, every token too) once generation ends."""
        return self._send(_generate_call(inputs, options))

    def generate_stream(self, inputs: str, **options: Unpack[GenerateOptions]) -> Iterator[StreamResponse]:
        """``POST /generate_stream``: one event per token as it is generated; the last also holds ``generated_text``
        and ``details``. Closing the iterator early closes the connection, which cancels the request on the server.
        """
        return self._stream(_generate_stream(inputs, options))

    def completions(self, prompt: str, *, model: str | None = None, **options: Unpack[OpenAIOptions]) -> Completion:
        """``POST /v1/completions``; ``model`` is an adapter id, or None for the base model.

        Not streamed: for text as it is generated use :meth:`generate_stream` (or the openai SDK, ``stream=True``).
        """
        return self._send(_completion_call(self._model_id(model), prompt, options))

    def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        model: str | None = None,
        **options: Unpack[OpenAIOptions],
    ) -> ChatCompletion:
        """``POST /v1/chat/completions`` with ``{"role", "content"}`` messages; ``model`` as in :meth:`completions`.

        Not streamed, as :meth:`completions`.
        """
        return self._send(_chat_call(self._model_id(model), messages, options))

    # -- adapters --------------------------------------------------------------------------

    def upload_adapter(
        self,
        adapter_id: str,
        path: Path | str,
        *,
        description: str = "",
        metadata: dict[str, Any] | None = None,
        pin: bool = False,
        public: bool = False,
    ) -> AdapterObject:
        """Upload a PEFT FourierFT directory or a native ``.safetensors`` file; an existing id gets a new version.

        With API keys, a bare ``adapter_id`` lands in the key's namespace; ``public`` shows it to every key.
        """
        return self._send(_upload_call(adapter_id, Path(path), description, metadata, pin, public))

    def list_adapters(self, prefix: str = "", after: str = "", limit: int = 100) -> AdapterList:
        """One page of the latest version of each id; pass the page's ``last_id`` as ``after`` for the next."""
        return self._send(_list_call(prefix, after, limit))

    def iter_adapters(self, prefix: str = "", *, page_size: int = 100) -> Iterator[AdapterObject]:
        after = ""
        while True:
            page = self.list_adapters(prefix, after, page_size)
            yield from page.data
            if not page.has_more or page.last_id is None:
                return
            after = page.last_id

    def get_adapter(self, ref: str) -> AdapterDetail:
        """``id`` (latest version) or ``id@N``, with every stored version of the id."""
        return self._send(_get_call(ref))

    def download_adapter(self, ref: str, dest: Path | str, format: DownloadFormat = "native") -> Path:
        """Save ``ref`` as a native file at ``dest`` (or into the directory ``dest``), or as a PEFT directory.

        Returns the path written: the file for ``native``, the directory for ``peft``.
        """
        return _save_download(self._send(_download_call(ref, format)), Path(dest), format)

    def delete_adapter(self, ref: str) -> AdapterDeleted:
        """Delete ``id`` (every version) or ``id@N``."""
        return self._send(_delete_call(ref))

    # -- training files --------------------------------------------------------------------

    def upload_file(
        self,
        path: Path | str,
        purpose: str = "fine-tune",
        progress: Callable[[int], None] | None = None,
        *,
        public: bool = False,
    ) -> FileObject:
        """Upload a JSONL training file; the server checks every line first (a 422 lists the bad ones).

        ``progress`` is called with the size of each chunk of the file as it is sent; ``public`` shows
        the file to every API key, not only the uploading key's namespace.
        """
        return self._send(_upload_file_call(Path(path), purpose, progress, public))

    def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 100) -> FileList:
        """One page, newest first; pass the page's ``last_id`` as ``after`` for the next."""
        return self._send(_list_files_call(purpose, after, limit))

    def get_file(self, file_id: str) -> FileObject:
        return self._send(_get_file_call(file_id))

    def file_content(self, file_id: str) -> bytes:
        """The stored bytes, exactly as uploaded."""
        return self._send(_file_content_call(file_id))

    def delete_file(self, file_id: str) -> FileDeleted:
        return self._send(_delete_file_call(file_id))

    # -- fine-tuning jobs ------------------------------------------------------------------

    def create_job(
        self,
        *,
        training_file: str,
        model: str | None = None,
        validation_file: str | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        n_epochs: int | Auto = "auto",
        batch_size: int | Auto = "auto",
        learning_rate_multiplier: float | Auto = "auto",
        adapter: dict[str, Any] | AdapterOptions | None = None,
    ) -> FineTuningJob:
        """Start training an adapter of the served model (``model`` None: its name, from ``/info``) on uploaded files.

        ``adapter`` says what to train (:class:`AdapterOptions`: type, n_frequency, scaling, target_modules, init);
        None takes the server's defaults. The job's ``fine_tuned_model`` is the adapter id once it succeeds.
        """
        return self._send(
            _create_job_call(
                model=self.info().model_id if model is None else model,
                training_file=training_file,
                validation_file=validation_file,
                suffix=suffix,
                seed=seed,
                n_epochs=n_epochs,
                batch_size=batch_size,
                learning_rate_multiplier=learning_rate_multiplier,
                adapter=adapter,
            )
        )

    def list_jobs(self, after: str | None = None, limit: int = 20) -> FineTuningJobList:
        """One page, newest first; pass the last job's id as ``after`` for the next."""
        return self._send(_list_jobs_call(after, limit))

    def get_job(self, job_id: str) -> FineTuningJob:
        return self._send(_get_job_call(job_id))

    def list_job_events(self, job_id: str, after: str | None = None, limit: int = 20) -> FineTuningJobEventList:
        """One page, newest first; pass the page's last event id as ``after`` for the older ones."""
        return self._send(_list_job_events_call(job_id, after, limit))

    def list_job_checkpoints(self, job_id: str) -> FineTuningJobCheckpointList:
        """The job's kept checkpoints, newest first; each is a servable ``adapter_id@version``."""
        return self._send(_list_job_checkpoints_call(job_id))

    def cancel_job(self, job_id: str) -> FineTuningJob:
        """Stop an unfinished job (a finished one is a 409); it keeps no adapter."""
        return self._send(_cancel_job_call(job_id))

    def follow_job(self, job_id: str, poll_interval: float = 0.5) -> Iterator[FineTuningJobEvent | FineTuningJob]:
        """Each of the job's events once, oldest first, as they happen; then the finished job, and stop.

        Stopping the iteration (or Ctrl-C) stops following only: the job keeps running on the server.
        """
        newest_seen: str | None = None
        while True:
            job = self.get_job(job_id)
            for event in self._events_since(job_id, newest_seen):
                newest_seen = event.id
                yield event
            if _job_ended(job):
                yield job
                return
            time.sleep(poll_interval)

    def _events_since(self, job_id: str, newest_seen: str | None) -> list[FineTuningJobEvent]:
        """Every event newer than ``newest_seen`` (all of them for None), oldest first."""
        unseen: list[FineTuningJobEvent] = []
        after: str | None = None
        while True:
            events, after = _unseen_events(self.list_job_events(job_id, after, FOLLOW_PAGE_SIZE), newest_seen)
            unseen.extend(events)
            if after is None:
                return unseen[::-1]


class AsyncSpectraClient:
    """The same methods as :class:`SpectraClient`, awaitable. Use ``async with``, or call :meth:`aclose`."""

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT_S, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=_headers(api_key))
        self._base_model: str | None = None

    async def __aenter__(self) -> AsyncSpectraClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        try:
            response = await self._http.send(call.build(self._http))
        except httpx.TransportError as error:
            raise _connection_error(self.base_url, error) from error
        return _finish(call, response)

    async def _stream(self, stream: _Stream[M]) -> AsyncIterator[M]:
        try:
            async with self._http.stream("POST", stream.path, json=stream.json_body) as response:
                if not response.is_success:
                    await response.aread()
                    raise SpectraAPIError.from_response(response)
                lines = SSELineSplitter()
                async for chunk in response.aiter_text():
                    for line in lines.feed(chunk):
                        if (event := _stream_event(stream, response, line)) is not None:
                            yield event
                for line in lines.close():
                    if (event := _stream_event(stream, response, line)) is not None:
                        yield event
        except httpx.TransportError as error:
            raise _connection_error(self.base_url, error) from error

    async def _model_id(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._base_model is None:
            self._base_model = (await self.info()).model_id
        return self._base_model

    # -- server ----------------------------------------------------------------------------

    async def health(self) -> HealthResponse:
        return await self._send(_health_call())

    async def info(self) -> InfoResponse:
        return await self._send(_info_call())

    # -- generation ------------------------------------------------------------------------

    async def generate(self, inputs: str, **options: Unpack[GenerateOptions]) -> GenerateResponse:
        return await self._send(_generate_call(inputs, options))

    def generate_stream(self, inputs: str, **options: Unpack[GenerateOptions]) -> AsyncIterator[StreamResponse]:
        """Use as ``async for event in client.generate_stream(...)``."""
        return self._stream(_generate_stream(inputs, options))

    async def completions(
        self, prompt: str, *, model: str | None = None, **options: Unpack[OpenAIOptions]
    ) -> Completion:
        return await self._send(_completion_call(await self._model_id(model), prompt, options))

    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        model: str | None = None,
        **options: Unpack[OpenAIOptions],
    ) -> ChatCompletion:
        return await self._send(_chat_call(await self._model_id(model), messages, options))

    # -- adapters --------------------------------------------------------------------------

    async def upload_adapter(
        self,
        adapter_id: str,
        path: Path | str,
        *,
        description: str = "",
        metadata: dict[str, Any] | None = None,
        pin: bool = False,
        public: bool = False,
    ) -> AdapterObject:
        call = await anyio.to_thread.run_sync(_upload_call, adapter_id, Path(path), description, metadata, pin, public)
        return await self._send(call)

    async def list_adapters(self, prefix: str = "", after: str = "", limit: int = 100) -> AdapterList:
        return await self._send(_list_call(prefix, after, limit))

    async def iter_adapters(self, prefix: str = "", *, page_size: int = 100) -> AsyncIterator[AdapterObject]:
        after = ""
        while True:
            page = await self.list_adapters(prefix, after, page_size)
            for adapter in page.data:
                yield adapter
            if not page.has_more or page.last_id is None:
                return
            after = page.last_id

    async def get_adapter(self, ref: str) -> AdapterDetail:
        return await self._send(_get_call(ref))

    async def download_adapter(self, ref: str, dest: Path | str, format: DownloadFormat = "native") -> Path:
        download = await self._send(_download_call(ref, format))
        return await anyio.to_thread.run_sync(_save_download, download, Path(dest), format)

    async def delete_adapter(self, ref: str) -> AdapterDeleted:
        return await self._send(_delete_call(ref))

    # -- training files --------------------------------------------------------------------

    async def upload_file(
        self,
        path: Path | str,
        purpose: str = "fine-tune",
        progress: Callable[[int], None] | None = None,
        *,
        public: bool = False,
    ) -> FileObject:
        call = await anyio.to_thread.run_sync(_upload_file_call, Path(path), purpose, progress, public)
        return await self._send(call)

    async def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 100) -> FileList:
        return await self._send(_list_files_call(purpose, after, limit))

    async def get_file(self, file_id: str) -> FileObject:
        return await self._send(_get_file_call(file_id))

    async def file_content(self, file_id: str) -> bytes:
        return await self._send(_file_content_call(file_id))

    async def delete_file(self, file_id: str) -> FileDeleted:
        return await self._send(_delete_file_call(file_id))

    # -- fine-tuning jobs ------------------------------------------------------------------

    async def create_job(
        self,
        *,
        training_file: str,
        model: str | None = None,
        validation_file: str | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        n_epochs: int | Auto = "auto",
        batch_size: int | Auto = "auto",
        learning_rate_multiplier: float | Auto = "auto",
        adapter: dict[str, Any] | AdapterOptions | None = None,
    ) -> FineTuningJob:
        return await self._send(
            _create_job_call(
                model=(await self.info()).model_id if model is None else model,
                training_file=training_file,
                validation_file=validation_file,
                suffix=suffix,
                seed=seed,
                n_epochs=n_epochs,
                batch_size=batch_size,
                learning_rate_multiplier=learning_rate_multiplier,
                adapter=adapter,
            )
        )

    async def list_jobs(self, after: str | None = None, limit: int = 20) -> FineTuningJobList:
        return await self._send(_list_jobs_call(after, limit))

    async def get_job(self, job_id: str) -> FineTuningJob:
        return await self._send(_get_job_call(job_id))

    async def list_job_events(self, job_id: str, after: str | None = None, limit: int = 20) -> FineTuningJobEventList:
        return await self._send(_list_job_events_call(job_id, after, limit))

    async def list_job_checkpoints(self, job_id: str) -> FineTuningJobCheckpointList:
        return await self._send(_list_job_checkpoints_call(job_id))

    async def cancel_job(self, job_id: str) -> FineTuningJob:
        return await self._send(_cancel_job_call(job_id))

    async def follow_job(
        self, job_id: str, poll_interval: float = 0.5
    ) -> AsyncIterator[FineTuningJobEvent | FineTuningJob]:
        newest_seen: str | None = None
        while True:
            job = await self.get_job(job_id)
            for event in await self._events_since(job_id, newest_seen):
                newest_seen = event.id
                yield event
            if _job_ended(job):
                yield job
                return
            await anyio.sleep(poll_interval)

    async def _events_since(self, job_id: str, newest_seen: str | None) -> list[FineTuningJobEvent]:
        unseen: list[FineTuningJobEvent] = []
        after: str | None = None
        while True:
            page = await self.list_job_events(job_id, after, FOLLOW_PAGE_SIZE)
            events, after = _unseen_events(page, newest_seen)
            unseen.extend(events)
            if after is None:
                return unseen[::-1]
