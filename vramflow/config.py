"""All of vramflow's settings in one object, read from `VRAMFLOW_*` environment variables.

Build it once at an entry point (CLI, flow) with `Settings()` and pass it down; nothing here
reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vramflow.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PROMPT = "Summarise this page in two sentences."

# Server settings vramflow relies on. The CLI sets them for Prefect's temporary local server,
# which inherits its environment; a real server needs them where it runs (see the README).
PREFECT_SERVER_DEFAULTS = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
        "prefect.server.concurrency.lease_storage.filesystem"
    ),
    "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
    # Task-run states written in batches, not one transaction per state: on SQLite each write
    # that lands between a slot request's read and its write makes the server answer 503, and
    # a document's first slot request met 1-4 of them (0.1-0.3 s) while the server wrote the
    # states of the task runs the document had just started. The UI shows states up to 1 s late.
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server can take longer than Prefect's 20 s default to start on a busy host.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


class Settings(BaseSettings):
    """vramflow's configuration; every field can be set as `VRAMFLOW_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="VRAMFLOW_", extra="ignore")

    home: Path = Field(
        default=Path("~/.vramflow"),
        description="Folder for the default SQLite database, converted models and slot records.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the results database; default: SQLite file in `home`.",
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        description="The packaged default, a Hugging Face id, a local folder or a .gguf file.",
    )
    prompt: str = Field(default=DEFAULT_PROMPT, description="Instruction applied to every page.")
    device: str = Field(
        default="auto", description="`auto` (CUDA if available, else CPU), `cpu` or `cuda:N`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Weights' dtype. `auto`: float32 on the CPU; bfloat16 on CUDA (float16 on cards"
            " without bfloat16), half the memory of float32 and faster."
        ),
    )
    max_new_tokens: int = Field(default=64, ge=1, le=8192, description="Tokens generated per page.")
    batch_size: int = Field(default=4, ge=1, le=256, description="Pages per call and hold.")
    max_batch_tokens: int | None = Field(
        default=None,
        ge=64,
        le=10_000_000,
        description=(
            "Size model calls by tokens instead of pages: each call takes the oldest waiting page"
            " and the waiting pages nearest it in length while every page padded to the longest,"
            " plus the new tokens, fits this many tokens (None: `batch_size` pages a call)."
        ),
    )
    continuous_batching: bool = Field(
        default=False,
        description=(
            "Answer each model call through transformers' continuous batching (a paged KV cache"
            " sized from the call's pages within the holder's grant; requests join and leave"
            " the batch token by token, without padding) where transformers runs the model so;"
            " else, and for a call that fails that way, static batches. Meant for CUDA: on a"
            " 2-core CPU it was slower than static batches."
        ),
    )
    max_input_tokens: int = Field(
        default=1536, ge=16, le=131072, description="Page tokens kept; longer pages are truncated."
    )
    skip_no_text: bool = Field(
        default=True, description="Skip inference for pages without a text layer."
    )
    slot_name_template: str = Field(
        default="vramflow-gpu-{host}-{device}",
        description="Name of the Prefect global concurrency limit per device.",
    )
    slot_size: int = Field(default=1, ge=1, le=64, description="Concurrent holders per device.")
    admission: Literal["holders", "memory"] = Field(
        default="holders",
        description=(
            "What a device's GPU slot counts: `holders` (VRAMFLOW_SLOT_SIZE of them at once) or"
            " `memory` (MiB of the device, less VRAMFLOW_MEMORY_MARGIN_MIB; each holder asks"
            " for what its model and calls need, and holders that fit run side by side)."
        ),
    )
    device_memory_mib: int | None = Field(
        default=None,
        ge=1,
        description=(
            "The device's size for memory admission (None: NVML's total on CUDA, the host's"
            " memory on a CPU)."
        ),
    )
    memory_margin_mib: int = Field(
        default=1024,
        ge=0,
        description="MiB of the device memory admission keeps out of every grant.",
    )
    slot_lease_seconds: float = Field(
        default=60, ge=60, le=86400, description="Lease of a held slot; a dead holder's expires."
    )
    slot_handoff_seconds: float = Field(
        default=30,
        ge=0,
        description=(
            "Keep the slot (and the weights on the device) while this process's pages wait for"
            " at least this long before giving it back to another process of this host that"
            " waits for it; 0: yield after every model call when another process waits."
        ),
    )
    slot_wait_seconds: float | None = Field(
        default=None, ge=1, description="Give up waiting for the slot after this long (None: wait)."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="CPU threads torch uses for the model (None: torch's default, one per core).",
    )
    inference_timeout_seconds: float = Field(
        default=900, gt=0, description="A batch generating longer fails and frees the slot."
    )
    oom_retries: int = Field(default=2, ge=0, le=20, description="Prefect task retries after OOM.")
    oom_retry_delay_seconds: float = Field(
        default=5, ge=0, le=3600, description="Delay before a task retry after OOM."
    )
    inject_oom: str | None = Field(
        default=None,
        description="Fault injection, e.g. `page=3,times=2` (or `times=all`): a real OOM error.",
    )
    max_file_bytes: int = Field(
        default=512 * 1024**2, ge=1, description="Larger files fail with a clear error."
    )
    max_pages: int = Field(default=5000, ge=1, description="Documents with more pages fail.")
    max_prompt_chars: int = Field(default=4000, ge=1, description="Longer prompts are refused.")
    document_timeout_seconds: float = Field(
        default=600,
        gt=0,
        description="Seconds a document may spend being opened and extracted, waits excluded.",
    )
    page_timeout_seconds: float = Field(
        default=60, gt=0, description="Extracting one page may take this long; it fails alone."
    )
    inference: Literal["auto", "in-process", "gpu-worker"] = Field(
        default="auto",
        description=(
            "Where a flow run's batches are answered: `gpu-worker` (sent to the `vramflow"
            " gpu-worker` processes through the Prefect server), `in-process` (the flow's own"
            " process loads the model), or `auto`: gpu-worker when PREFECT_API_URL names a"
            " server, in-process on Prefect's temporary server."
        ),
    )
    gpu_worker_wait_seconds: float = Field(
        default=120,
        gt=0,
        le=86400,
        description=(
            "A batch that no GPU worker has taken after this long, while none is alive, fails"
            " with a message saying to start one."
        ),
    )
    gpu_worker_heartbeat_seconds: float = Field(
        default=5, gt=0, le=3600, description="How often a GPU worker records that it is alive."
    )
    gpu_worker_timeout_seconds: float = Field(
        default=30,
        gt=0,
        le=86400,
        description=(
            "A GPU worker silent for this long is taken as dead: the batches it was running"
            " are sent again."
        ),
    )
    task_workers: int = Field(
        default=8, ge=1, le=256, description="Threads of a flow's task runner."
    )
    inbox: Path | None = Field(
        default=None, description="Folder the sweep-inbox flow scans; default: `home`/inbox."
    )
    documents_at_once: int = Field(
        default=2,
        ge=1,
        le=16,
        description=(
            "Documents the sweep-inbox and retry-failed flows run at once; one document's start"
            " and end overlap another's inference, and batches still take the slot one by one."
        ),
    )

    @field_validator("home", "inbox")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def inbox_dir(self) -> Path:
        return self.inbox or self.home / "inbox"

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under `home`."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'vramflow.db'}"

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"

    @property
    def slot_records_dir(self) -> Path:
        return self.home / "slots"


def resolve_settings(**overrides: Any) -> Settings:
    """The environment's settings with a run's parameters on top.

    A parameter left at None is "not given": the `VRAMFLOW_*` variable (or the default) decides.
    The result is validated like the environment; a bad value raises `ConfigError`.
    """
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings.model_validate({**Settings().model_dump(), **values})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None
