"""Close a queue to producers and wait until nothing waits or runs.

    python ops/drain.py --queue montecarlo --timeout-s 600

Exits 0 once drained and 1 if the timeout passes first. Intake stays closed
until `qworker resume --queue NAME`. A small script to copy and adapt: it
uses qworker's library directly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anyio

from qworker.backends.sqlite import open_existing_queue
from qworker.errors import QworkerError
from qworker.layout import DEFAULT_DATA_DIR, Layout
from qworker.producer import INTAKE_CLOSED, INTAKE_KEY


async def drain(data_dir: Path, queue_name: str, timeout_s: float) -> int:
    """Return the number of tasks still pending when the wait ended."""
    async with await open_existing_queue(Layout(data_dir).db_path, queue_name) as queue:
        await queue.set_metadata({INTAKE_KEY: INTAKE_CLOSED})
        deadline = time.monotonic() + timeout_s
        while (stats := await queue.stats()).pending and time.monotonic() < deadline:
            print(f"waiting: {stats.depth} waiting, {stats.in_flight} in flight", flush=True)
            await anyio.sleep(2.0)
        return stats.pending


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", required=True, help="queue name")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding the queue file")
    args = parser.parse_args()
    try:
        pending = anyio.run(drain, args.data_dir, args.queue, args.timeout_s)
    except QworkerError as exc:
        print(f"drain: error: {exc}", file=sys.stderr)
        return 2
    print(f"queue {args.queue}: " + (f"{pending} tasks still pending" if pending else "drained"))
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main())
