"""Ids: adapter ids (``name`` or ``namespace/name``, optionally pinned to a version as ``id@N``), chosen by
clients; and the random ids of training files, jobs and checkpoints (``file-``, ``ftjob-``, ``ftckpt-`` + 24
hex digits), chosen here."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = (
    "'name' or 'namespace/name', each part 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit, "
    "and a namespaced name other than 'download'"
)


class InvalidAdapterIdError(ValueError):
    status_code = 422


@dataclass(frozen=True)
class AdapterRef:
    adapter_id: str
    version: int | None = None

    def __str__(self) -> str:
        return self.adapter_id if self.version is None else f"{self.adapter_id}@{self.version}"


def validate_adapter_id(adapter_id: str) -> str:
    parts = adapter_id.split("/")
    # "ns/download" would be ambiguous with GET /v1/adapters/ns/download (the download of "ns").
    reserved = len(parts) == 2 and parts[1] == "download"
    if len(parts) > 2 or not all(_PART.fullmatch(part) for part in parts) or ".." in adapter_id or reserved:
        raise InvalidAdapterIdError(f"invalid adapter id {adapter_id!r}: expected {ID_RULE}")
    return adapter_id


def parse_ref(text: str) -> AdapterRef:
    """``id`` (latest version) or ``id@N`` (version N >= 1)."""
    adapter_id, sep, version = text.partition("@")
    validate_adapter_id(adapter_id)
    if not sep:
        return AdapterRef(adapter_id)
    if not version.isdigit() or int(version) < 1:
        raise InvalidAdapterIdError(f"invalid version in {text!r}: expected id@N with N >= 1")
    return AdapterRef(adapter_id, int(version))


def new_id(prefix: str) -> str:
    """``prefix-`` + 24 random hex digits: 96 bits, so ids never collide, across processes too."""
    return f"{prefix}-{secrets.token_hex(12)}"
