"""API keys: who is calling (authentication), and what they may do (scopes) in which namespace.

Keys come from a TOML keys file (``--api-keys-file``; only their sha256 is stored) and/or one
admin key from ``--api-key`` / ``SPECTRA_API_KEY``. With neither, the server is open: every caller
is the anonymous principal with every scope and no namespace (see ``docs/security.md``).

A presented key is hashed and compared against every configured hash with
:func:`hmac.compare_digest`, so the time taken does not depend on which key (if any) matched.
Key material is never logged: log lines name the key's ``name`` only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.settings import ServerSettings

logger = logging.getLogger(__name__)

Scope = Literal["inference", "adapters:write", "finetune", "admin"]
ALL_SCOPES: frozenset[str] = frozenset(get_args(Scope))
ADMIN: Scope = "admin"
NAMESPACE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
KEY_PREFIX = "sk-spectra-"
# A keys file edited while the server runs is picked up within this many seconds.
RELOAD_CHECK_SECONDS = 1.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyEntry(BaseModel):
    """One ``[[keys]]`` table of the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="Shown in logs and errors instead of the key.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the key (`spectra keys create`)")
    namespace: str = Field(pattern=f"^{NAMESPACE_PATTERN}$")
    scopes: list[Scope] = Field(min_length=1)
    max_concurrent_requests: int | None = Field(None, ge=1, description="None: --max-concurrent-requests-per-key")

    @field_validator("scopes")
    @classmethod
    def _unique(cls, scopes: list[Scope]) -> list[Scope]:
        return sorted(set(scopes))  # type: ignore[return-value]


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


class KeysFileError(ValueError):
    """The keys file is unreadable or invalid; the message names the file and the problem."""


def read_keys_file(path: Path) -> list[KeyEntry]:
    try:
        document = tomllib.loads(path.read_text())
        entries = KeysFile.model_validate(document).keys
    except OSError as error:
        raise KeysFileError(f"cannot read keys file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise KeysFileError(f"keys file {path} is not valid TOML: {error}") from error
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()
        )
        raise KeysFileError(f"keys file {path} is invalid: {problems}") from error
    for kind, values in (("name", [entry.name for entry in entries]), ("sha256", [entry.sha256 for entry in entries])):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise KeysFileError(f"keys file {path} repeats the {kind} {', '.join(repeated)}")
    return entries


@dataclass(frozen=True)
class Principal:
    """The caller of one request. ``namespace`` None is the open server's anonymous caller."""

    name: str
    namespace: str | None
    scopes: frozenset[str]
    max_concurrent_requests: int | None = None

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes or ADMIN in self.scopes

    @property
    def sees_all_namespaces(self) -> bool:
        return self.namespace is None or ADMIN in self.scopes

    @property
    def visible_namespace(self) -> str | None:
        """The namespace lists are filtered to; None means no filter."""
        return None if self.sees_all_namespaces else self.namespace

    def can_see(self, owner: str | None, public: bool) -> bool:
        """Objects without an owner are the server's own (open-mode or admin uploads, --adapter) and visible to all."""
        return self.sees_all_namespaces or owner is None or owner == self.namespace or public

    def owns(self, owner: str | None) -> bool:
        return self.sees_all_namespaces or owner == self.namespace


ANONYMOUS = Principal(name="anonymous", namespace=None, scopes=ALL_SCOPES)
# The caller of an open path (/health, /metrics when configured open) on a server with keys: no rights.
UNAUTHENTICATED = Principal(name="unauthenticated", namespace="", scopes=frozenset())


@dataclass
class KeyRing:
    """The configured keys; re-reads the keys file when it changes (a bad edit keeps the previous keys)."""

    keys_file: Path | None = None
    env_key: str | None = None
    default_max_concurrent: int | None = None
    _entries: list[tuple[str, Principal]] = field(default_factory=list)
    _file_stamp: tuple[int, int] | None = None
    _checked_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._entries = self._load(read_keys_file(self.keys_file) if self.keys_file else [])
        self._file_stamp = self._stamp()

    @property
    def enabled(self) -> bool:
        return bool(self.keys_file or self.env_key)

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self, entries: list[KeyEntry]) -> list[tuple[str, Principal]]:
        loaded = [
            (
                entry.sha256,
                Principal(
                    name=entry.name,
                    namespace=entry.namespace,
                    scopes=frozenset(entry.scopes),
                    max_concurrent_requests=entry.max_concurrent_requests or self.default_max_concurrent,
                ),
            )
            for entry in entries
        ]
        if self.env_key:
            admin = Principal("SPECTRA_API_KEY", "default", frozenset(ALL_SCOPES), self.default_max_concurrent)
            loaded.append((hash_key(self.env_key), admin))
        return loaded

    def _stamp(self) -> tuple[int, int] | None:
        if self.keys_file is None:
            return None
        try:
            stat = self.keys_file.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.keys_file is None or now - self._checked_at < RELOAD_CHECK_SECONDS:
            return
        with self._lock:
            self._checked_at = now
            stamp = self._stamp()
            if stamp == self._file_stamp:
                return
            self._file_stamp = stamp
            try:
                self._entries = self._load(read_keys_file(self.keys_file))
            except KeysFileError as error:
                logger.error("%s; keeping the %d keys loaded before", error, len(self._entries))
                return
        logger.info("keys file reloaded path=%s keys=%d", self.keys_file, len(self._entries))

    def authenticate(self, presented: str) -> Principal | None:
        self._reload_if_changed()
        digest = hash_key(presented).encode()
        found = None
        for stored, principal in self._entries:
            # Every entry is compared, match or not, so the time does not say which one matched.
            if hmac.compare_digest(digest, stored.encode()):
                found = principal
        return found


_BEARER = re.compile(r"Bearer\s+(\S+)\s*", re.IGNORECASE)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    match = _BEARER.fullmatch(authorization)
    return match.group(1) if match else None


def key_ring(settings: ServerSettings) -> KeyRing:
    """The keys the settings configure (raises :class:`KeysFileError` for a bad keys file)."""
    return KeyRing(
        keys_file=settings.api_keys_file,
        env_key=settings.api_key.get_secret_value() if settings.api_key else None,
        default_max_concurrent=settings.max_concurrent_requests_per_key,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def check_exposure(settings: ServerSettings, keys: KeyRing) -> None:
    """Log who can reach the server; refuse (ExposureError) to serve a network address with no keys."""
    where = f"{settings.host}:{settings.port}"
    if keys.enabled:
        logger.info(
            "API keys required keys=%d health=%s metrics=%s", len(keys), settings.health_auth, settings.metrics_auth
        )
    elif is_loopback(settings.host):
        logger.warning("no API keys configured: anyone who can connect to %s has every right (docs/security.md)", where)
    elif settings.allow_unauthenticated:
        logger.warning("no API keys configured and --allow-unauthenticated: %s is open to its whole network", where)
    else:
        raise ExposureError(
            f"refusing to serve {where} without API keys: configure --api-keys-file or SPECTRA_API_KEY, "
            "bind 127.0.0.1, or pass --allow-unauthenticated to serve it open on purpose"
        )


class ExposureError(RuntimeError):
    """The settings would serve a network address to anyone; the message says how to fix them."""
