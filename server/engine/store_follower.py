"""Keeping one replica in step with a shared adapter store (``--store postgresql://...``).

One thread per replica does two things (docs/store.md, "Change feed"):

- it follows the store's change feed into the registry: every committed delete, pin and broken mark, from
  any replica, reaches this replica's resident copies. The feed's rows are read by sequence number and the
  notifications only wake the thread, so a change is applied within one notification round trip, or within
  ``poll_seconds`` when a notification was missed (a reconnect); changes pruned before they were read make
  the registry resynchronise from the catalog;
- now and then it offers to run the store's garbage collection, which the store leases to one replica at a
  time.

New versions need nothing from here: leases resolve ids through the store, so an acknowledged upload is
servable on every replica as soon as it is committed.
"""

from __future__ import annotations

import logging
import threading
import time

from adapters_store.errors import StoreUnavailableError, UnknownCursorError
from adapters_store.interfaces import AdapterChangeFeed, StoreMaintenance
from server import metrics
from server.engine.adapters import AdapterRegistry

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
RETRY_SECONDS = 1.0
GARBAGE_INTERVAL_SECONDS = 300.0
# Another replica takes over garbage collection this long after its holder stopped renewing.
GARBAGE_LEASE_SECONDS = 3 * GARBAGE_INTERVAL_SECONDS
# What a follower may still need: changes younger than this are kept, and so is any blob this young.
GARBAGE_GRACE_SECONDS = 3600.0


class StoreFollower:
    def __init__(
        self,
        registry: AdapterRegistry,
        feed: AdapterChangeFeed,
        maintenance: StoreMaintenance,
        *,
        replica_id: str,
        poll_seconds: float = POLL_SECONDS,
    ):
        self._registry = registry
        self._feed = feed
        self._maintenance = maintenance
        self._replica_id = replica_id
        self._poll_seconds = poll_seconds
        # Taken before the caller loads pinned adapters, so nothing committed in between is missed.
        self._position = feed.last_seq()
        self._next_garbage_collection = time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-follower", daemon=True)

    @property
    def position(self) -> int:
        """The ``seq`` of the last change applied."""
        return self._position

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._feed.close()

    def _run(self) -> None:
        unavailable = False
        while not self._stopping.is_set():
            try:
                self._catch_up()
                self._collect_garbage_when_due()
                if unavailable:
                    logger.info("store change feed resumed position=%d", self._position)
                    unavailable = False
                self._feed.wait(self._poll_seconds)
            except StoreUnavailableError as error:
                if not unavailable:
                    logger.warning("store change feed unavailable, retrying: %s", error)
                    unavailable = True
                self._stopping.wait(RETRY_SECONDS)

    def _catch_up(self) -> None:
        while not self._stopping.is_set():
            try:
                changes = self._feed.changes_after(self._position)
            except UnknownCursorError as error:
                logger.warning("store changes missed (%s); resynchronising the registry", error)
                self._position = self._feed.last_seq()
                self._registry.resynchronise()
                metrics.ADAPTER_RESYNCS.inc()
                continue
            if not changes:
                return
            for change in changes:
                self._registry.follow(change)
                self._position = change.seq
                metrics.ADAPTER_CHANGES_FOLLOWED.labels(change.kind).inc()
                logger.debug(
                    "store change followed seq=%d kind=%s id=%s version=%d",
                    change.seq,
                    change.kind,
                    change.adapter_id,
                    change.version,
                )

    def _collect_garbage_when_due(self) -> None:
        if time.monotonic() < self._next_garbage_collection:
            return
        self._next_garbage_collection = time.monotonic() + GARBAGE_INTERVAL_SECONDS
        self._maintenance.collect_garbage(
            self._replica_id, lease_seconds=GARBAGE_LEASE_SECONDS, grace_seconds=GARBAGE_GRACE_SECONDS
        )
