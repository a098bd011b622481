"""A picture of a run: memory and pages per second over time, with the GPU slot's holds marked.

matplotlib with the Agg backend (no display needed). The same figure goes to a PNG file, a
self-contained HTML page, or a base64 `data:` URI for a Prefect markdown artifact.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vramflow.errors import VramflowError  # noqa: E402
from vramflow.timeline import Call, Timeline  # noqa: E402

MIB = 2**20
HOLD_COLOUR = "#f2c14e"
# Small enough for an artifact (about 40-60 KB of PNG), large enough to read in the UI.
SIZE_INCHES = (10, 5.5)
DPI = 90


def figure(timeline: Timeline) -> Figure:
    """Memory (top) and pages per second (bottom) against seconds since the run's start."""
    if timeline.start is None:
        raise VramflowError("nothing to plot: no model calls or slot holds recorded")
    fig, (memory, rate) = plt.subplots(
        2, 1, sharex=True, figsize=SIZE_INCHES, dpi=DPI, height_ratios=(3, 2)
    )
    start = timeline.start
    for axes in (memory, rate):
        _mark_holds(axes, timeline, start)
        axes.grid(True, alpha=0.3)
    _draw_memory(memory, timeline, start)
    _draw_rate(rate, timeline, start)
    rate.set_xlabel(f"seconds since {start:%Y-%m-%d %H:%M:%S} UTC")
    fig.suptitle(timeline.title or "vramflow run")
    # Fixed margins (room on the right for the legends): tight_layout would draw the whole
    # figure once more to measure it, a third of the time a picture takes.
    fig.subplots_adjust(left=0.08, right=0.8, top=0.92, bottom=0.1, hspace=0.12)
    return fig


def _seconds(moment: datetime, start: datetime) -> float:
    return (moment - start).total_seconds()


def _mark_holds(axes, timeline: Timeline, start: datetime) -> None:
    end = timeline.end or start
    for i, hold in enumerate(timeline.holds):
        axes.axvspan(
            _seconds(hold.acquired_at, start),
            _seconds(hold.released_at or end, start),
            color=HOLD_COLOUR,
            alpha=0.25,
            lw=0,
            label="GPU slot held" if i == 0 else None,
        )


def _draw_memory(axes, timeline: Timeline, start: datetime) -> None:
    calls = timeline.calls
    ends = [_seconds(c.finished_at, start) for c in calls]
    if timeline.on_gpu:
        _points(axes, calls, start, "torch_peak_bytes", "torch peak per call", "o")
        _points(axes, calls, start, "nvml_used_bytes", "device used (NVML)", "s")
        totals = [c.nvml_total_bytes for c in calls if c.nvml_total_bytes]
        if totals:
            axes.axhline(max(totals) / MIB, color="grey", ls="--", lw=1, label="device total")
        axes.set_ylabel("VRAM (MiB)")
    else:
        _points(axes, calls, start, "rss_bytes", "process RSS per call", "o")
        axes.set_ylabel("RSS (MiB), CPU")
    ooms = [(x, c) for x, c in zip(ends, calls, strict=True) if c.outcome == "oom"]
    for i, (x, _) in enumerate(ooms):
        axes.axvline(x, color="red", lw=1, ls=":", label="out of memory" if i == 0 else None)
    top = axes.get_ylim()[1]
    axes.set_ylim(0, top * 1.1)  # headroom: points at the peak stay off the frame
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")


def _points(axes, calls: list[Call], start: datetime, attr: str, label: str, marker: str):
    """A point where each call ended, and a bar over the time the call ran."""
    measured = [c for c in calls if getattr(c, attr) is not None]
    if not measured:
        return
    ys = [getattr(c, attr) / MIB for c in measured]
    ends = [_seconds(c.finished_at, start) for c in measured]
    (line,) = axes.plot(ends, ys, marker=marker, ms=4, lw=1, label=label)
    starts = [_seconds(c.started_at, start) for c in measured]
    axes.hlines(ys, starts, ends, colors=line.get_color(), lw=4, alpha=0.5)


def _draw_rate(axes, timeline: Timeline, start: datetime) -> None:
    """Pages finished per second, in bins of about a thirtieth of the run (at least 1 s)."""
    span = max(_seconds(timeline.end or start, start), 1.0)
    width = max(span / 30, 1.0)
    bins = [0.0] * (int(span // width) + 1)
    for call in timeline.calls:
        if call.outcome == "ok":
            bins[int(_seconds(call.finished_at, start) // width)] += call.pages
    axes.bar(
        [i * width for i in range(len(bins))],
        [pages / width for pages in bins],
        width=width,
        align="edge",
        color="#3a7dc9",
        label=f"pages/s ({width:.0f} s bins)",
    )
    axes.set_ylabel("pages per second")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")


def png_bytes(timeline: Timeline) -> bytes:
    fig = figure(timeline)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def data_uri(timeline: Timeline) -> str:
    """The PNG as a `data:` URI, to embed where no file can be served (a Prefect artifact)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(timeline)).decode("ascii")


def write(timeline: Timeline, target: Path) -> Path:
    """Write a `.png`, or a self-contained `.html` page around it."""
    suffix = target.suffix.lower()
    if suffix == ".png":
        target.write_bytes(png_bytes(timeline))
    elif suffix in (".html", ".htm"):
        title = html.escape(timeline.title or "vramflow run")
        target.write_text(
            f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
            f"<h1>{title}</h1><img alt='{title}' src='{data_uri(timeline)}'>\n"
        )
    else:
        raise VramflowError(f"cannot write {target.name}: use a .png or .html file name")
    return target
