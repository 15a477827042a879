"""Push one task per row of a CSV, JSONL or parquet file to the embedded queue.

    python producers/push_file.py --job job.toml --from tasks.csv

The job file names the queue and workload and gives the base config that
each row's config is merged over. Any invalid row stops the push before
anything is sent, naming the file, line and field. A small script to copy
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
from qworker.producer import push_job_tasks
from qworker.sources import read_task_file
from qworker.workloads import get_workload


async def push(job_path: Path, task_file: Path, data_dir: Path) -> int:
    job = load_job(job_path)
    source = read_task_file(task_file, base_config=job.configs[0], workload=get_workload(job.workload),
                            max_attempts=job.max_attempts, lane=job.lane)
    for row in source.rejected:
        print(f"push_file: invalid row: {row}", file=sys.stderr)
    if source.rejected:
        print(f"push_file: {len(source.rejected)} invalid rows, nothing pushed", file=sys.stderr)
        return 2

    async with SqliteQueue(Layout(data_dir).db_path, job.queue) as queue:
        result = await push_job_tasks(queue, job, source.tasks)
    print(f"queue {job.queue}: pushed {result.added}, skipped {result.duplicates} already in the queue")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, required=True, help="job file (TOML or JSON): queue, workload, base config")
    parser.add_argument("--from", dest="task_file", type=Path, required=True, help="CSV, JSONL or parquet task file")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding the queue file")
    args = parser.parse_args()
    try:
        return anyio.run(push, args.job, args.task_file, args.data_dir)
    except QworkerError as exc:
        print(f"push_file: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
