"""The durable adapter store: blob first, index row second, and recovery on open.

The embedded :class:`adapters_store.interfaces.AdapterRepository`: blob files under ``root/blobs`` and the
SQLite index ``root/index.sqlite3`` (the server's root is ``<data-dir>/adapters``), one process per root.

An upload is acknowledged only after its blob is fsynced and renamed into place and its index
row is committed, so a crash at any point leaves either nothing visible or a complete version.
On open, the store deletes temp files and blobs no row refers to, and marks every row whose
blob is missing or fails its sha256 as broken (listed with its reason, never served).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.blobs import BlobStore
from adapters_store.durable import lock_directory
from adapters_store.ids import validate_adapter_id
from adapters_store.index import AdapterIndex, AdapterRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    temp_files_removed: int
    orphan_blobs_removed: int
    broken: list[tuple[str, int, str]]


class AdapterStore:
    def __init__(self, root: Path):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = lock_directory(root, "adapter store")
        # Orders "blob present, then row committed" against "row deleted, then blob removed" when two
        # versions share one blob.
        self._blob_lock = threading.Lock()
        self.blobs = BlobStore(root / "blobs")
        self.index = AdapterIndex(root / "index.sqlite3")
        self.recovery = self._recover()

    def _recover(self) -> RecoveryReport:
        temp_files = self.blobs.clear_temp_files()
        records = self.index.all_records()
        referenced = {record.sha256 for record in records}
        orphans = self.blobs.all_hashes() - referenced
        for sha256 in orphans:
            self.blobs.remove(sha256)
        broken = []
        for record in records:
            problem = self.blobs.verify(record.sha256)
            if problem != record.broken:
                self.index.mark_broken(record.adapter_id, record.version, problem)
            if problem:
                broken.append((record.adapter_id, record.version, problem))
                logger.error("adapter broken id=%s version=%d reason=%s", record.adapter_id, record.version, problem)
        report = RecoveryReport(temp_files, len(orphans), broken)
        logger.info(
            "store recovered versions=%d temp_removed=%d orphans_removed=%d broken=%d",
            len(records),
            temp_files,
            len(orphans),
            len(broken),
        )
        return report

    def put(
        self,
        adapter_id: str,
        data: bytes,
        *,
        method: str,
        n_params: int,
        source_format: str,
        base_model: str,
        description: str = "",
        metadata: dict[str, Any] | None = None,
        pinned: bool = False,
        public: bool = False,
    ) -> AdapterRecord:
        """Store a validated adapter file as the next version of ``adapter_id``; durable when this returns."""
        validate_adapter_id(adapter_id)
        sha256 = self.blobs.put(data)
        with self._blob_lock:
            if not self.blobs.path(sha256).exists():
                self.blobs.put(data)
            return self.index.add_version(
                adapter_id,
                sha256=sha256,
                method=method,
                n_params=n_params,
                size_bytes=len(data),
                source_format=source_format,
                base_model=base_model,
                description=description,
                metadata=metadata,
                pinned=pinned,
                public=public,
            )

    def read(self, record: AdapterRecord) -> bytes:
        return self.blobs.get(record.sha256)

    def delete(self, adapter_id: str, version: int | None = None) -> list[AdapterRecord]:
        with self._blob_lock:
            deleted = self.index.delete(adapter_id, version)
            for sha256 in {record.sha256 for record in deleted}:
                if not self.index.sha_in_use(sha256):
                    self.blobs.remove(sha256)
        return deleted

    def close(self) -> None:
        self.index.close()
        self._lock_file.close()
