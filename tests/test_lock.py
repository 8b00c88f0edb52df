"""requirements.lock (and requirements-nodeps.lock): what `make test` and `make serve` install, verbatim, and
what this suite runs on."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK = REPO_ROOT / "requirements.lock"
NODEPS_LOCK = REPO_ROOT / "requirements-nodeps.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def _locked(lock: Path = LOCK) -> dict[str, str]:
    pins = {}
    lines = lock.read_text().splitlines()
    for number, line in enumerate(lines):
        match = PIN.match(line)
        if match:
            assert lines[number + 1].strip().startswith("--hash=sha256:"), f"{line}: no hash"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_packages_installed_without_dependencies_are_hashed_and_outside_the_main_lock() -> None:
    """lorax-client's declared requirements conflict with the lock's, so it is installed with --no-deps."""
    nodeps = _locked(NODEPS_LOCK)
    assert nodeps, "requirements-nodeps.lock pins nothing"
    assert not set(nodeps) & set(_locked()), "a package pinned in both locks"


def test_the_lock_pins_every_package_with_hashes_and_the_local_cpu_torch() -> None:
    pins = _locked()
    requirement_lines = [line for line in LOCK.read_text().splitlines() if line and line[0] not in " #"]
    assert len(requirement_lines) == len(pins), "every requirement line is an exact, hashed pin"
    assert pins["torch"] == "2.13.0+cpu"
    assert not [name for name in pins if name.startswith("nvidia-") or name in ("triton", "cuda-bindings")]


def test_the_lock_satisfies_pyproject() -> None:
    """A range changed in pyproject.toml without `make lock` fails here, not on a user's machine."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    declared = [
        *project["project"]["dependencies"],
        *(item for extra in project["tool"]["pip-tools"]["extra"] for item in extras[extra]),
        *project["build-system"]["requires"],
    ]
    pins = _locked()
    for line in declared:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{line} is declared but not locked; run `make lock`"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (
            f"{line} does not admit the locked {name}=={pins[name]}; run `make lock`"
        )


def test_this_environment_is_exactly_the_lock() -> None:
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    installed = {canonicalize_name(name): version for name, _, version in (line.partition("==") for line in frozen)}
    assert installed == {**_locked(), **_locked(NODEPS_LOCK)}
