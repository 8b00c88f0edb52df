"""The primitives every store here is built on: atomic durable writes, one process per directory, and
additive schema upgrades of its SQLite tables."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import TextIO

from adapters_store.errors import StoreLockedError


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, temp_dir: Path) -> None:
    """``data`` at ``path`` entirely or not at all, durable when this returns: a temp file in ``temp_dir``
    (same file system), fsynced, renamed over ``path``, then the directory fsynced."""
    fd, temp_name = tempfile.mkstemp(dir=temp_dir, prefix="write-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def lock_directory(root: Path, what: str) -> TextIO:
    """Hold an exclusive ``flock`` on ``root/.lock`` for as long as the returned file stays open."""
    lock_file = (root / ".lock").open("a")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        lock_file.close()
        raise StoreLockedError(f"the {what} {root} is in use by another process") from error
    return lock_file


def ensure_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Add ``columns`` (name -> SQL type and default) that a table created by an older release lacks."""
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for name, definition in columns.items():
        if name not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
