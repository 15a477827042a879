"""arq on Redis: the no-op job, worker settings for each variant, and the producer.

``PEERS_REDIS_URL`` names the Redis server. Both settings classes set
``keep_result = 0``, so arq stores no job results. The tuned variant passes
``arq_peer.QUIET_LOG_CONFIG`` to ``arq --custom-log-dict`` to drop arq's
per-job INFO lines.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings

from completion import mark_ready, record_finish

REDIS_SETTINGS = RedisSettings.from_dsn(os.environ["PEERS_REDIS_URL"])
TUNED_MAX_JOBS = 100
TUNED_POLL_DELAY_S = 0.01
ENQUEUE_CONCURRENCY = 50


async def noop(ctx: dict[str, Any], seed: int) -> None:
    record_finish()


async def announce_ready(ctx: dict[str, Any]) -> None:
    mark_ready()


# arq 0.28 reads only the attributes defined on a settings class itself (its
# __dict__), not inherited ones, so each class lists every setting.


class DefaultSettings:
    """arq's defaults (max_jobs 10, poll_delay 0.5 s, INFO log lines per job) except that results are not kept."""

    functions = [noop]
    redis_settings = REDIS_SETTINGS
    keep_result = 0
    on_startup = announce_ready


class TunedSettings:
    """More jobs in flight per process and a short poll delay; results are not kept."""

    functions = [noop]
    redis_settings = REDIS_SETTINGS
    keep_result = 0
    on_startup = announce_ready
    max_jobs = TUNED_MAX_JOBS
    poll_delay = TUNED_POLL_DELAY_S


QUIET_LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}


class Producer:
    """Enqueues one job per seed with ``ArqRedis.enqueue_job``, ENQUEUE_CONCURRENCY calls at a time on one event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(create_pool(REDIS_SETTINGS))

    def describe(self) -> dict[str, object]:
        return {}  # this peer has no setting to read back at run time

    def push(self, seeds: range) -> None:
        self.loop.run_until_complete(self._push(seeds))

    async def _push(self, seeds: range) -> None:
        for start in range(seeds.start, seeds.stop, ENQUEUE_CONCURRENCY):
            batch = range(start, min(start + ENQUEUE_CONCURRENCY, seeds.stop))
            await asyncio.gather(*(self.pool.enqueue_job("noop", seed) for seed in batch))
