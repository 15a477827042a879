"""Dramatiq on Redis: the broker, the no-op actor, a ready marker middleware, and the producer.

``PEERS_REDIS_URL`` names the Redis server. No Results middleware is added,
so nothing is stored after a message is processed. The prefetch of the tuned
variant comes from Dramatiq's own ``dramatiq_queue_prefetch`` environment
variable, which the harness sets; the default is twice the worker threads.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from completion import mark_ready, record_finish

QUEUE_NAME = "peers"


class ReadyMarker(Middleware):
    """Writes the ready marker once the worker of a process has booted."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        mark_ready()


broker = RedisBroker(url=os.environ["PEERS_REDIS_URL"])
broker.add_middleware(ReadyMarker())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE_NAME)
def noop(seed: int) -> None:
    record_finish()


class Producer:
    """Sends one message per seed with ``noop.send(seed)``."""

    def describe(self) -> dict[str, object]:
        return {}  # this peer has no setting to read back at run time

    def push(self, seeds: range) -> None:
        for seed in seeds:
            noop.send(seed)
