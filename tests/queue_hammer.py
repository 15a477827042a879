"""Producer and consumer processes that hammer one SQLite queue file at once.

tests/test_queue_contract.py starts several of these as subprocesses:

    python tests/queue_hammer.py produce DB_PATH --tasks 3000 --batch 50
    python tests/queue_hammer.py consume DB_PATH OWNER CLAIMS_FILE --batch 7 --lease-s 5

A consumer appends one ``task_id attempt owner`` line per claimed task to
CLAIMS_FILE before it acks the batch. It exits when the queue metadata has
``producer_done`` set and no task is pending, so the test sets that key itself
when no producer process runs. Any error ends the process with a traceback on
stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import anyio

from qworker.backends.sqlite import SqliteQueue
from qworker.task import Task

QUEUE_NAME = "hammer"
PRODUCER_DONE_KEY = "producer_done"

# How long a consumer waits before it claims again after an empty claim.
IDLE_POLL_S = 0.005


def hammer_task(index: int) -> Task:
    """Build task number ``index``, so the producer and the test derive the same task ids."""
    return Task.create(index, {"index": index}, task_id=f"t{index:05d}")


async def produce(path: Path, task_count: int, batch: int) -> None:
    """Push ``task_count`` tasks in batches of ``batch``, then set ``producer_done``."""
    async with SqliteQueue(path, QUEUE_NAME) as queue:
        for start in range(0, task_count, batch):
            tasks = [hammer_task(index) for index in range(start, min(start + batch, task_count))]
            await queue.put(tasks)
            await anyio.sleep(random.uniform(0, 0.002))
        await queue.set_metadata({PRODUCER_DONE_KEY: True})


async def consume(path: Path, owner: str, claims_path: Path, batch: int, lease_s: float) -> None:
    """Claim, record and ack batches until the producer is done and nothing is pending."""
    async with SqliteQueue(path, QUEUE_NAME) as queue:
        with claims_path.open("a", encoding="utf-8") as claims:
            while True:
                leases = await queue.claim(owner, batch, lease_s)
                if not leases:
                    # The producer sets producer_done after its last put. Reading it
                    # before has_pending means no task can arrive after the check.
                    producer_done = (await queue.metadata()).get(PRODUCER_DONE_KEY, False)
                    if producer_done and not await queue.has_pending():
                        return
                    await anyio.sleep(IDLE_POLL_S)
                    continue

                for lease in leases:
                    claims.write(f"{lease.task_id} {lease.task.attempt} {lease.owner}\n")
                claims.flush()
                await anyio.sleep(random.uniform(0, 0.002))
                await queue.ack(leases)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    producer = commands.add_parser("produce", help="push tasks, then set producer_done in the queue metadata")
    producer.add_argument("db_path", type=Path)
    producer.add_argument("--tasks", type=int, required=True, help="number of tasks to push")
    producer.add_argument("--batch", type=int, default=50, help="tasks per put call")

    consumer = commands.add_parser("consume", help="claim and ack tasks until the queue is drained")
    consumer.add_argument("db_path", type=Path)
    consumer.add_argument("owner", help="lease owner id of this process")
    consumer.add_argument("claims_path", type=Path, help="file that receives one line per claimed task")
    consumer.add_argument("--batch", type=int, default=7, help="maximum tasks per claim")
    consumer.add_argument("--lease-s", type=float, default=5.0, help="lease time in seconds")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.command == "produce":
        anyio.run(produce, args.db_path, args.tasks, args.batch)
    else:
        anyio.run(consume, args.db_path, args.owner, args.claims_path, args.batch, args.lease_s)


if __name__ == "__main__":
    main(sys.argv[1:])
