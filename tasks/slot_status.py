"""The GPU slots as the Prefect API shows them, for `vramflow status`.

A slot is a global concurrency limit named by `VRAMFLOW_SLOT_NAME_TEMPLATE`; this reads every
limit the template can produce (any host, any device). Prefect 3.9's API reports a limit's size
and active slots but not who holds the leases: holders come from vramflow's own `slot_holds`
table, waiters from the marker files of this host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prefect.client.orchestration import get_client

PAGE_SIZE = 200


@dataclass(frozen=True)
class SlotLimit:
    name: str
    limit: int
    active_slots: int
    active: bool


def name_pattern(template: str) -> re.Pattern[str]:
    """A regex matching the names `vramflow.gpu.slot_name` makes from `template`."""
    parts = re.split(r"\{(?:host|device)\}", template)
    literal = [re.escape(re.sub(r"[^a-zA-Z0-9_-]+", "-", p).lower()) for p in parts]
    return re.compile("[a-z0-9_-]+".join(literal))


def device_slots(template: str) -> list[SlotLimit]:
    """The limits whose names `template` can produce, by name."""
    pattern = name_pattern(template)
    found, offset = [], 0
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_global_concurrency_limits(limit=PAGE_SIZE, offset=offset)
            found += [gcl for gcl in page if pattern.fullmatch(gcl.name)]
            if len(page) < PAGE_SIZE:
                break
            offset += PAGE_SIZE
    return sorted(
        (SlotLimit(g.name, g.limit, g.active_slots, g.active) for g in found),
        key=lambda s: s.name,
    )
