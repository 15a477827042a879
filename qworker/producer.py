"""Pushing tasks: from a job and seed range, in batches, with progress callbacks."""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

from .errors import ConfigError
from .jobs import JobSpec
from .queue import PutResult, TaskQueue
from .task import Task

logger = logging.getLogger("qworker.producer")

PUSH_BATCH = 5000

# Queue metadata that ``qworker drain`` sets so producers stop pushing.
INTAKE_KEY = "intake"
INTAKE_CLOSED = "closed"
INTAKE_OPEN = "open"

ProgressCallback = Callable[[int], None]


async def push_tasks(
    queue: TaskQueue,
    tasks: Iterable[Task],
    *,
    batch_size: int = PUSH_BATCH,
    on_progress: ProgressCallback | None = None,
) -> PutResult:
    """Push tasks in batches of ``batch_size``; ``on_progress`` gets the number sent after each batch."""
    added = duplicates = 0
    batch: list[Task] = []
    for task in tasks:
        batch.append(task)
        if len(batch) >= batch_size:
            result = await _push_batch(queue, batch, on_progress)
            added, duplicates = added + result.added, duplicates + result.duplicates
            batch = []
    if batch:
        result = await _push_batch(queue, batch, on_progress)
        added, duplicates = added + result.added, duplicates + result.duplicates
    return PutResult(added=added, duplicates=duplicates)


async def _push_batch(queue: TaskQueue, batch: list[Task], on_progress: ProgressCallback | None) -> PutResult:
    result = await queue.put(batch)
    logger.debug("pushed batch queue=%s added=%d duplicates=%d", queue.name, result.added, result.duplicates)
    if on_progress is not None:
        on_progress(len(batch))
    return result


async def push_job(
    queue: TaskQueue,
    job: JobSpec,
    seeds: Sequence[int],
    *,
    on_progress: ProgressCallback | None = None,
) -> PutResult:
    """Record the job's workload on the queue, then push one task per seed and variant."""
    return await push_job_tasks(queue, job, job.tasks(seeds), on_progress=on_progress)


async def push_job_tasks(
    queue: TaskQueue,
    job: JobSpec,
    tasks: Iterable[Task],
    *,
    on_progress: ProgressCallback | None = None,
) -> PutResult:
    """Record the job's workload and HTTP settings on the queue, then push ``tasks``."""
    metadata = await queue.metadata()
    if metadata.get(INTAKE_KEY) == INTAKE_CLOSED:
        raise ConfigError(
            f"queue {queue.name!r} is draining and accepts no tasks: run 'qworker resume --queue {queue.name}'"
            " to open it again"
        )
    recorded = metadata.get("workload")
    if recorded is not None and recorded != job.workload:
        raise ConfigError(
            f"queue {queue.name!r} runs workload {recorded!r}, not {job.workload!r}: push to another queue"
        )
    await queue.set_metadata({"workload": job.workload, "http": job.http.to_mapping()})
    result = await push_tasks(queue, tasks, on_progress=on_progress)
    logger.info("pushed queue=%s added=%d duplicates=%d", queue.name, result.added, result.duplicates)
    return result
