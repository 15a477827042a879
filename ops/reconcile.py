"""Deliver again the done tasks whose result file is missing or unreadable.

    python ops/reconcile.py --queue montecarlo

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
from qworker.results import result_task_ids


async def reconcile(data_dir: Path, queue_name: str) -> int:
    layout = Layout(data_dir)
    async with await open_existing_queue(layout.db_path, queue_name) as queue:
        missing = await queue.done_task_ids() - result_task_ids(layout.results_dir(queue_name))
        return await queue.requeue_done(sorted(missing)) if missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", required=True, help="queue name")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding the queue file")
    args = parser.parse_args()
    try:
        count = anyio.run(reconcile, args.data_dir, args.queue)
    except QworkerError as exc:
        print(f"reconcile: error: {exc}", file=sys.stderr)
        return 2
    print(f"queue {args.queue}: delivered {count} done tasks without a result again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
