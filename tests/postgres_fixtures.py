"""A throwaway PostgreSQL cluster for the tests: ``initdb`` in a temp dir, a free loopback port, stopped after.

The session fixture ``postgres_url`` starts one cluster for the whole run and yields the URL of a database in
it; :func:`fresh_database` makes another database on the same cluster, for tests that need an empty one. The
server refuses to run as root, so as root the binaries run as the ``postgres`` user (``runuser``) on a
directory that user owns. Nothing is left behind: the cluster is stopped (``-m immediate``) and its directory
removed when the session ends. The binaries are Debian's (``/usr/lib/postgresql/N/bin``, installed by
``.ci/install-postgres``) or whatever ``initdb`` is on ``PATH``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

USER = "postgres"
START_TIMEOUT_S = 60


def _bin_dir() -> Path:
    """The newest Debian cluster's binaries, else the directory of ``initdb`` on ``PATH``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("PostgreSQL's initdb is missing: run .ci/install-postgres (make test does)")
    return Path(initdb).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user() -> list[str]:
    """The command prefix that runs a PostgreSQL binary: as ``postgres`` when we are root (it refuses root)."""
    return ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []


def _run(*command: str | Path) -> None:
    subprocess.run([*_as_server_user(), *map(str, command)], check=True, capture_output=True, timeout=START_TIMEOUT_S)


def fresh_database(url: str) -> str:
    """A new empty database on the cluster of ``url``; returns its URL."""
    name = f"spectra_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{url.rsplit('/', 1)[0]}/{name}"


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A cluster in a temp dir on a free loopback port, stopped and removed on exit; yields the URL of its
    ``spectra`` database (``postgresql://postgres@127.0.0.1:PORT/spectra``). The benchmarks use it too."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="spectra-pg-"))
    if os.geteuid() == 0:
        account = pwd.getpwnam(USER)
        os.chown(root, account.pw_uid, account.pw_gid)
    data, log = root / "data", root / "server.log"
    port = _free_port()
    try:
        _run(bin_dir / "initdb", "-D", data, "-A", "trust", "-U", USER, "--no-sync")
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
        _run(bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "-t", str(START_TIMEOUT_S), "start")
        try:
            server = f"postgresql://{USER}@127.0.0.1:{port}/postgres"
            with psycopg.connect(server, autocommit=True) as connection:
                connection.execute("CREATE DATABASE spectra")
            yield f"postgresql://{USER}@127.0.0.1:{port}/spectra"
        finally:
            _run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The ``spectra`` database of a :func:`throwaway_cluster` started once for the session."""
    with throwaway_cluster() as url:
        yield url
