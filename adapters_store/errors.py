"""What the stores raise, whatever the backend: the server catches these, never a backend's own errors."""

from __future__ import annotations


class StoreLockedError(RuntimeError):
    """Another process has the store open; two writers would corrupt each other's recovery."""


class StoreUnavailableError(RuntimeError):
    """A shared store (``--store``) that cannot be reached."""


class BlobCorruptError(RuntimeError):
    """Stored bytes that no longer hash to their sha256."""


class FileBrokenError(RuntimeError):
    """A stored file whose blob is missing or no longer matches its sha256; it has to be uploaded again."""


class UnknownCursorError(LookupError):
    """A listing's ``after`` names a file, job or event that does not exist (never did, or was deleted between
    pages)."""
