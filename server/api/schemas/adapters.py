"""Bodies of the adapter store endpoints (``/v1/adapters``) and vLLM's runtime adapter endpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from adapters_store.records import AdapterRecord


class AdapterObject(BaseModel):
    id: str = Field(description="'name' or 'namespace/name'")
    object: Literal["adapter"] = "adapter"
    version: int = Field(description="Request 'id@N' to pin this version; plain 'id' is the latest.")
    method: str = Field(description="fourierft or sdctft")
    n_params: int
    size_bytes: int
    sha256: str
    created_at: int = Field(description="Unix seconds")
    base_model: str
    source_format: Literal["native", "peft", "finetune"]
    description: str
    metadata: dict[str, Any]
    pinned: bool
    public: bool = Field(description="Visible to every API key; otherwise to its namespace (and admins) only.")
    status: Literal["ready", "broken"]
    broken_reason: str | None = None

    @classmethod
    def of(cls, record: AdapterRecord) -> AdapterObject:
        return cls(
            id=record.adapter_id,
            version=record.version,
            method=record.method,
            n_params=record.n_params,
            size_bytes=record.size_bytes,
            sha256=record.sha256,
            created_at=int(record.created_at),
            base_model=record.base_model,
            source_format=record.source_format,  # type: ignore[arg-type]
            description=record.description,
            metadata=record.metadata,
            pinned=record.pinned,
            public=record.public,
            status="broken" if record.broken else "ready",
            broken_reason=record.broken,
        )


class AdapterDetail(AdapterObject):
    versions: list[AdapterObject] = Field(description="Every stored version, oldest first.")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]
    first_id: str | None
    last_id: str | None = Field(description="Pass as 'after' to get the next page.")
    has_more: bool


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter.deleted"] = "adapter.deleted"
    deleted: bool = True
    versions: list[int]


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, description="The adapter id to register.")
    lora_path: str = Field(min_length=1, description="A PEFT directory or native file under --import-root.")


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
