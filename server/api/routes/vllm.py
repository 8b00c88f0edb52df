"""vLLM's runtime adapter endpoints: ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Loading reads a PEFT FourierFT directory or native file from the server's own disk, so it is
confined to ``--import-root`` (off when unset). The adapter goes through the same validation and
durable store as an upload; unloading deletes the id (all versions). Replies are plain text, as
vLLM's are.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from server.api.deps import AdapterIndexDep, EngineDep, PrincipalDep, SettingsDep
from server.api.errors import error_response
from server.api.schemas.adapters import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.api.schemas.common import ErrorResponse
from server.api.tenancy import owned_adapter_ref, writable_adapter_id
from server.engine.types import UnknownAdapterError
from server.spectral.formats.uploads import read_path

router = APIRouter(prefix="/v1", tags=["vLLM runtime adapters"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse, "description": "lora_path is outside --import-root, or no import root is set."},
    404: {"model": ErrorResponse, "description": "lora_path or lora_name does not exist."},
    413: {"model": ErrorResponse, "description": "A file over --max-adapter-bytes."},
    415: {"model": ErrorResponse, "description": "A PEFT adapter of another type."},
    422: {"model": ErrorResponse, "description": "Invalid name or adapter file."},
}


@router.post("/load_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
async def load_lora_adapter(
    body: LoadLoraAdapterRequest, engine: EngineDep, settings: SettingsDep, principal: PrincipalDep
):
    if settings.import_root is None:
        return error_response(
            "loading adapters from server paths is disabled; start the server with --import-root DIR", 403
        )
    root = settings.import_root.resolve()
    try:
        path = (root / body.lora_path).resolve()
    except (OSError, ValueError) as error:
        return error_response(f"lora_path is not a usable path ({error})", 422, param="lora_path")
    if not path.is_relative_to(root):
        return error_response(f"lora_path must lie under the import root {root}", 403, param="lora_path")
    if not path.exists():
        return error_response(f"lora_path {body.lora_path!r} does not exist", 404, param="lora_path")
    registry = engine.registry
    adapter_id = writable_adapter_id(principal, body.lora_name)

    def store() -> None:
        parsed = read_path(path, registry.module_shapes, settings.max_adapter_bytes)
        registry.register(
            adapter_id,
            parsed.adapter,
            data=parsed.native_bytes,
            source_format=parsed.source_format,
            description=f"loaded from {path}",
        )

    await run_in_threadpool(store)
    return PlainTextResponse(f"Success: LoRA adapter '{adapter_id}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest, engine: EngineDep, principal: PrincipalDep, index: AdapterIndexDep
) -> PlainTextResponse:
    registry = engine.registry
    not_found = UnknownAdapterError(f"the adapter {body.lora_name!r} cannot be found", param="lora_name")
    try:
        ref = await run_in_threadpool(owned_adapter_ref, principal, index, body.lora_name, param="lora_name")
    except UnknownAdapterError as error:
        raise not_found from error
    if not await run_in_threadpool(registry.delete, ref):
        raise not_found
    return PlainTextResponse(f"Success: LoRA adapter '{ref}' removed successfully.")
