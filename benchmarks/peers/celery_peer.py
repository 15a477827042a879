"""Celery on Redis: the no-op task, a ready marker on ``worker_ready``, and the producer.

``PEERS_REDIS_URL`` names the broker. No result backend is configured and the
task sets ``ignore_result``, so nothing is stored after a task runs. Worker
options (pool, concurrency, prefetch multiplier) come from the command line.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_ready

from completion import mark_ready, record_finish

app = Celery("celery_peer", broker=os.environ["PEERS_REDIS_URL"])
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,  # the Celery 5 default, set to silence its deprecation warning
    task_default_queue="peers",
)


@app.task(ignore_result=True)
def noop(seed: int) -> None:
    record_finish()


@worker_ready.connect
def announce_ready(**_: object) -> None:
    # worker_ready fires once per worker node, in its main process, after the pool has started.
    mark_ready()


class Producer:
    """Publishes one message per seed with ``noop.delay(seed)``."""

    def describe(self) -> dict[str, object]:
        return {}  # this peer has no setting to read back at run time

    def push(self, seeds: range) -> None:
        for seed in seeds:
            noop.delay(seed)
