"""Count the Modal RPCs and Volume commits that qworker's Modal adapter spends per task.

    python benchmarks/modal_rpcs.py --tasks 10000

Runs N no-op tasks through ``ModalTaskQueue`` with the real modal client
against the local Modal-compatible server (started here on 127.0.0.1): one
producer pushes them, then consumers in this process claim, run and settle
them, with results written as segments to a temporary folder that stands in
for the Volume and a counted commit function standing in for
``modal.Volume.commit``. It prints RPCs per task by method, queue RPCs per
task and Volume commits per task, against the targets of at most 0.05 and
0.01.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import anyio

from qworker.backends.modal_queue import ModalQueueSettings, ModalTaskQueue
from qworker.consumer import Consumer, ConsumerSettings
from qworker.sink import SinkSettings
from qworker.task import Task
from qworker.testing.modal_server import LocalModalServer, close_cached_client, point_client_at
from qworker.workloads import get_workload

QUEUE_RPC_TARGET = 0.05
COMMIT_TARGET = 0.01


async def run(args: argparse.Namespace, server: LocalModalServer, folder: Path) -> dict[str, float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    settings = ModalQueueSettings(tasks_per_item=args.tasks_per_item, partitions=args.partitions)
    producer = await ModalTaskQueue.open(name, folder / "dead_letters", settings)
    server.reset_counts()

    started = time.perf_counter()
    await producer.put([Task.create(seed, {}) for seed in range(args.tasks)])
    pushed = time.perf_counter()
    push_counts = Counter(server.rpc_counts())

    commits = await consume(args, name, settings, folder)
    finished = time.perf_counter()
    counts = Counter(server.rpc_counts())
    stats = await producer.stats()
    if stats.done != args.tasks:
        raise SystemExit(f"only {stats.done} of {args.tasks} tasks finished")
    return report(args, counts, push_counts, commits, pushed - started, finished - pushed)


async def consume(args: argparse.Namespace, name: str, settings: ModalQueueSettings, folder: Path) -> int:
    """Run ``args.consumers`` burst consumers in this process; return the Volume commits they made."""
    commits = 0

    async def commit() -> None:
        nonlocal commits
        commits += 1

    consumer_settings = ConsumerSettings(
        slots=args.slots, burst=True, scratch_root=folder / "scratch",
        sink=SinkSettings(batch_rows=args.batch_rows, batch_s=1.0, commit_every=args.commit_every, commit_s=5.0),
    )
    async with anyio.create_task_group() as group:
        for _ in range(args.consumers):
            queue = await ModalTaskQueue.open(name, folder / "dead_letters", settings)
            consumer = Consumer(queue, get_workload("noop"), folder / "results", consumer_settings, commit=commit)
            group.start_soon(consumer.run)
    return commits


def report(
    args: argparse.Namespace, counts: Counter, push_counts: Counter, commits: int, push_s: float, consume_s: float
) -> dict[str, float]:
    queue_rpcs = sum(count for method, count in counts.items() if method.startswith("Queue"))
    dict_rpcs = sum(count for method, count in counts.items() if method.startswith("Dict"))
    print(f"{args.tasks} no-op tasks, {args.consumers} consumers x {args.slots} slots, "
          f"{args.tasks_per_item} tasks per item, {args.partitions} partitions, segments of {args.batch_rows} rows")
    print(f"push {push_s:.2f} s, consume {consume_s:.2f} s ({args.tasks / consume_s:,.0f} tasks/s)")
    print()
    print(f"{'method':<20} {'calls':>8} {'push':>8} {'per task':>10}")
    for method, count in sorted(counts.items()):
        print(f"{method:<20} {count:>8} {push_counts.get(method, 0):>8} {count / args.tasks:>10.4f}")
    print()
    per_task = {
        "queue_rpcs_per_task": queue_rpcs / args.tasks,
        "dict_rpcs_per_task": dict_rpcs / args.tasks,
        "volume_commits_per_task": commits / args.tasks,
    }
    print(f"queue RPCs per task:     {per_task['queue_rpcs_per_task']:.4f} (target at most {QUEUE_RPC_TARGET})")
    print(f"Dict RPCs per task:      {per_task['dict_rpcs_per_task']:.4f} (no target)")
    print(f"Volume commits per task: {per_task['volume_commits_per_task']:.4f} (target at most {COMMIT_TARGET})")
    return per_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000, help="no-op tasks to run (default: %(default)s)")
    parser.add_argument("--consumers", type=int, default=2, help="consumers in this process (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=4, help="slots per consumer (default: %(default)s)")
    parser.add_argument("--tasks-per-item", type=int, default=100, help="tasks packed per queue item (default: %(default)s)")
    parser.add_argument("--partitions", type=int, default=8, help="partitions per lane (default: %(default)s)")
    parser.add_argument("--batch-rows", type=int, default=1000, help="rows per result segment (default: %(default)s)")
    parser.add_argument("--commit-every", type=int, default=500, help="results per Volume commit (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="qworker-modal-rpcs-") as folder, LocalModalServer() as server:
        point_client_at(server.url)
        try:
            per_task = anyio.run(run, args, server, Path(folder))
        finally:
            close_cached_client()
    met = per_task["queue_rpcs_per_task"] <= QUEUE_RPC_TARGET and per_task["volume_commits_per_task"] <= COMMIT_TARGET
    print("targets met" if met else "targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
