"""The three deployments for `vramflow serve`: the names and schedules of prefect.yaml.

prefect.yaml deploys them to the `vramflow-gpu` work pool; serving them runs their flow runs in
the serving process instead, with no work pool or worker. A test keeps the two in step.
"""

from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from vramflow.flows.process_pdf import process_pdf
from vramflow.flows.retry_failed import retry_failed
from vramflow.flows.sweep_inbox import sweep_inbox

SWEEP_CRON = "*/10 * * * *"
RETRY_CRON = "0 3 * * *"
TIMEZONE = "UTC"
TAGS = ["vramflow"]
# Flows are found by module (`vramflow.flows.process_pdf.process_pdf`), wherever the server
# is started.
MODULE = EntrypointType.MODULE_PATH


def one_at_a_time() -> ConcurrencyLimitConfig:
    """A second run of the same deployment while one is active is cancelled, not queued."""
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def deployments(retry_schedule_active: bool = False) -> list[RunnerDeployment]:
    """process-pdf on demand, sweep-inbox every 10 minutes, retry-failed nightly (the nightly
    schedule is created paused unless `retry_schedule_active`)."""
    return [
        process_pdf.to_deployment(name="process-pdf", tags=TAGS, entrypoint_type=MODULE),
        sweep_inbox.to_deployment(
            name="sweep-inbox",
            schedules=[Cron(SWEEP_CRON, timezone=TIMEZONE, slug="every-10-minutes")],
            concurrency_limit=one_at_a_time(),
            tags=TAGS,
            entrypoint_type=MODULE,
        ),
        retry_failed.to_deployment(
            name="retry-failed",
            schedules=[
                Cron(RETRY_CRON, timezone=TIMEZONE, slug="nightly", active=retry_schedule_active)
            ],
            concurrency_limit=one_at_a_time(),
            tags=TAGS,
            entrypoint_type=MODULE,
        ),
    ]
