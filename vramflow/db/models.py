"""Tables: documents, pages, results (one per page and idempotence key), attempts, slot holds,
GPU workers."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware datetime stored as UTC; SQLite keeps no zone, so it is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: vramflow stores only timezone-aware UTC times")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Document(Base):
    """A PDF, identified by the hash of its bytes (a renamed copy is the same document)."""

    __tablename__ = "documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    file_name: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    page_count: Mapped[int | None] = mapped_column(Integer)
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error_type: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Page(Base):
    """Extracted text of one page; status ok, no_text or failed (with the error)."""

    __tablename__ = "pages"
    __table_args__ = (UniqueConstraint("document_id", "page_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    page_number: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text, default="")
    chars: Mapped[int] = mapped_column(Integer, default=0)
    extract_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(16))
    error_type: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    extracted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Result(Base):
    """The model's answer for one page under one idempotence key."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint(
            "document_id",
            "page_number",
            "model_id",
            "prompt_hash",
            "settings_hash",
            name="uq_results_key",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    page_number: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(512))
    prompt_hash: Mapped[str] = mapped_column(String(64))
    settings_hash: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(Text)
    settings_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    output: Mapped[str | None] = mapped_column(Text)
    tokens_in: Mapped[int | None] = mapped_column(Integer)
    tokens_out: Mapped[int | None] = mapped_column(Integer)
    input_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    device: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_type: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    infer_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    infer_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    infer_seconds: Mapped[float | None] = mapped_column(Float)
    slot_wait_seconds: Mapped[float | None] = mapped_column(Float)
    peak_vram_bytes: Mapped[int | None] = mapped_column(BigInteger)
    flow_run_id: Mapped[str | None] = mapped_column(String(36), index=True)
    # The GPU worker running this result, while it is `running` (see GpuWorker).
    worker_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class SlotHold(Base):
    """One hold of a GPU slot: who held it, how long it waited, how long moving weights took."""

    __tablename__ = "slot_holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hold_id: Mapped[str] = mapped_column(String(36), unique=True)
    slot_name: Mapped[str] = mapped_column(String(256))
    device: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    flow_run_id: Mapped[str | None] = mapped_column(String(36), index=True)
    pages: Mapped[int] = mapped_column(Integer)
    wait_seconds: Mapped[float] = mapped_column(Float)
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    move_in_seconds: Mapped[float | None] = mapped_column(Float)
    move_out_seconds: Mapped[float | None] = mapped_column(Float)


class Attempt(Base):
    """One model call's outcome for one page, with the VRAM figures measured around it."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    hold_id: Mapped[str | None] = mapped_column(String(36), index=True)
    call_id: Mapped[str] = mapped_column(String(36))
    flow_run_id: Mapped[str | None] = mapped_column(String(36), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    error_message: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str] = mapped_column(String(32))
    batch_size: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
    infer_seconds: Mapped[float] = mapped_column(Float)
    tokens_in: Mapped[int | None] = mapped_column(Integer)
    tokens_out: Mapped[int | None] = mapped_column(Integer)
    torch_max_allocated_bytes: Mapped[int | None] = mapped_column(BigInteger)
    torch_max_reserved_bytes: Mapped[int | None] = mapped_column(BigInteger)
    nvml_used_before_bytes: Mapped[int | None] = mapped_column(BigInteger)
    nvml_free_before_bytes: Mapped[int | None] = mapped_column(BigInteger)
    nvml_used_after_bytes: Mapped[int | None] = mapped_column(BigInteger)
    nvml_free_after_bytes: Mapped[int | None] = mapped_column(BigInteger)
    nvml_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger)


class GpuWorker(Base):
    """A process running inference for one device: `vramflow gpu-worker`, or a flow process
    running its own engine. Its heartbeat tells waiting flow runs whether it is still alive."""

    __tablename__ = "gpu_workers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))  # gpu-worker | in-process
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    models_loaded: Mapped[int] = mapped_column(Integer, default=0)
    pages_waiting: Mapped[int] = mapped_column(Integer, default=0)
