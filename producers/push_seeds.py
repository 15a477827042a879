"""Push one task per seed and variant of a job file to the embedded queue.

    python producers/push_seeds.py --job producers/montecarlo.toml --seeds 0:500

A small script to copy and adapt: it uses qworker's library directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from qworker.backends.sqlite import SqliteQueue
from qworker.errors import QworkerError
from qworker.jobs import load_job, parse_seeds
from qworker.layout import DEFAULT_DATA_DIR, Layout
from qworker.producer import push_job


async def push(job_path: Path, seed_text: str | None, data_dir: Path) -> None:
    job = load_job(job_path)
    seeds = parse_seeds(seed_text or job.seeds or "")
    async with SqliteQueue(Layout(data_dir).db_path, job.queue) as queue:
        result = await push_job(queue, job, seeds)
    print(f"queue {job.queue}: pushed {result.added}, skipped {result.duplicates} already in the queue")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, required=True, help="job file (TOML or JSON)")
    parser.add_argument("--seeds", help="seed range START:STOP; default: the job's 'seeds'")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding the queue file")
    args = parser.parse_args()
    try:
        anyio.run(push, args.job, args.seeds, args.data_dir)
    except QworkerError as exc:
        print(f"push_seeds: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
