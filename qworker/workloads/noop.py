"""Workloads that do no real work, for measuring the queue's own overhead."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Mapping

import anyio

from ..errors import ConfigError
from .base import Workload

if TYPE_CHECKING:
    from ..context import TaskContext
    from ..task import Task

DEFAULT_SLEEP_S = 0.1


async def handle(task: Task, ctx: TaskContext) -> None:
    """Return at once, so a run measures only claiming, acknowledging and bookkeeping."""
    return None


def validate_sleep_config(config: Mapping[str, Any]) -> None:
    """Raise ConfigError unless ``sleep_s``, if given, is a finite number of seconds of 0 or more."""
    sleep_s = config.get("sleep_s", DEFAULT_SLEEP_S)
    if isinstance(sleep_s, bool) or not isinstance(sleep_s, (int, float)) or not math.isfinite(sleep_s) or sleep_s < 0:
        raise ConfigError(f"invalid config value sleep_s={sleep_s!r}: use a number of seconds of 0 or more")


async def sleep_handle(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Sleep for ``sleep_s`` seconds without blocking the event loop and return the measured time."""
    started = time.monotonic()
    await anyio.sleep(task.config.get("sleep_s", DEFAULT_SLEEP_S))
    return {"seed": task.seed, "slept_s": time.monotonic() - started}


WORKLOAD = Workload(
    name="noop",
    handler=handle,
    description="Return at once with no result, to measure queue throughput.",
)

SLEEP_WORKLOAD = Workload(
    name="sleep",
    handler=sleep_handle,
    validate_config=validate_sleep_config,
    description=f"Sleep for config sleep_s seconds (default {DEFAULT_SLEEP_S}) to simulate I/O-bound tasks.",
)
