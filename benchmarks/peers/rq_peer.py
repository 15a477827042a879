"""RQ on Redis: the no-op job and the producer.

``PEERS_REDIS_URL`` names the Redis server. Jobs are enqueued with
``result_ttl=0``, so RQ deletes each job after it succeeds and stores no
result. RQ has no worker start-up hook, so the harness counts the workers
registered in the ``rq:workers`` set instead of ready markers.
"""

from __future__ import annotations

import os

from redis import Redis
from rq import Queue

from completion import record_finish

QUEUE_NAME = "peers"
ENQUEUE_BATCH = 1000


def noop(seed: int) -> None:
    record_finish()


class Producer:
    """Enqueues jobs with ``Queue.enqueue_many``, ENQUEUE_BATCH jobs per Redis pipeline."""

    def __init__(self) -> None:
        self.connection = Redis.from_url(os.environ["PEERS_REDIS_URL"])
        self.queue = Queue(QUEUE_NAME, connection=self.connection)
        self.connection.ping()

    def describe(self) -> dict[str, object]:
        return {}  # this peer has no setting to read back at run time

    def push(self, seeds: range) -> None:
        for start in range(seeds.start, seeds.stop, ENQUEUE_BATCH):
            batch = range(start, min(start + ENQUEUE_BATCH, seeds.stop))
            self.queue.enqueue_many([Queue.prepare_data(noop, (seed,), result_ttl=0) for seed in batch])
