"""Operator commands: ``qworker dead list|show|requeue|export`` and ``qworker purge``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import anyio

from . import render
from .backends import MODAL, open_queue
from .errors import ConfigError
from .layout import Layout
from .producer import INTAKE_CLOSED, INTAKE_KEY, INTAKE_OPEN
from .queue import DeadTask
from .results import result_task_ids
from .sources import write_task_file

# Maximum dead letters one command reads.
DEAD_LETTER_LIMIT = 1_000_000


def add_ops_commands(commands: Any, common: argparse.ArgumentParser, parser_class: type) -> None:
    _add_drain(commands, common)
    _add_reconcile(commands, common)
    _add_dead(commands, common, parser_class)
    _add_purge(commands, common)
    _add_stream(commands, common)


def _add_drain(commands: Any, common: argparse.ArgumentParser) -> None:
    drain = commands.add_parser(
        "drain", parents=[common], help="close a queue to producers and wait until its tasks are finished",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker drain --queue montecarlo --timeout-s 600\n"
               "  qworker drain --queue montecarlo --export left.jsonl\n"
               "  (later: qworker resume --queue montecarlo, then qworker push --job JOB --from left.jsonl)\n"
               "exit codes: 0 drained, 1 timed out with tasks still pending",
    )
    drain.add_argument("--queue", required=True, help="queue to drain")
    drain.add_argument("--timeout-s", type=float, default=3600.0,
                       help="give up after this many seconds (default: %(default)s)")
    drain.add_argument("--export", type=Path, metavar="FILE",
                       help="move the tasks still waiting into FILE (.jsonl, .csv or .parquet) instead of running"
                            " them, then wait only for the tasks in flight")
    drain.set_defaults(handler=_drain)

    resume = commands.add_parser(
        "resume", parents=[common], help="open a drained queue to producers again",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker resume --queue montecarlo",
    )
    resume.add_argument("--queue", required=True, help="queue to open")
    resume.set_defaults(handler=_resume)


def _add_dead(commands: Any, common: argparse.ArgumentParser, parser_class: type) -> None:
    dead = commands.add_parser(
        "dead", parents=[common], help="list, show, requeue or export dead letters",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker dead list --queue montecarlo --match ValueError\n"
               "  qworker dead requeue --queue montecarlo --match ValueError",
    )
    actions = dead.add_subparsers(dest="dead_action", required=True, parser_class=parser_class, metavar="ACTION")
    for name, help_text, handler in (
        ("list", "list dead letters with their error", _dead_list),
        ("show", "print dead letters with their full traceback", _dead_show),
        ("requeue", "deliver dead letters again from attempt 1, after a fix", _dead_requeue),
        ("export", "write dead letters to a task file that 'qworker push --from' accepts", _dead_export),
    ):
        action = actions.add_parser(name, parents=[common], help=help_text)
        action.add_argument("--queue", required=True, help="queue whose dead letters to use")
        action.add_argument("--match", help="only dead letters whose error contains this text")
        action.add_argument("--task-id", action="append", default=[], help="only this task id (repeatable)")
        if name == "list":
            action.add_argument("--json", action="store_true", help="print the dead letters as JSON")
        if name == "requeue":
            action.add_argument("--all", action="store_true", help="requeue every dead letter when no filter is given")
        if name == "export":
            action.add_argument("file", type=Path, help="task file to write: .jsonl, .csv or .parquet")
        action.set_defaults(handler=handler)


def _add_purge(commands: Any, common: argparse.ArgumentParser) -> None:
    purge = commands.add_parser(
        "purge", parents=[common], help="delete every task of a queue, in any state",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker purge --queue scratch --yes",
    )
    purge.add_argument("--queue", required=True, help="queue to empty")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(handler=_purge)


# -- dead letters ------------------------------------------------------------


def _select_dead(args: argparse.Namespace) -> list[DeadTask]:
    async def read() -> list[DeadTask]:
        async with await open_queue(args.backend, Layout(args.data_dir), args.queue, create=False) as queue:
            return await queue.dead_letters(DEAD_LETTER_LIMIT)

    letters = anyio.run(read)
    wanted_ids = set(args.task_id)
    return [
        letter for letter in letters
        if (not wanted_ids or letter.task.task_id in wanted_ids) and (not args.match or args.match in letter.error)
    ]


def _dead_list(args: argparse.Namespace) -> int:
    letters = _select_dead(args)
    if args.json:
        print(json.dumps([_dead_fields(letter) for letter in letters], indent=2))
        return 0
    console = render.make_console()
    for letter in letters:
        console.print(f"{letter.task.task_id}  attempt {letter.task.attempt}  {letter.error}", markup=False)
    console.print(f"{len(letters)} dead letters in queue {args.queue!r}")
    return 0


def _dead_show(args: argparse.Namespace) -> int:
    for letter in _select_dead(args):
        print(f"task {letter.task.task_id} (seed {letter.task.seed}, attempt {letter.task.attempt})")
        print(f"config: {json.dumps(dict(letter.task.config), sort_keys=True)}")
        print(f"error: {letter.error}")
        print(letter.traceback.rstrip() or "(no traceback)")
        print()
    return 0


def _dead_requeue(args: argparse.Namespace) -> int:
    if not (args.match or args.task_id or args.all):
        raise ConfigError("requeue needs --match TEXT, --task-id ID or --all, so no dead letter is requeued by accident")
    task_ids = [letter.task.task_id for letter in _select_dead(args)]

    async def requeue() -> int:
        async with await open_queue(args.backend, Layout(args.data_dir), args.queue, create=False) as queue:
            return await queue.requeue_dead(task_ids)

    count = anyio.run(requeue) if task_ids else 0
    render.make_console().print(f"requeued {count} dead letters in queue {args.queue!r}")
    return 0


def _dead_export(args: argparse.Namespace) -> int:
    letters = _select_dead(args)
    count = write_task_file([letter.task.with_attempt(0) for letter in letters], args.file)
    render.make_console().print(f"wrote {count} dead letters of queue {args.queue!r} to {str(args.file)!r}")
    return 0


def _dead_fields(letter: DeadTask) -> dict[str, Any]:
    return {
        "task_id": letter.task.task_id,
        "seed": letter.task.seed,
        "attempt": letter.task.attempt,
        "error": letter.error,
        "finished_at": letter.finished_at,
    }


def _add_reconcile(commands: Any, common: argparse.ArgumentParser) -> None:
    reconcile = commands.add_parser(
        "reconcile", parents=[common], help="deliver again the done tasks whose result is missing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker reconcile --queue montecarlo --dry-run",
    )
    reconcile.add_argument("--queue", required=True, help="queue to reconcile")
    reconcile.add_argument("--dry-run", action="store_true", help="print what would be delivered again, change nothing")
    reconcile.set_defaults(handler=_reconcile)


# -- reconcile ---------------------------------------------------------------

# Task ids printed by reconcile before it only counts the rest.
RECONCILE_SHOWN_IDS = 20


def _reconcile(args: argparse.Namespace) -> int:
    """Find done tasks without a readable result (deleted, truncated, quarantined) and deliver them again.

    On the Modal backends the adapter's own reconciler also runs first: it
    delivers again expired leases, finished retry delays and tasks lost between a get and its lease.
    """
    layout = Layout(args.data_dir)
    console = render.make_console()

    async def reconcile() -> tuple[list[str], int]:
        async with await open_queue(args.backend, layout, args.queue, create=False) as queue:
            if hasattr(queue, "reconcile") and not args.dry_run:
                report = await queue.reconcile()
                console.print(f"ledger: delivered {report.expired} expired leases, {report.retried} retries and"
                              f" {report.lost} lost tasks again, {report.buried} to the dead letters")
            if args.backend == MODAL:
                # NOTE: results of the deployed app live on the Volume, which this machine cannot list.
                console.print("results on a Modal Volume are not checked from here: run the reducer on Modal")
                return [], 0
            done = await queue.done_task_ids()
            present = await anyio.to_thread.run_sync(result_task_ids, layout.results_dir(args.queue))
            missing = sorted(done - present)
            requeued = 0 if args.dry_run or not missing else await queue.requeue_done(missing)
            return missing, requeued

    missing, requeued = anyio.run(reconcile)
    shown = ", ".join(missing[:RECONCILE_SHOWN_IDS]) + (" ..." if len(missing) > RECONCILE_SHOWN_IDS else "")
    if not missing:
        console.print(f"queue {args.queue!r}: every done task has its result")
    elif args.dry_run:
        verb = "has" if len(missing) == 1 else "have"
        console.print(f"queue {args.queue!r}: {_done_tasks(len(missing))} {verb} no result and would run again: {shown}")
    else:
        console.print(f"queue {args.queue!r}: delivered {_done_tasks(requeued)} without a result again: {shown}")
    return 0


def _done_tasks(count: int) -> str:
    return "1 done task" if count == 1 else f"{count} done tasks"


# -- drain -------------------------------------------------------------------

DRAIN_POLL_S = 1.0
DRAIN_REPORT_S = 10.0


def _drain(args: argparse.Namespace) -> int:
    console = render.make_console(stderr=True)

    async def drain() -> tuple[int, int]:
        async with await open_queue(args.backend, Layout(args.data_dir), args.queue, create=False) as queue:
            await queue.set_metadata({INTAKE_KEY: INTAKE_CLOSED})
            exported = 0
            if args.export is not None:
                tasks = await queue.take_waiting()
                exported = write_task_file(tasks, args.export)
                console.print(f"moved {exported} waiting tasks of queue {args.queue!r} to {str(args.export)!r}")
            return exported, await _wait_until_finished(queue, args.timeout_s, console)

    _, pending = anyio.run(drain)
    if pending:
        console.print(f"drain of queue {args.queue!r} timed out after {args.timeout_s:.0f} s with {pending} tasks"
                      " pending; intake stays closed")
        return 1
    console.print(f"queue {args.queue!r} is drained: nothing waits or runs; intake stays closed until 'qworker resume'")
    return 0


async def _wait_until_finished(queue: Any, timeout_s: float, console: Any) -> int:
    """Poll the queue until nothing is pending or ``timeout_s`` passes; return the tasks still pending."""
    last_report = 0.0
    with anyio.move_on_after(timeout_s):
        while True:
            stats = await queue.stats()
            if stats.pending == 0:
                return 0
            now = time.monotonic()
            if now - last_report >= DRAIN_REPORT_S:
                last_report = now
                console.print(f"waiting: {stats.depth} waiting, {stats.in_flight} in flight")
            await anyio.sleep(DRAIN_POLL_S)
    return (await queue.stats()).pending


def _resume(args: argparse.Namespace) -> int:
    async def resume() -> None:
        async with await open_queue(args.backend, Layout(args.data_dir), args.queue, create=False) as queue:
            await queue.set_metadata({INTAKE_KEY: INTAKE_OPEN})

    anyio.run(resume)
    render.make_console().print(f"queue {args.queue!r} accepts tasks again")
    return 0


# -- purge -------------------------------------------------------------------


def _purge(args: argparse.Namespace, confirm: Callable[[str], str] = input) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"purge deletes every task of queue {args.queue!r}: pass --yes to confirm without a terminal")
        answer = confirm(f"delete every task of queue {args.queue!r}? type the queue name to confirm: ")
        if answer.strip() != args.queue:
            render.make_console().print("purge cancelled, nothing deleted")
            return 1

    async def purge() -> int:
        async with await open_queue(args.backend, Layout(args.data_dir), args.queue, create=False) as queue:
            return await queue.purge()

    count = anyio.run(purge)
    render.make_console().print(f"purged {count} tasks from queue {args.queue!r}")
    return 0


# -- stream ------------------------------------------------------------------


def _add_stream(commands: Any, common: argparse.ArgumentParser) -> None:
    stream = commands.add_parser(
        "stream", parents=[common], help="push JSON task records from standard input, a growing file or an HTTP endpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  tail -n +1 tasks.jsonl | qworker stream --job job.toml --stdin\n"
               "  qworker stream --job job.toml --follow tasks.jsonl --checkpoint tasks.ck --high-water 10000\n"
               "  qworker stream --job job.toml --http http://127.0.0.1:8000/records --checkpoint records.ck\n"
               "SIGTERM or SIGINT pushes the buffered records, commits the checkpoint and exits 0",
    )
    stream.add_argument("--job", type=Path, required=True, help="job file (TOML or JSON): queue, workload, base config")
    source = stream.add_mutually_exclusive_group(required=True)
    source.add_argument("--stdin", action="store_true", help="read records from standard input until its end")
    source.add_argument("--follow", type=Path, metavar="FILE",
                        help="read records from FILE as it grows, and from the new file after a rotation")
    source.add_argument("--http", metavar="URL",
                        help="poll URL?after=CURSOR&limit=N, which returns up to N JSON lines after the first"
                             " CURSOR records")
    stream.add_argument("--poll-s", type=float, default=1.0,
                        help="with --http: seconds between polls that found nothing (default: %(default)s)")
    stream.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="with --follow or --http: file storing the position of the first unpushed record, to"
                             " resume from. Invalid records go to FILE.rejected.jsonl")
    stream.add_argument("--batch", type=int, default=500, help="push after this many records (default: %(default)s)")
    stream.add_argument("--batch-s", type=float, default=1.0,
                        help="push after this many seconds since the first buffered record (default: %(default)s)")
    stream.add_argument("--high-water", type=int, metavar="N",
                        help="wait before a push while the queue contains N or more waiting tasks")
    stream.add_argument("--stop-at-eof", action="store_true",
                        help="with --follow or --http: exit at the end of the file, or when a poll finds nothing,"
                             " instead of waiting for more records")
    stream.set_defaults(handler=_stream)


def _stream(args: argparse.Namespace) -> int:
    from .jobs import load_job
    from .stream import StreamOptions, stream_tasks

    if args.checkpoint is not None and args.stdin:
        raise ConfigError("--checkpoint needs --follow FILE or --http URL, because standard input cannot be resumed")
    if args.poll_s <= 0:
        raise ConfigError(f"invalid --poll-s {args.poll_s}: use a positive number of seconds")
    if args.high_water is not None and args.high_water < 1:
        raise ConfigError(f"invalid --high-water {args.high_water}: use an integer of 1 or more")
    job = load_job(args.job)
    options = StreamOptions(batch_size=args.batch, batch_s=args.batch_s, high_water=args.high_water,
                            checkpoint=args.checkpoint, stop_at_eof=args.stop_at_eof)

    async def stream() -> Any:
        async with await open_queue(args.backend, Layout(args.data_dir), job.queue) as queue:
            return await stream_tasks(queue, job, follow=args.follow, http=args.http, poll_s=args.poll_s,
                                      stdin=sys.stdin.buffer if args.stdin else None, options=options)

    summary = anyio.run(stream)
    render.make_console(stderr=True).print(
        f"queue {job.queue!r}: pushed {summary.added}, skipped {summary.duplicates} already in the queue,"
        f" rejected {summary.rejected} invalid records"
    )
    return 0
