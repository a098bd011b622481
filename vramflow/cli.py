"""The `vramflow` command: run PDFs through the pipeline, show stored answers, summarise."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vramflow import cli_operators
from vramflow.config import PREFECT_SERVER_DEFAULTS, Settings
from vramflow.errors import VramflowError

app = typer.Typer(
    help="Per-page transformer inference over PDFs, one GPU slot at a time.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
# Piped output (CI logs, files) would otherwise wrap every table at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)


def _prepare_prefect(verbose: bool) -> None:
    for name, value in PREFECT_SERVER_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not verbose:
        # The run summary reports every failure in one line; Prefect would add tracebacks.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


@app.command()
def run(
    files: Annotated[list[Path], typer.Argument(help="PDF files to process.")],
    prompt: Annotated[
        str | None, typer.Option(help="Instruction applied to every page [VRAMFLOW_PROMPT].")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Packaged default, HF id, folder or .gguf [VRAMFLOW_MODEL]."),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens generated per page [VRAMFLOW_MAX_NEW_TOKENS].")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Pages per model call and slot hold [VRAMFLOW_BATCH_SIZE]."),
    ] = None,
    max_input_tokens: Annotated[
        int | None,
        typer.Option(help="Page tokens kept, longer pages truncated [VRAMFLOW_MAX_INPUT_TOKENS]."),
    ] = None,
    pages: Annotated[str | None, typer.Option(help="Page range, e.g. '1-5,8'.")] = None,
    password: Annotated[str | None, typer.Option(help="Password of encrypted PDFs.")] = None,
    force: Annotated[bool, typer.Option(help="Redo pages already done.")] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Show Prefect logs (tracebacks: PREFECT_LOGGING_LEVEL=DEBUG)."
        ),
    ] = False,
) -> None:
    """Run the model over every page of FILES and store the answers.

    Options left out come from the VRAMFLOW_* settings named in brackets.

    Example: vramflow run report.pdf --prompt "Summarise this page in two sentences."
    """
    from vramflow import cli_run, preflight

    overrides = {
        "prompt": prompt,
        "model": model,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "max_input_tokens": max_input_tokens,
    }
    # Refused here, in well under a second, before Prefect's server starts or the database is
    # touched: a bad command line changes nothing.
    settings = preflight.check_run(files, pages, **overrides)
    _prepare_prefect(verbose)
    cli_run.say_if_no_gpu_worker(settings, err)
    parameters = cli_run.flow_parameters(overrides, pages, force, password)
    summaries = cli_run.run_files(files, parameters, settings, err)
    cli_run.print_run_summary(console, summaries)
    if any(s.get("status") != "done" for s in summaries):
        raise typer.Exit(1)


@app.command()
def show(
    document: Annotated[str, typer.Argument(help="PDF file, sha256 prefix or file name.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per page.")] = False,
    model: Annotated[str | None, typer.Option(help="Results of this model.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Results of this prompt.")] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every model and prompt, one group each.")
    ] = False,
) -> None:
    """Print a document's stored answers page by page, for one model and prompt: the latest
    run's unless --model/--prompt choose (--all: every one, grouped).

    Example: vramflow show report.pdf --json
    """
    from vramflow import cli_show, pdf
    from vramflow.db import reports
    from vramflow.db.schema import ensure_schema
    from vramflow.db.session import session_scope
    from vramflow.runs import _sha, model_identity

    settings = Settings()
    ensure_schema(settings.resolved_database_url)
    path = Path(document)
    sha = pdf.file_sha256(path) if path.is_file() else None
    model_id = model_identity(model) if model else None
    with session_scope(settings.resolved_database_url) as session:
        found = reports.find_documents(session, document, sha)
        if not found:
            raise VramflowError(f"no stored document matches {document!r}")
        for doc in found:
            sets = reports.result_sets(session, doc, model_id, _sha(prompt) if prompt else None)
            if (model or prompt) and not sets:
                raise VramflowError(f"{doc.file_name} has no results for that model and prompt")
            cli_show.show_document(console, session, doc, sets, every, as_json)


@app.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row.")] = False,
) -> None:
    """Summarise pages, inference time and memory per document and model.

    Example: vramflow stats
    """
    from vramflow.db import reports
    from vramflow.db.schema import ensure_schema
    from vramflow.db.session import session_scope

    settings = Settings()
    ensure_schema(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        rows = reports.stats_rows(session)
        rss = reports.peak_rss(session)
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table(title=f"vramflow stats (peak RSS of any call: {_mib(rss)})")
    for column in (
        "document",
        "status",
        "model",
        "pages",
        "ok",
        "failed",
        "model s/page",
        "peak VRAM",
    ):
        table.add_column(column)
    for r in rows:
        per_page = r["model_seconds"] / r["ok"] if r["ok"] else 0.0
        table.add_row(
            r["document"],
            r["status"],
            Path(r["model"]).name,
            str(r["pages"]),
            str(r["ok"]),
            str(r["failed"]),
            f"{per_page:.2f}",
            _mib(r["peak_vram_bytes"]),
        )
    console.print(table)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the current version.

    Example: VRAMFLOW_DATABASE_URL=postgresql+psycopg://vf@db/vramflow vramflow db upgrade
    """
    from sqlalchemy.engine import make_url

    from vramflow.db.migrate import current
    from vramflow.db.schema import ensure_schema

    url = Settings().resolved_database_url
    ensure_schema(url)
    shown = make_url(url).render_as_string(hide_password=True)
    console.print(f"database at {shown} is at revision {current(url)} (head)")


@app.command()
def serve(
    retry_schedule: Annotated[
        bool, typer.Option(help="Switch on the nightly retry-failed schedule.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Most flow runs at once (default: no limit).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hide Prefect's logs.")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve Prometheus metrics on this port (/metrics)."),
    ] = None,
) -> None:
    """Serve the process-pdf, sweep-inbox and retry-failed deployments from this process.

    One box, no work pool or worker: triggered and scheduled flow runs run here until Ctrl-C.

    Needs a Prefect server (PREFECT_API_URL); stopping pauses the schedules until the next start.

    With --metrics-port, Prometheus metrics (device memory, RSS, results by status) are served
    on that port.

    Example: PREFECT_API_URL=http://127.0.0.1:4200/api vramflow serve --metrics-port 9464
    """
    _prepare_prefect(not quiet)
    from prefect import serve as serve_deployments
    from prefect.settings import get_current_settings

    from vramflow.flows.deployments import deployments

    if not get_current_settings().api.url:
        raise VramflowError(
            "vramflow serve needs a Prefect server: start one with `prefect server start` and "
            "set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
    if metrics_port is not None:
        _serve_metrics(metrics_port)
    serve_deployments(*deployments(retry_schedule_active=retry_schedule), limit=limit)


def _serve_metrics(port: int) -> None:
    """Device memory, RSS and the database's results by status on `port`."""
    from vramflow import metrics
    from vramflow.db.schema import ensure_schema
    from vramflow.db.session import session_scope
    from vramflow.db.status import result_counts

    url = Settings().resolved_database_url
    ensure_schema(url)

    def read_results() -> dict[str, int]:
        with session_scope(url) as session:
            return result_counts(session)

    metrics.watch_results(read_results)
    try:
        server = metrics.start_server(port)
    except OSError as exc:  # the port is taken, or not ours to open
        raise VramflowError(f"cannot serve metrics on port {port}: {exc}") from None
    err.print(f"metrics at http://0.0.0.0:{server.server_port}/metrics")


# What operators look at while runs go on: in a module of their own (cli_operators.py).
app.command()(cli_operators.plot)
app.command()(cli_operators.status)


@app.command("gpu-worker")
def gpu_worker(
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu or cuda:N (default: VRAMFLOW_DEVICE, auto)."),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            min=1,
            max=1024,
            help="Batches taken at once; they wait in the engine and share its model calls.",
        ),
    ] = 64,
    preload: Annotated[
        list[str] | None,
        typer.Option(help="Model to load before the first batch (default: VRAMFLOW_MODEL)."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Serve Prometheus metrics on this port.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hide Prefect's logs.")] = False,
) -> None:
    """Keep the model loaded and answer the batches of every flow run for one device.

    Start one per GPU beside the Prefect worker; flow runs send their pages here through the
    Prefect server (PREFECT_API_URL), and pages of different runs share model calls.

    Example: PREFECT_API_URL=http://127.0.0.1:4200/api vramflow gpu-worker --device cuda:0
    """
    _prepare_prefect(not quiet)
    import logging

    from vramflow.tasks.gpu_worker import run_gpu_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = {"device": device} if device else {}
    settings = Settings(**overrides)
    if metrics_port is not None:
        _serve_metrics(metrics_port)
    run_gpu_worker(settings, limit, preload if preload is not None else [settings.model])


def main() -> None:
    try:
        code = app(standalone_mode=False)  # returns the code of a typer.Exit
        sys.exit(code if isinstance(code, int) else 0)
    except VramflowError as exc:
        for line in str(exc).splitlines() or [""]:
            err.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True, highlight=False)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
