"""Terminal output: progress bars and tables, drawn with rich."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .queue import QueueStats


NON_TERMINAL_WIDTH = 120


def make_console(*, stderr: bool = False) -> Console:
    """Return a console whose messages never break mid-line, so scripts can match them.

    Output to a file or pipe gets a fixed width, so tables are not cut short.
    """
    console = Console(stderr=stderr, soft_wrap=True)
    return console if console.is_terminal else Console(stderr=stderr, width=NON_TERMINAL_WIDTH, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(console: Console, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Show a progress bar while the block runs; yields a function that advances it."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    with progress:
        bar = progress.add_task(description, total=total, detail="")
        yield lambda amount: progress.advance(bar, amount)


def print_stats(console: Console, queue: str, stats: QueueStats) -> None:
    table = Table(title=f"queue {queue}")
    for column in ("queued", "retrying", "in flight", "expired", "done", "dead", "total"):
        table.add_column(column, justify="right")
    table.add_row(*(str(value) for value in (
        stats.queued, stats.retrying, stats.in_flight, stats.expired, stats.done, stats.dead, stats.total,
    )))
    console.print(table)
    if stats.lane_depth:
        lanes = ", ".join(f"{lane}={depth}" for lane, depth in sorted(stats.lane_depth.items()))
        console.print(f"depth by lane: {lanes}")
    console.print(f"tasks moved to the solo lane after running out of GPU memory: {stats.oom_moves}")
    eta = stats.eta_s
    eta_text = "unknown (nothing finished in the last 5 minutes)" if eta is None else _format_duration(eta)
    console.print(f"throughput over the last 5 minutes: {stats.throughput_per_s:.2f} tasks/s, time left: {eta_text}")


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def print_table(console: Console, title: str, data: pa.Table) -> None:
    table = Table(title=title)
    for name in data.column_names:
        table.add_column(name, justify="left" if pa.types.is_string(data.schema.field(name).type) else "right")
    for row in data.to_pylist():
        table.add_row(*(_format_cell(row[name]) for name in data.column_names))
    console.print(table)


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}"
    return str(value)


def print_reduce_report(console: Console, report: Any, summary: pa.Table) -> None:
    print_table(console, "aggregate", summary)
    console.print(
        f"folded {report.files_folded} new files ({report.rows_folded} rows, {report.tasks_folded} tasks), "
        f"skipped {report.files_skipped} already folded, {report.duplicate_tasks} duplicate tasks dropped; "
        f"{report.total_tasks} tasks counted in all"
    )
    for item in report.quarantined:
        console.print(f"[yellow]quarantined[/yellow] {item.path}: {item.error}")


def reduce_report_json(report: Any, summary: pa.Table) -> dict[str, Any]:
    return {
        "files_folded": report.files_folded,
        "files_skipped": report.files_skipped,
        "rows_folded": report.rows_folded,
        "tasks_folded": report.tasks_folded,
        "duplicate_tasks": report.duplicate_tasks,
        "total_tasks": report.total_tasks,
        "quarantined": [{"path": str(item.path), "error": item.error} for item in report.quarantined],
        "summary": summary.to_pylist(),
    }
