"""Deliver dead letters again after a fix, optionally only those whose error contains some text.

    python ops/requeue_dead.py --queue montecarlo --match "CUDA out of memory"

A small script to copy and adapt: it uses qworker's library directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from qworker.backends.sqlite import open_existing_queue
from qworker.errors import QworkerError
from qworker.layout import DEFAULT_DATA_DIR, Layout


async def requeue(data_dir: Path, queue_name: str, match: str | None) -> int:
    async with await open_existing_queue(Layout(data_dir).db_path, queue_name) as queue:
        letters = await queue.dead_letters(limit=1_000_000)
        chosen = [letter.task.task_id for letter in letters if match is None or match in letter.error]
        return await queue.requeue_dead(chosen) if chosen else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", required=True, help="queue name")
    parser.add_argument("--match", help="only dead letters whose error contains this text (default: all)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding the queue file")
    args = parser.parse_args()
    try:
        count = anyio.run(requeue, args.data_dir, args.queue, args.match)
    except QworkerError as exc:
        print(f"requeue_dead: error: {exc}", file=sys.stderr)
        return 2
    print(f"queue {args.queue}: requeued {count} dead letters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
