"""Training files over HTTP, in OpenAI's shape (``/v1/files``): upload, list, show, content, delete.

An upload is checked line by line against the served model's tokenizer and context limit before
anything is written (one 422 lists the invalid lines), then stored durably (blob fsynced, index row
committed) before the 200.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from adapters_store.errors import UnknownCursorError
from server.api.deps import EngineDep, FilesDep, PermissionDeniedError, PrincipalDep, SettingsDep
from server.api.schemas.common import ErrorResponse
from server.api.schemas.files import FileDeleted, FileList, FileObject
from server.api.tenancy import visible_file
from server.engine.types import InvalidRequestError
from server.finetune.data import TrainingFileError, count_training_examples
from server.finetune.jobs import UnknownFileError
from server.spectral.formats.uploads import base_name

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSES = ("fine-tune",)
MAX_FILENAME_CHARS = 255
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        404: "No such file.",
        409: "The stored file is missing or failed its checksum (broken); upload it again.",
        413: "A file over --max-training-file-bytes.",
        422: "An unsupported purpose, or invalid lines in the file; the message lists each line and why.",
    }.items()
}


class TrainingFileTooLargeError(TrainingFileError):
    status_code = 413


async def _read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise TrainingFileTooLargeError(f"the file is {upload.size} bytes; the limit is {max_bytes}")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TrainingFileTooLargeError(f"the file is over the limit of {max_bytes} bytes")
    return data


@router.post("", response_model=FileObject, responses=_ERRORS)
async def upload_file(
    engine: EngineDep,
    settings: SettingsDep,
    files: FilesDep,
    principal: PrincipalDep,
    file: Annotated[UploadFile, File(description="JSONL: prompt/completion or messages lines.")],
    purpose: Annotated[str, Form(description="Only 'fine-tune'.")],
    public: Annotated[bool, Form(description="Visible to every API key, not only this key's namespace.")] = False,
) -> FileObject:
    if purpose not in PURPOSES:
        accepted = ", ".join(repr(value) for value in PURPOSES)
        raise InvalidRequestError(f"purpose {purpose!r} is not supported; accepted: {accepted}", param="purpose")
    upload_name = file.filename or ""
    filename = base_name(upload_name)[:MAX_FILENAME_CHARS]
    if not filename:
        raise TrainingFileError(f"the file part needs a file name (e.g. train.jsonl), got {upload_name!r}")
    data = await _read_upload(file, settings.max_training_file_bytes)

    def count() -> int:
        return count_training_examples(
            data,
            engine.tokenizer,
            max_tokens=engine.settings.max_total_tokens,
            end_token_ids=engine.runner.eos_token_ids,
        )

    examples = await run_in_threadpool(count)
    record = await run_in_threadpool(
        lambda: files.put(
            data, filename=filename, purpose=purpose, examples=examples, namespace=principal.namespace, public=public
        )
    )
    return FileObject.of(record)


@router.get("", response_model=FileList, responses=_ERRORS)
async def list_files(
    files: FilesDep,
    principal: PrincipalDep,
    purpose: Annotated[str | None, Query(description="Only files with this purpose.")] = None,
    after: Annotated[str | None, Query(description="The last_id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
) -> FileList:
    if after is not None:
        await run_in_threadpool(visible_file, principal, files, after, param="after")
    try:
        records = await run_in_threadpool(
            files.list, purpose=purpose, after=after, limit=limit + 1, visible_to=principal.visible_namespace
        )
    except UnknownCursorError as error:
        raise UnknownFileError(str(error), param="after") from error
    page = [FileObject.of(record) for record in records[:limit]]
    return FileList(
        data=page,
        has_more=len(records) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


@router.get("/{file_id}", response_model=FileObject, responses=_ERRORS)
async def retrieve_file(files: FilesDep, principal: PrincipalDep, file_id: str) -> FileObject:
    return FileObject.of(await run_in_threadpool(visible_file, principal, files, file_id))


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={
        **_ERRORS,
        200: {
            "description": "The file's bytes as uploaded.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
    },
)
async def file_content(files: FilesDep, principal: PrincipalDep, file_id: str) -> Response:
    record = await run_in_threadpool(visible_file, principal, files, file_id)
    data = await run_in_threadpool(files.read, record)
    # RFC 5987 form: client file names may hold quotes or characters a latin-1 header cannot.
    headers = {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(record.filename)}"}
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.delete("/{file_id}", response_model=FileDeleted, responses=_ERRORS)
async def delete_file(files: FilesDep, principal: PrincipalDep, file_id: str) -> FileDeleted:
    record = await run_in_threadpool(visible_file, principal, files, file_id)
    if not principal.owns(record.namespace):
        raise PermissionDeniedError(
            f"file {file_id!r} is not in the namespace of the API key {principal.name!r}", param="file_id"
        )
    if not await run_in_threadpool(files.delete, file_id):
        raise UnknownFileError(f"file {file_id!r} not found", param="file_id")
    return FileDeleted(id=file_id)
