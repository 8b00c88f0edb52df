"""Content-addressed blob files: written to a temp file, fsynced, renamed into place."""

from __future__ import annotations

import hashlib
from pathlib import Path

from adapters_store.durable import write_atomically
from adapters_store.errors import BlobCorruptError


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its sha256; storing the same bytes twice is a no-op.

        A stored copy that no longer hashes to its name (damaged on disk) is replaced: uploading the
        same file again is how a broken version is repaired, so it must not be skipped as a duplicate.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if target.exists() and self.verify(sha256) is None:
            return sha256
        target.parent.mkdir(exist_ok=True)
        write_atomically(target, data, self.tmp)
        return sha256

    def get(self, sha256: str) -> bytes:
        data = self.path(sha256).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobCorruptError(f"blob {sha256} fails its sha256 check")
        return data

    def verify(self, sha256: str) -> str | None:
        """None when the blob is present and intact, else what is wrong with it."""
        try:
            self.get(sha256)
        except FileNotFoundError:
            return f"blob {sha256} is missing"
        except BlobCorruptError as error:
            return str(error)
        return None

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def all_hashes(self) -> set[str]:
        return {path.name for path in self.root.glob("??/*") if path.is_file()}

    def clear_temp_files(self) -> int:
        leftovers = list(self.tmp.iterdir())
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)
