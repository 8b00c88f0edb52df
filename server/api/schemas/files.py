"""Bodies of the training file endpoints (``/v1/files``), in OpenAI's shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from adapters_store.records import FileRecord


class FileObject(BaseModel):
    id: str = Field(description="'file-' and 24 hex digits")
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds")
    filename: str
    purpose: Literal["fine-tune"]
    status: Literal["processed", "error"] = Field(
        description="'processed' once stored (validated on upload); 'error' when the stored bytes are missing or "
        "corrupt (status_details says which), and the file has to be uploaded again."
    )
    status_details: str | None = None

    @classmethod
    def of(cls, record: FileRecord) -> FileObject:
        return cls(
            id=record.id,
            bytes=record.bytes,
            created_at=record.created_at,
            filename=record.filename,
            purpose=record.purpose,  # type: ignore[arg-type]
            status="error" if record.broken else "processed",
            status_details=record.broken,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject] = Field(description="Newest first.")
    has_more: bool
    first_id: str | None
    last_id: str | None = Field(description="Pass as 'after' to get the next page.")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
