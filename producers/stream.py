"""Push JSON task records from standard input or a growing file to the embedded queue, in batches.

    tail -F tasks.jsonl | python producers/stream.py --job job.toml
    python producers/stream.py --job job.toml --follow tasks.jsonl --checkpoint tasks.ck

One JSON object per line, with the same keys as a JSONL task file. With
--follow and --checkpoint, a restarted producer resumes after the last pushed
line, and task ids already in the queue are skipped. A small script to copy
and adapt: it uses qworker's library directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from qworker.backends.sqlite import SqliteQueue
from qworker.errors import QworkerError
from qworker.jobs import load_job
from qworker.layout import DEFAULT_DATA_DIR, Layout
from qworker.stream import StreamOptions, stream_tasks


async def stream(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    options = StreamOptions(batch_size=args.batch, high_water=args.high_water, checkpoint=args.checkpoint)
    async with SqliteQueue(Layout(args.data_dir).db_path, job.queue) as queue:
        summary = await stream_tasks(queue, job, follow=args.follow,
                                     stdin=None if args.follow else sys.stdin.buffer, options=options)
    print(f"queue {job.queue}: pushed {summary.added}, skipped {summary.duplicates} already in the queue,"
          f" rejected {summary.rejected}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, required=True, help="job file (TOML or JSON): queue, workload, base config")
    parser.add_argument("--follow", type=Path, help="file to follow; without it, read standard input")
    parser.add_argument("--checkpoint", type=Path, help="with --follow: file storing the resume offset")
    parser.add_argument("--batch", type=int, default=500, help="records per push (default: %(default)s)")
    parser.add_argument("--high-water", type=int, help="wait while the queue holds this many waiting tasks or more")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding the queue file")
    args = parser.parse_args()
    try:
        return anyio.run(stream, args)
    except QworkerError as exc:
        print(f"stream: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
