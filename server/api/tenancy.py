"""Namespaces: which adapters, files and jobs a caller may see and write, and what its names mean.

An adapter id is ``name`` (the server's own: written in the open server, by an admin, or with
``--adapter``; visible to every key) or ``namespace/name`` (a key's: visible to that namespace,
admins, and everyone if its latest version is public). A key without ``admin`` writes only in its
own namespace, and a bare ``name`` it sends means ``its-namespace/name`` first, then the server's
``name``. Whatever a caller may not see answers 404, exactly like what does not exist, so ids in
other namespaces do not leak.
"""

from __future__ import annotations

from adapters_store.ids import parse_ref, validate_adapter_id
from adapters_store.interfaces import AdapterCatalog, FileRepository
from adapters_store.records import AdapterRecord, FileRecord, JobRecord
from server.api.auth import Principal
from server.api.deps import PermissionDeniedError
from server.engine.adapters import InvalidAdapterRefError
from server.engine.types import UnknownAdapterError
from server.finetune.jobs import JobNotFoundError, UnknownFileError


def writable_adapter_id(principal: Principal, adapter_id: str) -> str:
    """The id an upload by ``principal`` is stored under (its namespace added to a bare name)."""
    validate_adapter_id(adapter_id)
    if principal.sees_all_namespaces:
        return adapter_id
    namespace, slash, name = adapter_id.partition("/")
    if not slash:
        return f"{principal.namespace}/{adapter_id}"
    if namespace != principal.namespace:
        raise PermissionDeniedError(
            f"the API key {principal.name!r} writes adapters in its namespace only: "
            f"name it {name!r} or '{principal.namespace}/{name}'",
            param="adapter_id",
        )
    return adapter_id


def _candidates(principal: Principal, adapter_id: str) -> list[str]:
    if "/" in adapter_id or principal.namespace is None:
        return [adapter_id]
    return [f"{principal.namespace}/{adapter_id}", adapter_id]


def visible_adapter(
    principal: Principal, index: AdapterCatalog, ref: str, *, param: str = "adapter_id"
) -> AdapterRecord:
    """The record ``ref`` (``id`` or ``id@N``) names for ``principal``; 404 if none it may see."""
    try:
        parsed = parse_ref(ref)
    except ValueError as error:
        raise InvalidAdapterRefError(str(error), param=param) from error
    for candidate in _candidates(principal, parsed.adapter_id):
        record = index.get(candidate, parsed.version)
        if record is None:
            continue
        # Visibility follows the latest version, so making an adapter private hides its old versions too.
        latest = record if parsed.version is None else index.get(candidate)
        if latest is not None and principal.can_see(record.namespace, latest.public):
            return record
    raise UnknownAdapterError(f"adapter {ref!r} not found", param=param)


def _qualified(record: AdapterRecord, ref: str) -> str:
    """``ref`` with the full id of the record it resolved to, keeping an explicit ``@N`` (not "latest")."""
    version = parse_ref(ref).version
    return record.adapter_id if version is None else f"{record.adapter_id}@{version}"


def owned_adapter_ref(principal: Principal, index: AdapterCatalog, ref: str, *, param: str = "adapter_id") -> str:
    """``ref`` qualified for a delete: it must be visible and in the caller's namespace (else 404 or 403)."""
    record = visible_adapter(principal, index, ref, param=param)
    if not principal.owns(record.namespace):
        raise PermissionDeniedError(
            f"adapter {record.adapter_id!r} is not in the namespace of the API key {principal.name!r}", param=param
        )
    return _qualified(record, ref)


def resolve_blend(
    principal: Principal, index: AdapterCatalog, adapters: dict[str, float], *, param: str
) -> dict[str, float]:
    """A generation request's adapters under the ids the engine knows them by."""
    if principal.namespace is None:
        return adapters
    resolved: dict[str, float] = {}
    for ref, weight in adapters.items():
        resolved[_qualified(visible_adapter(principal, index, ref, param=param), ref)] = weight
    return resolved


def visible_file(principal: Principal, files: FileRepository, file_id: str, *, param: str = "file_id") -> FileRecord:
    record = files.get(file_id)
    if record is None or not principal.can_see(record.namespace, record.public):
        raise UnknownFileError(f"file {file_id!r} not found", param=param)
    return record


def visible_job(principal: Principal, job: JobRecord) -> JobRecord:
    if not principal.can_see(job.namespace, public=False):
        raise JobNotFoundError(f"fine-tuning job {job.id!r} not found", param="fine_tuning_job_id")
    return job
