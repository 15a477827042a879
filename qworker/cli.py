"""The ``qworker`` command line: push, work, reduce, status and demo.

Exit codes: 0 success, 1 the command ran but a check or a consumer failed,
2 a user mistake (bad argument, job file, seed range or queue file),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, Sequence

import anyio

from . import render
from .arguments import non_negative_float, non_negative_int, positive_float, positive_int
from .backends import BACKENDS, MODAL, SQLITE, open_bucket, open_queue
from .backends.modal_queue import ModalQueueSettings
from .backends.sqlite import SYNCHRONOUS_MODES
from .cli_ops import add_ops_commands
from .consumer import ConsumerSettings
from .context import validate_device
from .errors import ConfigError, QworkerError
from .jobs import load_job, parse_seeds
from .layout import DEFAULT_DATA_DIR, Layout
from .log import LOG_LEVELS, configure_logging
from .pool import ConsumerSpec, run_consumer, run_consumer_processes
from .ratelimit import BudgetStats, SqliteBucket
from .spawn_entry import EarlySignals
from .producer import push_job_tasks
from .sources import read_task_file, write_rejected
from .reducer import Reducer
from .retry import Backoff
from .sink import SinkSettings
from .task import LANES, Task, validate_queue_name
from .workloads import get_workload

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + 13  # the shells' code for a process ended by SIGPIPE

logger = logging.getLogger("qworker.cli")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit with EXIT_USAGE."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder holding the queue file and results (default: %(default)s, or $QWORKER_DATA_DIR)")
    common.add_argument("--backend", default=SQLITE, choices=BACKENDS,
                        help="queue backend: the embedded SQLite file, or Modal's Queue and Dict (default: %(default)s)")

    parser = _Parser(prog="qworker", description="Run seeded batch work through a durable queue.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="example:\n  qworker demo                       run the Monte Carlo job end to end")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    _add_push(commands, common)
    _add_work(commands, common)
    _add_reduce(commands, common)
    _add_status(commands, common)
    add_ops_commands(commands, common, _Parser)
    _add_demo(commands, common)
    return parser


def _add_push(commands: Any, common: argparse.ArgumentParser) -> None:
    push = commands.add_parser(
        "push", parents=[common], help="push one task per seed and variant of a job file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker push --job producers/montecarlo.toml --seeds 0:500\n"
               "  qworker push --job producers/montecarlo.toml --from tasks.csv --skip-invalid",
    )
    push.add_argument("--job", type=Path, required=True, help="job file (TOML or JSON) naming queue, workload and config")
    push.add_argument("--seeds", help="seed range START:STOP (STOP exclusive), a seed, or a list 0:10,20:30 (default: the job's 'seeds')")
    push.add_argument("--from", dest="from_file", type=Path, metavar="FILE",
                      help="push one task per row of a CSV, JSONL or parquet file (a seed column, config columns"
                           " or a JSON config column, optional task_id) instead of a seed range; the job gives"
                           " the queue, workload and base config")
    push.add_argument("--skip-invalid", action="store_true",
                      help="with --from: push the valid rows and write the rejected ones with their reasons to"
                           " FILE.rejected.jsonl; without it a file with any invalid row pushes nothing")
    push.add_argument("--queue", help="queue name (default: the job's 'queue')")
    push.add_argument("--dry-run", action="store_true", help="validate and count the tasks without pushing them")
    push.add_argument("--synchronous", default="NORMAL", choices=SYNCHRONOUS_MODES, help="SQLite synchronous mode")
    push.add_argument("--tasks-per-item", type=positive_int, default=100,
                      help="Modal backends: tasks packed into one queue item. A claim takes whole items, so for"
                           " long GPU tasks use about the consumer's slots (default: %(default)s)")
    push.set_defaults(handler=_cmd_push)


def _add_work(commands: Any, common: argparse.ArgumentParser) -> None:
    work = commands.add_parser(
        "work", parents=[common], help="run consumers that claim and run tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker work --queue montecarlo --processes 2 --slots 4 --burst",
    )
    work.add_argument("--queue", required=True, help="queue to consume")
    work.add_argument("--workload", help="workload name or module:function (default: the one recorded at push)")
    work.add_argument("--processes", type=positive_int, default=1, help="consumer processes (default: %(default)s)")
    work.add_argument("--slots", type=positive_int, default=4, help="tasks run at once per process (default: %(default)s)")
    work.add_argument("--prefetch", type=non_negative_int, help="tasks leased ahead of a free slot (default: about 50 ms of work, from --slots up to 100)")
    work.add_argument("--lease-s", type=positive_float, default=30.0, help="lease length in seconds (default: %(default)s)")
    work.add_argument("--grace-s", type=non_negative_float, default=30.0,
                      help="seconds running tasks get to finish after SIGTERM (default: %(default)s)")
    work.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    work.add_argument("--lane", default="default", choices=LANES, help="lane to consume (default: %(default)s)")
    work.add_argument("--no-solo", action="store_true",
                      help="do not run the one-slot consumer of the solo lane that the first process runs beside"
                           " its default-lane consumer; that lane holds tasks that ran out of GPU memory beside others")
    work.add_argument("--gpu-memory-gb", type=positive_float,
                      help="GPU memory in GiB that the estimates (config key gpu_memory_gb) of a process's running"
                           " tasks may add up to (default: 90%% of the GPU's free memory at start)")
    work.add_argument("--device", default="auto", help="torch device for handlers: auto, cpu, cuda, cuda:1 (default: %(default)s)")
    work.add_argument("--batch-rows", type=non_negative_int, default=0,
                      help="write results as segment files of this many rows, or 0 for one file per task (default: 0)")
    work.add_argument("--batch-s", type=positive_float, default=2.0, help="flush a segment after this many seconds (default: %(default)s)")
    work.add_argument("--no-fsync", action="store_true", help="do not fsync result files (faster, not power-cut safe)")
    work.add_argument("--retry-base-s", type=positive_float, default=1.0, help="first retry delay in seconds (default: %(default)s)")
    work.add_argument("--synchronous", default="NORMAL", choices=SYNCHRONOUS_MODES, help="SQLite synchronous mode")
    work.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log level (default: %(default)s)")
    work.add_argument("--log-file", type=Path, help="log to this file, with '{index}' replaced by the process index")
    work.set_defaults(handler=_cmd_work)


def _add_reduce(commands: Any, common: argparse.ArgumentParser) -> None:
    reduce = commands.add_parser(
        "reduce", parents=[common], help="fold new results into the aggregate and print it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker reduce --queue montecarlo",
    )
    reduce.add_argument("--queue", required=True, help="queue whose results to reduce")
    reduce.add_argument("--workload", help="workload whose aggregation to use (default: the one recorded at push)")
    reduce.add_argument("--reset", action="store_true", help="forget what was folded and reduce every result again")
    reduce.add_argument("--json", action="store_true", help="print the report as JSON")
    reduce.set_defaults(handler=_cmd_reduce)


def _add_status(commands: Any, common: argparse.ArgumentParser) -> None:
    status = commands.add_parser(
        "status", parents=[common], help="show task counts by state",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker status --queue montecarlo --json\n  qworker status --queue montecarlo --watch 2",
    )
    status.add_argument("--queue", required=True, help="queue to show")
    status.add_argument("--json", action="store_true", help="print the counts as JSON")
    status.add_argument("--watch", type=positive_float, metavar="SECONDS",
                        help="redraw every SECONDS seconds until Ctrl-C")
    status.set_defaults(handler=_cmd_status)


def _add_demo(commands: Any, common: argparse.ArgumentParser) -> None:
    from .demo import add_demo_arguments, run_demo

    demo = commands.add_parser(
        "demo", parents=[common], help="push, run and reduce a demo job (Monte Carlo, or --workload http) in one command",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  qworker demo --seeds 500 --paths 20000 --processes 2 --slots 4",
    )
    add_demo_arguments(demo)
    demo.set_defaults(handler=run_demo)


# -- commands --------------------------------------------------------------


def _cmd_push(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    if args.queue:
        job = replace(job, queue=validate_queue_name(args.queue))
    console = render.make_console(stderr=True)
    if args.from_file is not None:
        tasks, rejected_note = _tasks_from_file(args, job)
        description = f"{len(tasks)} tasks from {str(args.from_file)!r}"
    else:
        tasks, rejected_note = _tasks_from_seeds(args, job), ""
        description = f"{len(tasks)} tasks ({len(job.configs)} variant(s) x {len(tasks) // len(job.configs)} seeds)"

    if args.dry_run:
        console.print(f"dry run: {description} for queue {job.queue!r} are valid{rejected_note}")
        return EXIT_OK

    layout = Layout(args.data_dir)

    async def push() -> Any:
        modal_settings = ModalQueueSettings(tasks_per_item=args.tasks_per_item)
        async with await open_queue(
            args.backend, layout, job.queue, synchronous=args.synchronous, modal_settings=modal_settings
        ) as queue:
            with render.progress_bar(console, "pushing", len(tasks)) as advance:
                return await push_job_tasks(queue, job, tasks, on_progress=advance)

    result = anyio.run(push)
    console.print(
        f"pushed {result.added} tasks to queue {job.queue!r}, skipped {result.duplicates} whose id the queue"
        f" already holds (queued, running, done or dead){rejected_note}"
    )
    if args.backend == MODAL:
        return _launch_on_modal(job.queue, console)
    return EXIT_OK


def _tasks_from_seeds(args: argparse.Namespace, job: Any) -> list[Task]:
    if args.skip_invalid:
        raise ConfigError("--skip-invalid applies to --from FILE only, because a seed range has no rows to skip")
    seed_text = args.seeds if args.seeds is not None else job.seeds
    if seed_text is None:
        raise ConfigError("no seeds: pass --seeds START:STOP or --from FILE, or set 'seeds' in the job file")
    return list(job.tasks(parse_seeds(seed_text)))


def _tasks_from_file(args: argparse.Namespace, job: Any) -> tuple[list[Task], str]:
    """Read the task file; reject it whole on any invalid row unless --skip-invalid writes those rows aside."""
    if args.seeds is not None:
        raise ConfigError("pass either --seeds or --from FILE, not both")
    if len(job.configs) > 1:
        raise ConfigError(f"{job.source}: --from takes each task's config from the file, so the job may not have variants")

    source = read_task_file(
        args.from_file, base_config=job.configs[0], workload=get_workload(job.workload),
        max_attempts=job.max_attempts, lane=job.lane,
    )
    if not source.rejected:
        return source.tasks, ""

    rejected_path = args.from_file.with_name(args.from_file.name + ".rejected.jsonl")
    if not args.skip_invalid:
        raise ConfigError(
            f"{len(source.rejected)} rows of {str(args.from_file)!r} are invalid, so nothing was pushed; first:"
            f" {source.rejected[0]}; fix them, or pass --skip-invalid to push the valid rows and write the"
            f" rejected ones to {str(rejected_path)!r}"
        )
    write_rejected(source.rejected, rejected_path)
    return source.tasks, f"; rejected {len(source.rejected)} invalid rows, written with their reasons to {str(rejected_path)!r}"


def _cmd_work(args: argparse.Namespace) -> int:
    layout = Layout(args.data_dir)
    workload_name = args.workload or anyio.run(_recorded_workload, args.backend, layout, args.queue)
    get_workload(workload_name)  # an unknown workload fails here, before any task is claimed
    validate_device(args.device)

    settings = ConsumerSettings(
        slots=args.slots,
        prefetch=args.prefetch,
        lease_s=args.lease_s,
        grace_s=args.grace_s,
        lane=args.lane,
        burst=args.burst,
        device=args.device,
        gpu_memory_limit_gb=args.gpu_memory_gb,
        backoff=Backoff(base_s=args.retry_base_s),
        sink=SinkSettings(batch_rows=args.batch_rows, batch_s=args.batch_s, fsync=not args.no_fsync),
        scratch_root=layout.scratch_dir,
    )
    spec = ConsumerSpec(
        data_dir=args.data_dir, queue=args.queue, workload=workload_name, settings=settings,
        synchronous=args.synchronous, backend=args.backend, log_level=args.log_level, log_file=args.log_file,
        with_solo=not args.no_solo,
    )
    if args.processes == 1:
        early_signals = EarlySignals()
        configure_logging(args.log_level, args.log_file)
        anyio.run(lambda: run_consumer(spec, early_signals=early_signals))
        return EXIT_OK
    configure_logging(args.log_level)
    return run_consumer_processes(spec, args.processes)


def _cmd_reduce(args: argparse.Namespace) -> int:
    if args.backend == MODAL:
        return _reduce_on_modal(args)
    layout = Layout(args.data_dir)
    workload = get_workload(args.workload or anyio.run(_recorded_workload, args.backend, layout, args.queue))
    reducer = Reducer(layout.results_dir(args.queue), workload.aggregation)
    if args.reset:
        reducer.reset()
    report = reducer.run()
    summary = workload.summarize(report.aggregate) if workload.summarize else report.aggregate

    if args.json:
        print(json.dumps(render.reduce_report_json(report, summary), indent=2))
    else:
        render.print_reduce_report(render.make_console(), report, summary)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    layout = Layout(args.data_dir)
    if args.watch is None:
        _show_status(args, layout, clear=False)
        return EXIT_OK
    try:
        while True:
            _show_status(args, layout, clear=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EXIT_OK


def _show_status(args: argparse.Namespace, layout: Layout, *, clear: bool) -> None:
    async def read_stats() -> Any:
        async with await open_queue(args.backend, layout, args.queue, create=False) as queue:
            return await queue.stats()

    stats = anyio.run(read_stats)
    rate_limits = anyio.run(_read_rate_limits, args.backend, layout)
    if args.json:
        rate_limit_fields = [_rate_limit_fields(budget) for budget in rate_limits]
        print(json.dumps({"queue": args.queue, **stats.as_dict(), "rate_limits": rate_limit_fields}, indent=2), flush=True)
        return
    console = render.make_console()
    if clear:
        console.clear()
    render.print_stats(console, args.queue, stats)
    _print_rate_limits(console, rate_limits)


# -- rate limiter counters in status --------------------------------------------


async def _read_rate_limits(backend: str, layout: Layout) -> list[BudgetStats]:
    """Read the counters of every rate limit budget of the backend; every queue of the backend shares them."""
    bucket = open_bucket(backend, layout)
    try:
        return await bucket.stats()
    finally:
        if isinstance(bucket, SqliteBucket):
            bucket.close()


def _rate_limit_fields(budget: BudgetStats) -> dict[str, Any]:
    return {
        "name": budget.name,
        "granted": budget.granted,
        "waited_s": budget.waited_s,
        "throttled": budget.throttled,
        "paused_until": budget.paused_until,
    }


def _print_rate_limits(console: Any, rate_limits: list[BudgetStats]) -> None:
    if rate_limits:
        console.print("rate limits (shared by every queue of this backend):")
    now = time.time()
    for budget in rate_limits:
        paused = f"paused for {budget.paused_until - now:.1f} s more" if budget.paused_until > now else "not paused"
        console.print(
            f"  {budget.name}: {budget.granted} requests granted, {budget.waited_s:.1f} s waited in total,"
            f" paused {budget.throttled} times by 429 or 503 with Retry-After, {paused}"
        )


# -- the deployed Modal app (qworker/modal_app.py) ----------------------------


def _launch_on_modal(queue: str, console: Any) -> int:
    """Add the queue to the deployed app's registry and spawn its ``launch`` function to start consumers now."""
    from .modal_app import config, deployed_function, register_queue

    register_queue(config, queue)
    launch = deployed_function(config, "launch")
    if launch is None:
        sys.stderr.write(
            f"qworker push: error: Modal app {config.app_name!r} is not deployed, so no consumer started:"
            " run 'modal deploy qworker/modal_app.py' and its scheduled launcher runs the queued tasks\n"
        )
        return EXIT_FAILED
    call = launch.spawn(queue)
    console.print(f"spawned the launcher of Modal app {config.app_name!r} for queue {queue!r} (call {call.object_id})")
    return EXIT_OK


def _reduce_on_modal(args: argparse.Namespace) -> int:
    """Run the deployed app's ``reduce`` function on the results Volume and print its report."""
    from .modal_app import config, deployed_function, print_reduce_result

    reduce = deployed_function(config, "reduce")
    if reduce is None:
        raise ConfigError(f"Modal app {config.app_name!r} is not deployed: run 'modal deploy qworker/modal_app.py'")
    result = reduce.remote(args.queue, args.workload or "", args.reset)
    if args.json:
        print(json.dumps({key: value for key, value in result.items() if key != "summary_columns"}, indent=2))
    else:
        print_reduce_result(result)
    return EXIT_OK


async def _recorded_workload(backend: str, layout: Layout, name: str) -> str:
    async with await open_queue(backend, layout, name, create=False) as queue:
        workload = (await queue.metadata()).get("workload")
    if workload is None:
        raise ConfigError(f"queue {name!r} has no recorded workload: pass --workload")
    return workload


# -- argument types ----------------------------------------------------------


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("WARNING")  # warnings such as a producer waiting on a full queue; work sets its own level
    _import_from_current_folder()
    try:
        return args.handler(args)
    except BrokenPipeError:
        # The reader of standard output has gone, as with "qworker status --json | head".
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except QworkerError as exc:
        sys.stderr.write(f"qworker {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except BaseExceptionGroup as group:
        # An error raised inside a task group arrives wrapped in a group.
        matched = group.subgroup(QworkerError)
        if matched is None:
            raise
        first = _first_leaf(matched)
        sys.stderr.write(f"qworker {args.command}: error: {first}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"qworker {args.command}: interrupted\n")
        return EXIT_INTERRUPTED


def _import_from_current_folder() -> None:
    """Let ``--workload module:function`` name a module in the current folder, as ``python -m`` does.

    Spawned consumer processes inherit this search path.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


if __name__ == "__main__":
    sys.exit(main())
