"""The adapter store over HTTP: upload, list, show, download and delete (``/v1/adapters``).

An upload is validated against the served model before anything is written, stored durably
(blob fsynced, index row committed), and servable by the next request; nothing restarts or
pauses. Ids with a namespace contain a slash, so the id routes take the rest of the path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from adapters_store.records import AdapterRecord
from server.api.deps import AdapterIndexDep, EngineDep, PrincipalDep, SettingsDep, requires
from server.api.schemas.adapters import AdapterDeleted, AdapterDetail, AdapterList, AdapterObject
from server.api.schemas.common import ErrorResponse
from server.api.tenancy import owned_adapter_ref, visible_adapter, writable_adapter_id
from server.engine.types import UnknownAdapterError
from server.spectral.formats import native
from server.spectral.formats.errors import AdapterFormatError, AdapterTooLargeError
from server.spectral.formats.uploads import ParsedAdapter, base_name, parse_files, peft_zip

router = APIRouter(prefix="/v1/adapters", tags=["Adapters"])

MAX_DESCRIPTION_CHARS = 4096
MAX_METADATA_BYTES = 64 * 1024
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        404: "No such adapter or version.",
        409: "The stored file failed its checksum (broken); upload it again.",
        413: "A file over --max-adapter-bytes.",
        415: "A PEFT adapter of another type (only FOURIERFT is served).",
        422: "Invalid id, file or field; the message says which and why.",
        429: "Adapter memory is full of adapters in use (pin only).",
    }.items()
}


_DOWNLOADS = ("application/octet-stream", "application/zip")  # native, peft


def _metadata(text: str) -> dict[str, Any]:
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise AdapterFormatError(f"metadata is over {MAX_METADATA_BYTES} bytes")
    value = native.loads_json(text, "metadata")
    if not isinstance(value, dict):
        raise AdapterFormatError("metadata must be a JSON object")
    return value


async def _read_files(uploads: list[UploadFile], max_bytes: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for upload in uploads:
        name = base_name(upload.filename or "")
        if not name:
            raise AdapterFormatError("every file part needs a file name (e.g. adapter.safetensors)")
        if name in files:
            raise AdapterFormatError(f"file {name!r} was sent twice")
        if upload.size is not None and upload.size > max_bytes:
            raise AdapterTooLargeError(f"{name} is {upload.size} bytes; the limit is {max_bytes}")
        files[name] = await upload.read()
    return files


@router.post(
    "", status_code=201, response_model=AdapterObject, responses=_ERRORS, dependencies=requires("adapters:write")
)
async def upload_adapter(
    engine: EngineDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    adapter_id: Annotated[
        str,
        Form(
            description="'name' or 'namespace/name'; an existing id gets a new version. With API keys, "
            "a bare name is stored in the key's namespace."
        ),
    ],
    file: Annotated[
        list[UploadFile],
        File(description="One native .safetensors file, or adapter_config.json + adapter_model.safetensors."),
    ],
    description: Annotated[str, Form(max_length=MAX_DESCRIPTION_CHARS)] = "",
    metadata: Annotated[str, Form(description="A JSON object kept with the version.")] = "{}",
    pin: Annotated[bool, Form(description="Load now and never evict.")] = False,
    public: Annotated[bool, Form(description="Servable by every API key, not only this key's namespace.")] = False,
) -> AdapterObject:
    adapter_id = writable_adapter_id(principal, adapter_id)
    metadata_object = _metadata(metadata)
    files = await _read_files(file, settings.max_adapter_bytes)
    registry = engine.registry

    def store() -> AdapterRecord:
        parsed: ParsedAdapter = parse_files(files, registry.module_shapes)
        return registry.register(
            adapter_id,
            parsed.adapter,
            data=parsed.native_bytes,
            source_format=parsed.source_format,
            description=description,
            metadata=metadata_object,
            pin=pin,
            public=public,
        )

    return AdapterObject.of(await run_in_threadpool(store))


@router.get("", response_model=AdapterList)
async def list_adapters(
    engine: EngineDep,
    principal: PrincipalDep,
    index: AdapterIndexDep,
    prefix: Annotated[str, Query(max_length=130, description="Only ids starting with this.")] = "",
    after: Annotated[str, Query(max_length=130, description="The last_id of the previous page.")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AdapterList:
    records = await run_in_threadpool(
        index.list_latest,
        prefix=prefix,
        after=after,
        limit=limit + 1,
        visible_to=principal.visible_namespace,
    )
    page = [AdapterObject.of(record) for record in records[:limit]]
    return AdapterList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(records) > limit,
    )


@router.get(
    "/{adapter_ref:path}/download",
    response_class=Response,
    responses={
        **_ERRORS,
        200: {
            "description": "The adapter file: native .safetensors, or (format=peft) a PEFT zip.",
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in _DOWNLOADS},
        },
    },
)
async def download_adapter(
    engine: EngineDep,
    principal: PrincipalDep,
    index: AdapterIndexDep,
    adapter_ref: str,
    format: Annotated[Literal["native", "peft"], Query(description="native .safetensors or a PEFT zip")] = "native",
) -> Response:
    registry = engine.registry
    record = await run_in_threadpool(visible_adapter, principal, index, adapter_ref)
    data = await run_in_threadpool(registry.read_bytes, record)
    stem = f"{record.adapter_id.replace('/', '--')}-v{record.version}"
    if format == "native":
        filename, media_type = f"{stem}.safetensors", "application/octet-stream"
    else:
        data = await run_in_threadpool(lambda: peft_zip(native.from_bytes(data), record.base_model))
        filename, media_type = f"{stem}-peft.zip", "application/zip"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', "X-Adapter-Sha256": record.sha256}
    return Response(data, media_type=media_type, headers=headers)


@router.get("/{adapter_ref:path}", response_model=AdapterDetail, responses=_ERRORS)
async def show_adapter(principal: PrincipalDep, index: AdapterIndexDep, adapter_ref: str) -> AdapterDetail:
    record = await run_in_threadpool(visible_adapter, principal, index, adapter_ref)
    versions = [AdapterObject.of(version) for version in index.versions(record.adapter_id)]
    return AdapterDetail(**AdapterObject.of(record).model_dump(), versions=versions)


@router.delete(
    "/{adapter_ref:path}", response_model=AdapterDeleted, responses=_ERRORS, dependencies=requires("adapters:write")
)
async def delete_adapter(
    engine: EngineDep, principal: PrincipalDep, index: AdapterIndexDep, adapter_ref: str
) -> AdapterDeleted:
    registry = engine.registry
    ref = await run_in_threadpool(owned_adapter_ref, principal, index, adapter_ref)
    deleted = await run_in_threadpool(registry.delete, ref)
    if not deleted:
        raise UnknownAdapterError(f"adapter {adapter_ref!r} not found", param="adapter_id")
    return AdapterDeleted(id=deleted[0].adapter_id, versions=[record.version for record in deleted])
