"""Measure how well qworker's shared rate limiter holds a budget, beside a per-process aiolimiter.

Both runs send requests to the local JSON API (``qworker.testing.http_api``)
on 127.0.0.1, which records when each request arrived and responds with 429 above
``rate + burst`` requests in one second:

* qworker: ``qworker push`` of ``rate * duration`` ``http`` tasks (one
  request each) with a budget of ``rate`` and ``burst`` for 127.0.0.1, then
  ``qworker work --processes P --slots S --burst``;
* aiolimiter per process: P processes, each with S coroutines sending
  ``rate * duration`` requests through its own
  ``aiolimiter.AsyncLimiter(rate, 1)`` and no shared state. This is the usual
  single-process set-up copied to several processes, and each process runs
  about as long as the qworker run.

For each run it prints the maximum number of requests in any half-open
1-second window (starting at a request's arrival), that maximum divided by
the rate, the median over the windows that end before the last request (the
steady state), the bound ``rate + burst``, the 429 responses, and the
utilisation: requests / (seconds between first and last request x rate).

With ``--retry-after-s`` the API responds to one request of the qworker run with
429 and that ``Retry-After`` once a third of the requests arrived, and the
run reports how long no request arrived afterwards.

    python benchmarks/rate_limit.py
    python benchmarks/rate_limit.py --processes 4 --slots 8 --rate 50 --burst 5 --duration-s 6 --retry-after-s 2
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qworker.testing.http_api import HOST, HttpApi, RequestRecord, max_in_window, utilisation

QUEUE = "bench-http"
# A run gets this many seconds beyond its expected duration before it is stopped.
RUN_MARGIN_S = 60.0
# Requests granted before a pause reached the bucket may arrive this long after the 429.
STRAGGLER_WINDOW_S = 0.25


class BenchmarkError(RuntimeError):
    """A run that timed out or whose processes exited with an error."""


@dataclass(frozen=True)
class RunResult:
    """Arrivals at the API from one run, with the budget they were measured against."""

    name: str
    records: list[RequestRecord]
    rate: float
    burst: int

    @property
    def arrivals(self) -> list[float]:
        return [record.arrived_at for record in self.records]

    def row(self) -> dict[str, object]:
        arrivals = self.arrivals
        max_window = max_in_window(arrivals)
        return {
            "limiter": self.name,
            "requests": len(arrivals),
            "responses_429": sum(record.status == 429 for record in self.records),
            "max_in_1s": max_window,
            "max_over_rate": round(max_window / self.rate, 3),
            "median_in_1s": median_in_window(arrivals),
            "bound": int(self.rate) + self.burst,
            "utilisation": round(utilisation(arrivals, self.rate), 3),
            "span_s": round(max(arrivals) - min(arrivals), 2) if arrivals else 0.0,
        }


def median_in_window(arrivals: list[float], window_s: float = 1.0) -> int:
    """Return the median number of requests in the windows ``[t, t + window_s)`` that start at a request
    and end before the last one, which leaves out the tail of the run."""
    ordered = sorted(arrivals)
    counts = [bisect.bisect_left(ordered, start + window_s) - index
              for index, start in enumerate(ordered) if start + window_s <= ordered[-1]]
    return int(statistics.median(counts)) if counts else 0


def qworker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qworker", *args]


def run_qworker(args: argparse.Namespace, folder: Path, requests: int) -> tuple[RunResult, PauseEffect | None]:
    """Push ``requests`` http tasks and drain them with consumer processes; return the arrivals and the pause's effect."""
    data_dir = folder / "qworker"
    with HttpApi(limit=int(args.rate) + args.burst) as api:
        job = folder / "job.json"
        job.write_text(json.dumps({
            "queue": QUEUE,
            "workload": "http",
            "config": {"url": api.url, "count": 1},
            "http": {"budgets": {HOST: {"rate": args.rate, "burst": args.burst}}},
        }))
        subprocess.run(qworker_command("push", "--data-dir", str(data_dir), "--job", str(job), "--seeds", f"0:{requests}"),
                       check=True, capture_output=True, timeout=120)

        work = subprocess.Popen(
            qworker_command("work", "--data-dir", str(data_dir), "--queue", QUEUE, "--processes", str(args.processes),
                            "--slots", str(args.slots), "--burst", "--retry-base-s", "0.05",
                            "--log-file", str(data_dir / "logs" / "consumer-{index}.log")),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            if args.retry_after_s:
                _throttle_once(api, work, requests // 3, args.retry_after_s)
            code = work.wait(timeout=args.duration_s + args.retry_after_s + RUN_MARGIN_S)
        except subprocess.TimeoutExpired:
            work.kill()
            work.wait()
            raise BenchmarkError(f"qworker run did not finish within {args.duration_s + RUN_MARGIN_S:.0f} s") from None
        if code != 0:
            raise BenchmarkError(f"qworker work exited with {code}; consumer logs in {data_dir / 'logs'}")
        records = [record for record in api.requests() if record.path == "/records"]
    return RunResult("qworker (shared bucket)", records, args.rate, args.burst), _pause_effect(records)


def _throttle_once(api: HttpApi, work: subprocess.Popen[bytes], after: int, retry_after_s: float) -> None:
    while len(api.requests()) < after:
        if work.poll() is not None:
            return
        time.sleep(0.01)
    api.fail_next(429, retry_after=retry_after_s)


@dataclass(frozen=True)
class PauseEffect:
    """Requests around the first 429: ``stragglers`` arrived within STRAGGLER_WINDOW_S after it.

    ``gap_s`` runs from the 429 to the first request after the stragglers,
    and is None when no request came after them.
    """

    stragglers: int
    gap_s: float | None


def _pause_effect(records: list[RequestRecord]) -> PauseEffect | None:
    throttled = [record.arrived_at for record in records if record.status == 429]
    if not throttled:
        return None
    first = min(throttled)
    later = sorted(record.arrived_at for record in records if record.arrived_at > first)
    stragglers = [arrived for arrived in later if arrived < first + STRAGGLER_WINDOW_S]
    resumed = [arrived for arrived in later if arrived >= first + STRAGGLER_WINDOW_S]
    return PauseEffect(len(stragglers), resumed[0] - first if resumed else None)


def run_aiolimiter_peer(args: argparse.Namespace, requests: int) -> RunResult:
    """Send ``requests`` requests from each process, which limits itself with its own AsyncLimiter.

    Each process sends as many requests as the whole qworker run, so each runs
    about as long as it and the windows in the middle show the steady state.
    """
    with HttpApi(limit=int(args.rate) + args.burst) as api:
        deadline = time.time() + args.duration_s + RUN_MARGIN_S
        children = [
            subprocess.Popen([sys.executable, __file__, "--peer-child", "--url", api.url, "--rate", str(args.rate),
                              "--slots", str(args.slots), "--requests", str(requests), "--deadline", str(deadline)])
            for _ in range(args.processes)
        ]
        try:
            codes = [child.wait(timeout=max(1.0, deadline - time.time() + 5)) for child in children]
        except subprocess.TimeoutExpired:
            for child in children:
                child.kill()
                child.wait()
            raise BenchmarkError("aiolimiter peer did not finish before its deadline") from None
        if any(codes):
            raise BenchmarkError(f"aiolimiter peer processes exited with {codes}")
        records = [record for record in api.requests() if record.path == "/records"]
    return RunResult("aiolimiter per process", records, args.rate, args.burst)


async def peer_child(url: str, rate: float, slots: int, requests: int, deadline: float) -> None:
    """Send ``requests`` requests with ``slots`` coroutines through this process's own AsyncLimiter."""
    import httpx
    from aiolimiter import AsyncLimiter

    limiter = AsyncLimiter(rate, 1.0)
    remaining = iter(range(requests))

    async def slot(client: httpx.AsyncClient) -> None:
        for seed in remaining:
            if time.time() > deadline:
                return
            async with limiter:
                await client.get(f"{url}/records", params={"seed": seed, "count": 1})

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(slot(client) for _ in range(slots)))


def print_report(args: argparse.Namespace, results: list[RunResult], pause: PauseEffect | None) -> None:
    print(f"{args.processes} processes x {args.slots} slots, budget {args.rate:g} per s with burst {args.burst},"
          f" about {args.duration_s:g} s of load at the budget per process, API on {HOST}")
    columns = ["limiter", "requests", "responses_429", "max_in_1s", "max_over_rate", "median_in_1s", "bound",
               "utilisation", "span_s"]
    rows = [result.row() for result in results]
    widths = [max(len(column), *(len(str(row[column])) for row in rows)) for column in columns]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[column]).ljust(width) for column, width in zip(columns, widths)))
    if not args.retry_after_s:
        return
    if pause is None:
        print("no 429 was sent: the run ended before a third of its requests arrived")
    elif pause.gap_s is None:
        print(f"after one 429 with Retry-After {args.retry_after_s:g}: {pause.stragglers} requests within"
              f" {STRAGGLER_WINDOW_S} s, none after them")
    else:
        print(f"after one 429 with Retry-After {args.retry_after_s:g}: {pause.stragglers} requests within"
              f" {STRAGGLER_WINDOW_S} s (granted before the pause was recorded), then none for {pause.gap_s:.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description="Measure the shared rate limiter against a per-process aiolimiter.")
    parser.add_argument("--processes", type=int, default=4, help="consumer processes (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=8, help="slots or coroutines per process (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=50.0, help="budget in requests per second (default: %(default)s)")
    parser.add_argument("--burst", type=int, default=5, help="budget burst in requests (default: %(default)s)")
    parser.add_argument("--duration-s", type=float, default=6.0,
                        help="seconds of load at the budget; each run sends rate x duration requests (default: %(default)s)")
    parser.add_argument("--retry-after-s", type=float, default=0.0,
                        help="respond to one qworker request with 429 and this Retry-After, in seconds (default: none)")
    parser.add_argument("--skip-peer", action="store_true", help="run only qworker, not the aiolimiter peer")
    parser.add_argument("--peer-child", action="store_true", help=argparse.SUPPRESS)  # set for the peer's processes
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.peer_child:
        asyncio.run(peer_child(args.url, args.rate, args.slots, args.requests, args.deadline))
        return 0
    if args.processes < 1 or args.slots < 1 or args.rate <= 0 or args.burst < 0 or args.duration_s <= 0:
        parser.error("use --processes, --slots, --rate and --duration-s above 0 and --burst of 0 or more")

    requests = int(args.rate * args.duration_s)
    with tempfile.TemporaryDirectory(prefix="qworker-rate-limit-") as folder:
        qworker_result, pause = run_qworker(args, Path(folder), requests)
        results = [qworker_result]
        if not args.skip_peer:
            results.append(run_aiolimiter_peer(args, requests))
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print_report(args, results, pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
