"""Keep a GPU slot's lease alive for as long as it is held.

Prefect's `maintain_concurrency_lease` renews a lease for the length of one block: it starts a
thread and an HTTP client, and renews at once on entry (a grant has just set the expiry).

A `LeaseKeeper` starts when the server grants the lease and stops when the lease goes back. It
renews on a timer, never at once, and if a renewal fails, the slot is no longer reserved: the
holder is cancelled like Prefect cancels it (`vramflow.tasks.prefect_private.cancel_scope`),
and a holder entering after the failure is refused the lease.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client

from vramflow.errors import SlotError
from vramflow.tasks.prefect_private import CancelScope, cancel_scope

logger = logging.getLogger(__name__)

# Renew when this fraction of the lease has passed (Prefect's own choice).
RENEWAL_FRACTION = 0.75
# A renewal that fails for a passing reason (no connection, the server busy) is tried again.
_RENEWAL_ATTEMPTS = 3
_RENEWAL_RETRY_SECONDS = 1.0


class LeaseLost(SlotError):
    """The lease could not be renewed; the server may give its slot to someone else."""


class LeaseKeeper:
    """Renews `lease_id` every `every_seconds` (default: 0.75 of `lease_seconds`) from `start`
    until `stop`."""

    def __init__(
        self, lease_id: UUID, lease_seconds: float, every_seconds: float | None = None
    ) -> None:
        self.lease_id = lease_id
        self._lease_seconds = lease_seconds
        self._every = lease_seconds * RENEWAL_FRACTION if every_seconds is None else every_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the two below
        self._holder: CancelScope | None = None
        self.failure: BaseException | None = None
        self.renewals = 0
        # The renewals reach the API the acquiring thread reached, through its settings context.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"slot-lease-{lease_id}", daemon=True
        )

    def start(self) -> None:
        try:
            self._thread.start()
        except BaseException as exc:  # not renewed: never to be held as if it were
            self.failure = exc
            raise

    @property
    def lost(self) -> bool:
        return self.failure is not None

    def stop(self) -> None:
        """Renew no more (the lease goes back to the server). Does not wait for the thread: a
        renewal still in flight either lands before the release or finds the lease gone."""
        self._stop.set()

    @contextmanager
    def holding(self) -> Iterator[None]:
        """The block of one holder: a renewal failure during it cancels it (Prefect's cancel
        scope throws into this thread); entering it after a failure raises `LeaseLost`."""
        with cancel_scope(f"slot lease {self.lease_id}") as scope:
            with self._lock:
                if self.failure is not None:
                    raise LeaseLost(f"lease {self.lease_id} was lost: {self.failure}")
                self._holder = scope
            try:
                yield
            finally:
                with self._lock:
                    self._holder = None

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._every):
                self._renew()
        except Exception as exc:
            if self._stop.is_set():
                return  # released meanwhile: nothing is lost
            with self._lock:
                self.failure, holder = exc, self._holder
            logger.error(
                "could not renew the lease %s of a GPU slot (%s): the slot is no longer "
                "reserved, so its holder is stopped",
                self.lease_id,
                exc,
            )
            if holder is not None:
                holder.cancel()

    def _renew(self) -> None:
        for attempt in range(1, _RENEWAL_ATTEMPTS + 1):
            try:
                with get_client(sync_client=True) as client:
                    client.renew_concurrency_lease(self.lease_id, self._lease_seconds)
                self.renewals += 1
                return
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code < 500 or attempt == _RENEWAL_ATTEMPTS:
                    raise  # 410: revoked or expired, asking again will not bring it back
            except httpx.TransportError:
                if attempt == _RENEWAL_ATTEMPTS:
                    raise
            logger.warning("renewing the lease %s failed; trying again", self.lease_id)
            if self._stop.wait(_RENEWAL_RETRY_SECONDS):
                return
