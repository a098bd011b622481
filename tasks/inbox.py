"""Prefect task: list an inbox folder's PDFs and tell new documents from known ones by hash."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from vramflow import pdf
from vramflow.config import Settings
from vramflow.db import maintenance
from vramflow.db.schema import ensure_schema
from vramflow.db.session import session_scope
from vramflow.errors import ConfigError
from vramflow.runs import key_parts


@dataclass(frozen=True)
class InboxFile:
    """A PDF in the inbox: `new` to process, or `known`, `duplicate` or `unreadable` (opening
    these bytes failed before, or reading the file fails) to skip."""

    path: str
    name: str
    status: str
    detail: str = ""


@task(name="scan-inbox", cache_policy=NO_CACHE)
def scan_inbox(folder: str, settings: Settings) -> list[InboxFile]:
    """Hash every *.pdf in `folder`; a file whose bytes a run under the same model, prompt and
    generation settings already finished is known, whatever its name."""
    inbox = Path(folder).expanduser()
    if not inbox.is_dir():
        raise ConfigError(f"inbox {inbox} is not a folder (VRAMFLOW_INBOX or the inbox parameter)")
    ensure_schema(settings.resolved_database_url)
    key, seen, found = key_parts(settings), {}, []
    files = sorted(p for p in inbox.iterdir() if p.is_file() and p.suffix.lower() == ".pdf")
    with session_scope(settings.resolved_database_url) as session:
        for file in files:
            try:
                size = file.stat().st_size
                if size > settings.max_file_bytes:  # not worth reading, let alone hashing
                    detail = f"{size:,} bytes, more than the limit of {settings.max_file_bytes:,}"
                    found.append(InboxFile(str(file), file.name, "unreadable", detail))
                    continue
                sha256 = pdf.file_sha256(file)
            except OSError as exc:
                found.append(InboxFile(str(file), file.name, "unreadable", str(exc)))
                continue
            found.append(_classify(session, file, sha256, key, seen.get(sha256)))
            seen.setdefault(sha256, file.name)
    new = sum(f.status == "new" for f in found)
    get_run_logger().info("%s: %d PDFs, %d new", inbox, len(found), new)
    return found


def _classify(session, file: Path, sha256: str, key: tuple[str, str, str], twin: str | None):
    known = maintenance.processed_document(session, sha256, *key)
    if known is not None:
        detail = f"{known.status} as {known.file_name} (sha256 {sha256[:12]})"
        return InboxFile(str(file), file.name, "known", detail)
    bad = maintenance.unreadable_document(session, sha256)
    if bad is not None:
        detail = f"failed before: {bad.error_type}: {bad.error_message}"[:300]
        return InboxFile(str(file), file.name, "unreadable", detail)
    if twin is not None:
        return InboxFile(str(file), file.name, "duplicate", f"same bytes as {twin}")
    return InboxFile(str(file), file.name, "new")
