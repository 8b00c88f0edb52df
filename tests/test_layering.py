"""The store's layering: ``adapters_store`` is pure persistence, the server depends on its interfaces, and the
embedded (SQLite) backend implements them (docs/store.md, "Layers")."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from adapters_store.files import FileStore
from adapters_store.interfaces import (
    AdapterCatalog,
    AdapterChangeFeed,
    AdapterRepository,
    FileRepository,
    JobRepository,
    StoreMaintenance,
)
from adapters_store.jobs import JobStore
from adapters_store.postgres import PostgresAdapterStore, PostgresChangeFeed
from adapters_store.postgres_files import PostgresFileStore
from adapters_store.postgres_jobs import PostgresJobStore
from adapters_store.store import AdapterStore

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "adapters_store"
# Model code and the server above it (``safetensors`` itself is only a file format; its torch half is not).
FORBIDDEN = ("torch", "safetensors.torch", "transformers", "peft", "server")
# What server/ and clients/ may import from adapters_store: the backend-neutral modules. The backends' own modules
# (and their durable-write primitives: checkpoints' optimizer states are the job store's) are for the composition
# root alone, the one place that builds them.
NEUTRAL = {"errors", "ids", "interfaces", "records"}
COMPOSITION_ROOT = REPO / "server" / "main.py"
pytest_plugins = ["tests.postgres_fixtures"]
PROTOCOLS = {"adapters": AdapterRepository, "catalog": AdapterCatalog, "files": FileRepository, "jobs": JobRepository}
# Only a shared store has these: the embedded one has a single writer and recovers under its lock at start.
SHARED_PROTOCOLS = {"changes": AdapterChangeFeed, "maintenance": StoreMaintenance}


def _imports(path: Path) -> list[str]:
    """The modules ``path`` imports; ``from a import b`` counts as ``a.b`` too (b may be a module)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.append(node.module or "")
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def _python_files(*roots: Path) -> list[Path]:
    return sorted(path for root in roots for path in root.rglob("*.py"))


@pytest.mark.parametrize("path", _python_files(STORE), ids=lambda path: path.name)
def test_the_store_imports_no_model_or_server_code(path: Path) -> None:
    bad = [name for name in _imports(path) if any(_within(name, forbidden) for forbidden in FORBIDDEN)]
    assert bad == [], f"{path.relative_to(REPO)} imports {bad}"


def test_importing_the_store_loads_no_model_or_server_code() -> None:
    modules = ", ".join(f"adapters_store.{path.stem}" for path in _python_files(STORE))
    code = f"import sys, {modules}; print(sorted(name for name in sys.modules if name in {FORBIDDEN!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_only_the_composition_root_imports_a_backend() -> None:
    backends = [
        f"adapters_store.{path.stem}" for path in _python_files(STORE) if path.stem not in {*NEUTRAL, "__init__"}
    ]
    offenders = {}
    for path in _python_files(REPO / "server", REPO / "clients"):
        bad = sorted({name for name in _imports(path) if any(_within(name, backend) for backend in backends)})
        if bad and path != COMPOSITION_ROOT:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


@pytest.fixture
def embedded(tmp_path: Path):
    """The embedded backend, laid out as the server lays it out under ``--data-dir``."""
    adapters = AdapterStore(tmp_path / "adapters")
    files = FileStore(tmp_path / "files")
    jobs = JobStore(tmp_path / "finetune" / "jobs.sqlite3")
    yield {"adapters": adapters, "catalog": adapters.index, "files": files, "jobs": jobs}
    for store in (adapters, files, jobs):
        store.close()


def _shape(function) -> list[tuple[str, object, object]]:
    """Parameter names, kinds and defaults: what a caller relies on (annotations may be spelt differently)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.fixture
def postgresql(postgres_url: str):
    """The PostgreSQL backend, on a fresh database."""
    from tests.postgres_fixtures import fresh_database

    database = fresh_database(postgres_url)
    adapters, changes = PostgresAdapterStore(database), PostgresChangeFeed(database)
    files, jobs = PostgresFileStore(database), PostgresJobStore(database)
    yield {
        "adapters": adapters, "catalog": adapters.index, "files": files, "jobs": jobs,
        "changes": changes, "maintenance": adapters,
    }  # fmt: skip
    for store in (adapters, changes, files, jobs):
        store.close()


@pytest.mark.parametrize("kind", PROTOCOLS)
def test_the_embedded_backend_implements_the_interfaces(embedded: dict, kind: str) -> None:
    _check_implements(embedded[kind], PROTOCOLS[kind], kind)


@pytest.mark.parametrize("kind", [*PROTOCOLS, *SHARED_PROTOCOLS])
def test_the_postgresql_backend_implements_the_interfaces(postgresql: dict, kind: str) -> None:
    _check_implements(postgresql[kind], (PROTOCOLS | SHARED_PROTOCOLS)[kind], kind)


def _check_implements(store: object, protocol: type, kind: str) -> None:
    assert isinstance(store, protocol)
    methods = [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert methods
    for name in methods:
        assert _shape(getattr(type(store), name)) == _shape(getattr(protocol, name)), f"{kind}: {name}"
