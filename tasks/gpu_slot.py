"""The GPU slot: a Prefect global concurrency limit that is never skipped and never leaks.

`gpu_slot` makes sure the limit exists, is active, has the right size and does not decay before
every acquisition, and again each time it finds the slot taken (Prefect silently runs unlimited
when the limit is missing or inactive); a request the busy server answered with 503 is simply
made again. It frees the slots of holders on this host that died without releasing (recorded by
`vramflow.slot_records`), takes one slot with a lease that is renewed while it is held
(`vramflow.tasks.lease_keeper`), and gives it back to the server when the block ends.

In a process, the engine of a device (`vramflow.engine`) holds the slot while pages wait. Other
threads may ask for the same slot too (several engines, tests): a semaphore of `size` per slot
name sits in front of the server, a lock lets only one thread at a time poll the server, and a
release in this process wakes the poller at once instead of after the server's Retry-After.

Fairness: Prefect's limits keep no queue, and a freed slot would nearly always go back to the
process that freed it. Processes of this host waiting for a slot stand in line (marker files,
`vramflow.slot_records.waiting_line`); only the one that has waited longest asks the server,
and a holder sees that another process waits (`slot_records.others_waiting`) to yield to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import (
    ConcurrencyLimitWithLeaseResponse,
    GlobalConcurrencyLimitResponse,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import get_current_settings

from vramflow import slot_records
from vramflow.errors import ConfigError, SlotError
from vramflow.tasks.lease_keeper import LeaseKeeper
from vramflow.tasks.prefect_private import send_once

logger = logging.getLogger(__name__)

# Pause between two polls of a taken slot by the process first in line. The server asks for up
# to 30 s (its Retry-After), which would leave the GPU idle long after the holder has left.
_FIRST_IN_LINE_POLL_SECONDS = 0.25
# Pause between two looks at the line by a process behind another (no server request).
_IN_LINE_POLL_SECONDS = 0.1
_ENSURE_ATTEMPTS = 4
# Pauses before asking again when the server answered 503 (its SQLite database was busy,
# usually writing the burst of task runs a document starts with, which lasted up to 0.9 s):
# the first, and the cap as it doubles, so that the slot is taken soon after the burst.
_BUSY_RETRY_SECONDS = 0.01
_BUSY_RETRY_MAX_SECONDS = 0.05


@dataclass
class SlotHold:
    """A held slot, as `gpu_slot` yields it; `released_at` is set when the block ends."""

    name: str
    lease_id: UUID
    wait_seconds: float
    acquired_at: datetime
    released_at: datetime | None = None


@dataclass
class _Gate:
    """This process's threads in front of one slot."""

    size: int
    holders: threading.Semaphore = field(init=False)
    poll: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.holders = threading.Semaphore(self.size)


_gates: dict[tuple[str, int], _Gate] = {}
_gates_lock = threading.Lock()


def ensure_slot_limit(name: str, size: int) -> None:
    """Create or fix the global concurrency limit `name`: active, `size` slots, no decay."""
    with _api_errors(), get_client(sync_client=True) as client:
        _ensure(client, name, size)


@contextmanager
def gpu_slot(
    name: str,
    *,
    size: int = 1,
    occupy: int = 1,
    lease_seconds: float = 60,
    wait_seconds: float | None = None,
    records_dir: Path,
) -> Iterator[SlotHold]:
    """Hold `occupy` slots of the limit `name` (created with `size` slots if missing) for the
    block (with admission by memory, a slot is a MiB of the device).

    Raises `SlotError` if the Prefect API cannot be reached, the limit cannot be enforced, no
    slot frees up within `wait_seconds` (None: wait for as long as it takes), or `occupy` is
    more than the limit has.
    """
    if size < 1 or not 60 <= lease_seconds <= 86400:
        raise ConfigError(f"slot size must be >= 1 and lease 60-86400 s: {size}, {lease_seconds}")
    if not 1 <= occupy <= size:
        raise SlotError(
            f"a holder of {name!r} needs {occupy} of its {size} slots: it can never fit"
            " (a smaller batch or token budget, or a larger device)"
        )
    asked = time.monotonic()
    deadline = None if wait_seconds is None else asked + wait_seconds
    records = Path(records_dir)
    gate = _gate(name, size)
    _wait_for(gate.holders, name, deadline)
    try:
        with _held(gate.poll, name, deadline):
            lease_id = _acquire(name, (size, occupy), lease_seconds, deadline, records, gate)
        keeper = LeaseKeeper(lease_id, lease_seconds)
        held_since = time.monotonic()
        hold: SlotHold | None = None
        try:
            keeper.start()
            hold = SlotHold(name, lease_id, held_since - asked, datetime.now(timezone.utc))
            logger.info("holding slot %s after waiting %.2f s", name, hold.wait_seconds)
            with keeper.holding():
                yield hold
        finally:
            if hold is not None:
                hold.released_at = datetime.now(timezone.utc)
            _release(name, lease_id, keeper, records)
            gate.released.set()
            logger.info("left slot %s after holding %.2f s", name, time.monotonic() - held_since)
    finally:
        gate.holders.release()


def _acquire(
    name: str,
    shape: tuple[int, int],  # (limit size, slots this holder occupies)
    lease_seconds: float,
    deadline: float | None,
    records_dir: Path,
    gate: _Gate,
) -> UUID:
    limit: GlobalConcurrencyLimitResponse | None = None
    busy_pause = _BUSY_RETRY_SECONDS
    size, occupy = shape
    with slot_records.waiting_line(records_dir, name) as line:
        while True:
            gate.released.clear()
            if line.ahead():
                pause = _IN_LINE_POLL_SECONDS  # a process that waited longer asks first
                logger.debug("slot %s: another process of this host is ahead in line", name)
            else:
                with _api_errors(), get_client(sync_client=True) as client:
                    if limit is None:
                        limit = _ensure(client, name, size)
                    _recover_dead_holders(client, limit, records_dir)
                    answer = _try_increment(client, name, lease_seconds, occupy)
                if answer.granted is not None:
                    _record(records_dir, name, *answer.granted)
                    return answer.granted[0]
                if answer.busy:
                    # Asked again soon, and without checking the limit again: it was checked
                    # a moment ago, and each check is one more request to a busy server.
                    pause, busy_pause = busy_pause, min(2 * busy_pause, _BUSY_RETRY_MAX_SECONDS)
                else:
                    limit, busy_pause = None, _BUSY_RETRY_SECONDS  # checked again next time
                    pause = min(answer.retry_after, _FIRST_IN_LINE_POLL_SECONDS)
            remaining = _remaining(deadline)
            if remaining is not None:
                if remaining <= 0:
                    raise SlotError(f"gave up waiting for GPU slot {name!r}: it stayed taken")
                pause = min(pause, remaining)
            gate.released.wait(pause)
            line.refresh()


class _Answer(NamedTuple):
    """The server's answer to one acquisition attempt."""

    granted: tuple[UUID, UUID] | None = None  # (lease id, limit id)
    retry_after: float = 0.0  # taken: the server's Retry-After
    busy: bool = False  # 503: the server's database was busy; ask again


def _try_increment(
    client: SyncPrefectClient, name: str, lease_seconds: float, occupy: int = 1
) -> _Answer:
    """One acquisition attempt: granted, taken (423) or busy (503).

    One request, never cancelled half-way (a cancelled grant would leak its slot), so that the
    caller keeps the deadline and looks for dead holders between attempts.
    """
    body: dict = {
        "names": [name],
        "slots": occupy,
        "mode": "concurrency",
        "lease_duration": lease_seconds,
    }
    holder = _current_holder()
    if holder is not None:
        body["holder"] = holder.model_dump(mode="json")
    # Not retried by Prefect's client (a 2 s back-off): a 503 here is "ask again", like a 423.
    response = send_once(client, "POST", "/v2/concurrency_limits/increment-with-lease", body)
    if response.status_code == 423:
        logger.debug("slot %s is taken", name)
        return _Answer(retry_after=float(response.headers.get("Retry-After", 1.0)))
    if response.status_code == 503:
        logger.debug("slot %s: the server is busy (503)", name)
        return _Answer(busy=True)
    response.raise_for_status()
    granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
    if not granted.limits:
        raise SlotError(f"the Prefect server holds no limit {name!r}; refusing to run unlimited")
    return _Answer(granted=(granted.lease_id, granted.limits[0].id))


def _record(records_dir: Path, name: str, lease_id: UUID, limit_id: UUID) -> None:
    try:
        slot_records.write_record(
            records_dir, slot_records.current_holder(name, lease_id, limit_id)
        )
    except BaseException:
        _give_back(lease_id)
        raise


def _give_back(lease_id: UUID) -> None:
    """Release the lease on the server, through the thread's client where it has one.

    Prefect's `release_concurrency_slots_with_lease` runs through its event loop thread with
    a client of its own: another thread hop and a CSRF-token request, 40-60 ms at the end of a
    document instead of one request.
    """
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease_id)


def _release(name: str, lease_id: UUID, keeper: LeaseKeeper, records_dir: Path) -> None:
    """Stop renewing the lease, then give the slot back to the server."""
    keeper.stop()
    # The record goes first: a record that exists always means an unreleased slot, so a holder
    # dying between the two steps can leak its slot but never have it freed twice.
    if not slot_records.remove_record(records_dir, name, lease_id):
        logger.error("slot %s was already freed as a dead holder's; not releasing it", name)
        return
    try:
        with _api_errors():
            _give_back(lease_id)
    except SlotError as exc:
        logger.error("could not release slot %s (its lease will expire): %s", name, exc)


def _ensure(client: SyncPrefectClient, name: str, size: int) -> GlobalConcurrencyLimitResponse:
    for _ in range(_ENSURE_ATTEMPTS):
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            _create(client, name, size)
            continue
        if limit.active and limit.limit == size and limit.slot_decay_per_second == 0:
            return limit
        logger.warning(
            "fixing concurrency limit %s: active=%s, limit=%s, decay=%s; want active, %s, 0",
            name,
            limit.active,
            limit.limit,
            limit.slot_decay_per_second,
            size,
        )
        fix = GlobalConcurrencyLimitUpdate(limit=size, active=True, slot_decay_per_second=0.0)
        try:
            client.update_global_concurrency_limit(name, fix)
        except ObjectNotFound:
            continue
    raise SlotError(f"could not set up concurrency limit {name!r}: it kept changing under us")


def _create(client: SyncPrefectClient, name: str, size: int) -> None:
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=size))
        logger.info("created concurrency limit %s with %d slot(s)", name, size)
    except ObjectAlreadyExists:
        pass


def _recover_dead_holders(
    client: SyncPrefectClient, limit: GlobalConcurrencyLimitResponse, records_dir: Path
) -> None:
    for record in slot_records.claim_dead_records(records_dir, limit.name):
        held = (datetime.now(timezone.utc) - record.acquired_at).total_seconds()
        if get_current_settings().api.url:
            # A real server knows every lease: releasing an expired one is a no-op.
            client.release_concurrency_slots_with_lease(record.lease_id)
        elif record.limit_id == limit.id:
            # Each temporary server keeps its leases in its own memory and never expires them:
            # the dead holder's lease is unknown here, so free its one slot by name.
            client.release_concurrency_slots([limit.name], 1, max(held, 0.001))
        else:
            logger.info("dead holder of %s held a since-deleted limit; nothing to free", limit.name)
            continue
        logger.warning(
            "freed slot %s of dead holder pid %d (held %.0f s)", limit.name, record.pid, held
        )


@contextmanager
def _api_errors() -> Iterator[None]:
    """Turn the Prefect client's connection and HTTP errors into one-line `SlotError`s."""
    try:
        yield
    except SlotError:
        raise
    except Exception as exc:
        message = _describe(exc)
        if message is None:
            raise
        raise SlotError(message) from exc


def _describe(exc: BaseException) -> str | None:
    url = get_current_settings().api.url or "the temporary local server"
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    for error in chain:
        if isinstance(error, httpx.TransportError):
            kind = type(error).__name__
            return f"cannot reach the Prefect API at {url}: is the server running? ({kind})"
    for error in chain:
        if isinstance(error, httpx.HTTPStatusError):
            status = error.response.status_code
            return f"the Prefect API at {url} answered {status}: {error.response.text[:200]}"
    if isinstance(exc, ValueError) and "PREFECT_API_URL" in str(exc):
        return str(exc)
    if isinstance(exc, RuntimeError) and "ephemeral Prefect API server" in str(exc):
        return f"the temporary local Prefect server did not start: {str(exc).splitlines()[0]}"
    return None


def _current_holder() -> ConcurrencyLeaseHolder | None:
    task = TaskRunContext.get()
    if task is not None and task.task_run is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task.task_run.id)
    flow = FlowRunContext.get()
    if flow is not None and flow.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow.flow_run.id)
    return None


def _gate(name: str, size: int) -> _Gate:
    with _gates_lock:
        return _gates.setdefault((name, size), _Gate(size))


def _wait_for(semaphore: threading.Semaphore, name: str, deadline: float | None) -> None:
    remaining = _remaining(deadline)
    if not semaphore.acquire(timeout=None if remaining is None else max(remaining, 0)):
        raise SlotError(f"gave up waiting for GPU slot {name!r}: this process holds it")


@contextmanager
def _held(lock: threading.Lock, name: str, deadline: float | None) -> Iterator[None]:
    remaining = _remaining(deadline)
    if not lock.acquire(timeout=-1 if remaining is None else max(remaining, 0)):
        raise SlotError(f"gave up waiting for GPU slot {name!r}: this process waits for it")
    try:
        yield
    finally:
        lock.release()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()
