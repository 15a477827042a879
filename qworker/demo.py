"""``qworker demo``: the Monte Carlo job end to end on one machine.

It pushes one task per seed and contract, runs consumer processes in burst
mode while drawing a progress bar from the queue's counts, reduces the
results, and checks every contract's price against its closed form. With
``--backend modal-local`` the same job runs through the Modal adapter against
a Modal-compatible server that the demo starts on 127.0.0.1, with results in
a local folder standing in for the Volume.

``--workload http`` runs the API-bound workload instead. It starts a JSON API
on 127.0.0.1 that responds with 429 above ``--rate`` requests per second and
gives the job a budget of that rate. It then checks that the API saw no 429
and no second with more requests than the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import anyio
import pyarrow as pa
from rich.console import Console

from . import render
from .backends import MODAL_LOCAL, SQLITE, open_queue
from .errors import ConfigError
from .consumer import ConsumerSettings
from .jobs import job_from_mapping
from .layout import Layout
from .pool import ConsumerPool, ConsumerSpec, forward_stop_signals
from .producer import push_job
from .reducer import Reducer
from .sink import SinkSettings

DEMO_QUEUE = "demo"
MONTECARLO_DEMO, HTTP_DEMO = "montecarlo", "http"
MAX_ABS_Z = 4.0
# Seconds between progress updates. A count on the Modal adapter scans the
# whole ledger, so it is read less often there.
POLL_S = {SQLITE: 0.2, MODAL_LOCAL: 1.0}


@dataclass(frozen=True)
class DemoOutcome:
    """What the demo checks: every contract has all its tasks and a price near its closed form."""

    summary: pa.Table
    tasks_expected_per_contract: int
    elapsed_s: float
    tasks: int

    expected_contracts: tuple[str, ...] = ()

    @property
    def failures(self) -> list[str]:
        rows = self.summary.to_pylist()
        found = {row["contract"] for row in rows}
        problems = [f"{name}: no results counted" for name in self.expected_contracts if name not in found]
        for row in rows:
            if row["tasks"] != self.tasks_expected_per_contract:
                problems.append(f"{row['contract']}: {row['tasks']} tasks counted, expected {self.tasks_expected_per_contract}")
            if abs(row["z_score"]) > MAX_ABS_Z:
                problems.append(f"{row['contract']}: price {row['price']:.4f} is {row['z_score']:.1f} standard errors from {row['closed_form']:.4f}")
        return problems


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .arguments import positive_int

    parser.add_argument("--seeds", type=positive_int, default=500, help="seeds: per contract for montecarlo, tasks for http (default: %(default)s)")
    parser.add_argument("--paths", type=positive_int, default=20000, help="simulated paths per task (default: %(default)s)")
    parser.add_argument("--processes", type=positive_int, default=2, help="consumer processes (default: %(default)s)")
    parser.add_argument("--slots", type=positive_int, default=4, help="slots per consumer process (default: %(default)s)")
    parser.add_argument("--batch-rows", type=int, default=0,
                        help="write results as segments of this many rows; 0: one file per task (default)")
    parser.add_argument("--json", action="store_true", help="print the final summary as JSON")
    parser.add_argument("--workload", choices=(MONTECARLO_DEMO, HTTP_DEMO), default=MONTECARLO_DEMO,
                        help="montecarlo: price options with torch; http: fetch records from a local API under a"
                             " rate limit, one task per seed (default: %(default)s)")
    parser.add_argument("--rate", type=positive_int, default=50,
                        help="http workload: requests per second that the local API allows and the job's budget"
                             " grants (default: %(default)s)")


def run_demo(args: argparse.Namespace) -> int:
    if args.workload == HTTP_DEMO:
        return run_http_demo(args)
    if args.backend not in (SQLITE, MODAL_LOCAL):
        raise ConfigError(f"the demo runs consumers on this machine: use --backend {SQLITE} or {MODAL_LOCAL}, not {args.backend!r}")
    with _backend_server(args.backend):
        return _run_demo(args)


@contextlib.contextmanager
def _backend_server(backend: str) -> Iterator[None]:
    """Start the local Modal-compatible server for ``modal-local``; consumer processes inherit its address."""
    if backend != MODAL_LOCAL:
        yield
        return

    from .testing.modal_server import LocalModalServer, close_cached_client, point_client_at

    with LocalModalServer() as server:
        point_client_at(server.url)
        try:
            yield
        finally:
            close_cached_client()


def _run_demo(args: argparse.Namespace) -> int:
    from .cli import EXIT_FAILED, EXIT_OK
    from .workloads.montecarlo import DEFAULT_CONTRACTS, WORKLOAD

    console = render.make_console(stderr=True)
    layout = Layout(args.data_dir)
    backend = args.backend
    job = job_from_mapping(
        {"queue": DEMO_QUEUE, "workload": WORKLOAD.name, "config": {"paths": args.paths}, "variants": DEFAULT_CONTRACTS},
        source="demo",
    )
    seeds = range(args.seeds)
    total = job.count(seeds)

    started = time.perf_counter()
    _remove_previous_run(backend, layout)
    anyio.run(_push, backend, layout, job, seeds)
    where = layout.db_path if backend == SQLITE else "the local Modal server"
    console.print(f"pushed {total} tasks ({len(job.configs)} contracts x {args.seeds} seeds, {args.paths} paths each) "
                  f"to {where}")

    spec = ConsumerSpec(
        data_dir=layout.data_dir,
        queue=DEMO_QUEUE,
        workload=WORKLOAD.name,
        settings=ConsumerSettings(slots=args.slots, burst=True, scratch_root=layout.scratch_dir,
                                  sink=SinkSettings(batch_rows=args.batch_rows)),
        backend=backend,
        log_file=layout.logs_dir / "consumer-{index}.log",
        with_solo=True,
    )
    exit_code = _run_with_progress(console, layout, spec, args.processes, total)
    elapsed_s = time.perf_counter() - started

    report = Reducer(layout.results_dir(DEMO_QUEUE), WORKLOAD.aggregation).run()
    contracts = tuple(contract["contract"] for contract in DEFAULT_CONTRACTS)
    outcome = DemoOutcome(WORKLOAD.summarize(report.aggregate), args.seeds, elapsed_s, total, contracts)
    _print_outcome(args, outcome, report)

    if exit_code != 0 or outcome.failures:
        return EXIT_FAILED
    return EXIT_OK


def _remove_previous_run(backend: str, layout: Layout) -> None:
    """Start from an empty demo queue, so the demo can run again in the same folder."""
    anyio.run(_purge, backend, layout)
    shutil.rmtree(layout.results_dir(DEMO_QUEUE), ignore_errors=True)
    shutil.rmtree(layout.logs_dir, ignore_errors=True)


async def _purge(backend: str, layout: Layout) -> None:
    async with await open_queue(backend, layout, DEMO_QUEUE) as queue:
        await queue.purge()


async def _push(backend: str, layout: Layout, job: Any, seeds: range) -> None:
    async with await open_queue(backend, layout, DEMO_QUEUE) as queue:
        await push_job(queue, job, seeds)


def _run_with_progress(console: Console, layout: Layout, spec: ConsumerSpec, processes: int, total: int) -> int:
    """Run the consumer processes while drawing progress from the queue's counts."""
    pool = ConsumerPool(spec, processes)
    with forward_stop_signals(pool), render.progress_bar(console, "running", total) as advance:
        pool.start()
        finished = 0
        while not pool.wait(POLL_S[spec.backend]):
            finished += _advance(spec.backend, layout, advance, finished)
        _advance(spec.backend, layout, advance, finished)
    return pool.exit_code()


def _advance(backend: str, layout: Layout, advance: Callable[[int], None], finished: int) -> int:
    stats = anyio.run(_stats, backend, layout)
    step = stats.done + stats.dead - finished
    advance(step)
    return step


async def _stats(backend: str, layout: Layout) -> Any:
    async with await open_queue(backend, layout, DEMO_QUEUE) as queue:
        return await queue.stats()


def _print_outcome(args: argparse.Namespace, outcome: DemoOutcome, report: Any) -> None:
    rate = outcome.tasks / outcome.elapsed_s if outcome.elapsed_s else 0.0
    if args.json:
        print(json.dumps({
            "contracts": outcome.summary.to_pylist(),
            "tasks": outcome.tasks,
            "elapsed_s": round(outcome.elapsed_s, 3),
            "tasks_per_s": round(rate, 1),
            "quarantined": len(report.quarantined),
            "failures": outcome.failures,
        }, indent=2))
        return

    console = render.make_console()
    render.print_table(console, "Monte Carlo prices against closed form", outcome.summary)
    console.print(f"{outcome.tasks} tasks in {outcome.elapsed_s:.1f} s ({rate:.0f} tasks/s), "
                  f"consumer logs in {Path(args.data_dir) / 'logs'}")
    if outcome.failures:
        for problem in outcome.failures:
            console.print(f"[red]check failed[/red] {problem}")
    else:
        console.print(f"[green]check passed[/green]: every contract has {outcome.tasks_expected_per_contract} tasks "
                      f"and a price within {MAX_ABS_Z:.0f} standard errors of its closed form")


# -- the http workload: rate-limited requests to a local API ---------------------

HTTP_DEMO_QUEUE = "demo-http"
HTTP_DEMO_RECORDS = 10  # records each task requests


def run_http_demo(args: argparse.Namespace) -> int:
    """Run the http workload against a local API that responds with 429 above ``args.rate`` requests per second.

    The job's budget for 127.0.0.1 equals the API's limit with no burst, so
    every 429 means the shared rate limiter let too many requests through.
    Return 1 when the API sent any 429 or a task did not finish.
    """
    from .cli import EXIT_FAILED, EXIT_OK
    from .testing.http_api import HOST, HttpApi
    from .workloads.http_enrich import WORKLOAD

    if args.backend != SQLITE:
        raise ConfigError(f"the http demo keeps its rate limit bucket in the SQLite file: use --backend {SQLITE}")
    console = render.make_console(stderr=True)
    layout = Layout(args.data_dir)
    total = args.seeds

    with HttpApi(limit=args.rate) as api:
        job = job_from_mapping(
            {
                "queue": HTTP_DEMO_QUEUE,
                "workload": WORKLOAD.name,
                "config": {"url": api.url, "count": HTTP_DEMO_RECORDS},
                "http": {"budgets": {HOST: {"rate": args.rate, "burst": 0}}},
            },
            source="demo",
        )
        started = time.perf_counter()
        _remove_previous_http_run(layout)
        anyio.run(_push_http_job, layout, job, range(total))
        console.print(f"pushed {total} tasks ({HTTP_DEMO_RECORDS} records each) to {layout.db_path}; "
                      f"local API at {api.url} responds with 429 above {args.rate} requests per second")

        spec = ConsumerSpec(
            data_dir=layout.data_dir,
            queue=HTTP_DEMO_QUEUE,
            workload=WORKLOAD.name,
            settings=ConsumerSettings(slots=args.slots, burst=True, scratch_root=layout.scratch_dir),
            log_file=layout.logs_dir / "http-consumer-{index}.log",
        )
        exit_code = _run_http_consumers(console, layout, spec, args.processes, total)
        elapsed_s = time.perf_counter() - started
        arrivals = api.arrival_times()
        statuses = api.status_counts()

    queue_stats = anyio.run(_queue_stats, layout, HTTP_DEMO_QUEUE)
    report = Reducer(layout.results_dir(HTTP_DEMO_QUEUE), WORKLOAD.aggregation).run()
    outcome = _http_outcome(args, arrivals, statuses, queue_stats, total, elapsed_s)
    _print_http_outcome(args, outcome, report.aggregate)

    if exit_code != 0 or outcome["failures"]:
        return EXIT_FAILED
    return EXIT_OK


def _remove_previous_http_run(layout: Layout) -> None:
    anyio.run(_purge_queue, layout, HTTP_DEMO_QUEUE)
    shutil.rmtree(layout.results_dir(HTTP_DEMO_QUEUE), ignore_errors=True)
    for log in layout.logs_dir.glob("http-consumer-*.log"):
        log.unlink()


async def _purge_queue(layout: Layout, name: str) -> None:
    async with await open_queue(SQLITE, layout, name) as queue:
        await queue.purge()


async def _push_http_job(layout: Layout, job: Any, seeds: range) -> None:
    async with await open_queue(SQLITE, layout, HTTP_DEMO_QUEUE) as queue:
        await push_job(queue, job, seeds)


async def _queue_stats(layout: Layout, name: str) -> Any:
    async with await open_queue(SQLITE, layout, name) as queue:
        return await queue.stats()


def _run_http_consumers(console: Console, layout: Layout, spec: ConsumerSpec, processes: int, total: int) -> int:
    """Run the consumer processes while drawing progress from the queue's finished count."""
    pool = ConsumerPool(spec, processes)
    with forward_stop_signals(pool), render.progress_bar(console, "running", total) as advance:
        pool.start()
        finished = 0
        while True:
            stopped = pool.wait(POLL_S[SQLITE])
            stats = anyio.run(_queue_stats, layout, spec.queue)
            advance(stats.done + stats.dead - finished)
            finished = stats.done + stats.dead
            if stopped:
                break
    return pool.exit_code()


def _http_outcome(args: argparse.Namespace, arrivals: list[float], statuses: Any, queue_stats: Any, total: int,
                  elapsed_s: float) -> dict[str, Any]:
    from .testing.http_api import max_in_window, utilisation

    throttled = statuses.get(429, 0)
    max_window = max_in_window(arrivals)
    failures = []
    if throttled:
        failures.append(f"the API sent {throttled} responses with status 429: the rate limiter let too many requests through")
    if max_window > args.rate:
        failures.append(f"{max_window} requests arrived within one second, above the budget of {args.rate}")
    if queue_stats.done != total:
        failures.append(f"{queue_stats.done} of {total} tasks done, {queue_stats.dead} dead")
    return {
        "tasks": total,
        "done": queue_stats.done,
        "dead": queue_stats.dead,
        "elapsed_s": round(elapsed_s, 3),
        "requests": len(arrivals),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "responses_429": throttled,
        "budget_rate": args.rate,
        "budget_burst": 0,
        "max_requests_in_1s_window": max_window,
        "utilisation": round(utilisation(arrivals, args.rate), 4),
        "failures": failures,
    }


def _print_http_outcome(args: argparse.Namespace, outcome: dict[str, Any], aggregate: pa.Table) -> None:
    if args.json:
        print(json.dumps(outcome, indent=2))
        return

    console = render.make_console()
    render.print_table(console, "records by category", aggregate)
    console.print(f"{outcome['done']} of {outcome['tasks']} tasks done, {outcome['dead']} dead, in "
                  f"{outcome['elapsed_s']:.1f} s; consumer logs in {Path(args.data_dir) / 'logs'}")
    console.print(f"requests sent: {outcome['requests']}, 429 responses: {outcome['responses_429']}")
    console.print(f"max requests in any 1 s window: {outcome['max_requests_in_1s_window']}, "
                  f"budget {outcome['budget_rate']} per s with burst {outcome['budget_burst']}")
    console.print(f"utilisation: {outcome['utilisation']:.1%} of the budget between the first and the last request")
    if outcome["failures"]:
        for problem in outcome["failures"]:
            console.print(f"[red]check failed[/red] {problem}")
    else:
        console.print("[green]check passed[/green]: no 429 and no 1 s window above the budget")
