"""What an operations flow did with each document, as a return value and as artifacts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import State

from vramflow.tasks.run_report import publish_picture_of_runs

OUTCOMES = ("processed", "skipped", "failed")


@dataclass(frozen=True)
class Outcome:
    """One document's fate: processed, skipped or failed, and why."""

    file: str
    outcome: str
    detail: str = ""
    flow_run_id: str | None = None


def failed_outcome(file: str, state: State, run_id: str | None = None) -> Outcome:
    """A document that failed: the state's name and the first line of its message."""
    first_line = next(iter((state.message or "").splitlines()), "")
    return Outcome(file, "failed", f"{state.name}: {first_line}"[:300], run_id)


def outcome_of_run(file: str, state: State) -> Outcome:
    """Read a `process-pdf` subflow's final state: done or partial counts as processed. A run
    with failed pages ends Failed but still carries its summary."""
    run_id = str(state.state_details.flow_run_id or "") or None
    try:
        summary = state.result(raise_on_failure=False)
    except Exception as exc:  # the result may not be readable in another process
        if not state.is_completed():
            return failed_outcome(file, state, run_id)
        return Outcome(file, "processed", f"result unreadable: {exc}"[:300], run_id)
    if not isinstance(summary, dict) or "status" not in summary:
        if not state.is_completed():
            return failed_outcome(file, state, run_id)
        return Outcome(file, "processed", "?: no summary", run_id)
    status = summary["status"]
    detail = f"{status}: {summary.get('pages_ok', 0)} ok, {summary.get('pages_failed', 0)} failed"
    return Outcome(file, "failed" if status == "failed" else "processed", detail, run_id)


def publish_outcomes(
    title: str, key: str, outcomes: list[Outcome], database_url: str
) -> dict[str, Any]:
    """A table artifact (one row per document), a markdown summary and one picture of the
    documents' model calls (`<key>-picture`); returns {"processed": [names], "skipped":
    [names], "failed": [names], "outcomes": [dicts]}."""
    names = {kind: [o.file for o in outcomes if o.outcome == kind] for kind in OUTCOMES}
    counts = ", ".join(f"{len(names[kind])} {kind}" for kind in OUTCOMES)
    if outcomes:
        create_table_artifact(
            table=[asdict(o) for o in outcomes], key=key, description=f"{title}: {counts}"
        )
    lines = [f"## {title}", "", counts, ""]
    lines += [f"- **{o.outcome}** `{o.file}` {o.detail}".rstrip() for o in outcomes]
    create_markdown_artifact(markdown="\n".join(lines), key=f"{key}-summary", description=counts)
    runs = [o.flow_run_id for o in outcomes if o.flow_run_id and o.outcome != "skipped"]
    publish_picture_of_runs(database_url, title, f"{key}-picture", runs)
    return {**names, "outcomes": [asdict(o) for o in outcomes]}
