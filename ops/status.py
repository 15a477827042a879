"""Print a queue's task counts, once or every few seconds.

    python ops/status.py --queue montecarlo --every 2

A small script to copy and adapt: it uses qworker's library directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anyio

from qworker.backends.sqlite import open_existing_queue
from qworker.errors import QworkerError
from qworker.layout import DEFAULT_DATA_DIR, Layout
from qworker.queue import QueueStats


async def read_stats(data_dir: Path, queue_name: str) -> QueueStats:
    async with await open_existing_queue(Layout(data_dir).db_path, queue_name) as queue:
        return await queue.stats()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", required=True, help="queue name")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding the queue file")
    parser.add_argument("--every", type=float, default=0, help="repeat every this many seconds (0: once)")
    args = parser.parse_args()
    try:
        while True:
            stats = anyio.run(read_stats, args.data_dir, args.queue)
            print(json.dumps({"time": round(time.time(), 1), "queue": args.queue, **stats.as_dict()}), flush=True)
            if args.every <= 0:
                return 0
            time.sleep(args.every)
    except QworkerError as exc:
        print(f"status: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
