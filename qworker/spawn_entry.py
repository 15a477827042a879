"""The first code a spawned consumer process runs.

It records stop signals before anything heavy is imported: a consumer spends
a second or more importing pyarrow, its workload and torch, and a SIGTERM in
that window would otherwise kill it with the default action instead of
stopping it cleanly. The consumer spec arrives pickled, so that unpickling
it, which imports the rest of qworker, also happens after the handlers are in place.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any


class EarlySignals:
    """Records SIGTERM and SIGINT until the consumer's event loop takes them over."""

    def __init__(self) -> None:
        self.received: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)


def consumer_process_main(pickled_spec: bytes, index: int, parent_pid: int, ready: Any) -> None:
    """Record stop signals, tell the parent it may now send them, then run the consumer.

    ``ready`` is a ``multiprocessing.Event`` of the spawn context.
    """
    early_signals = EarlySignals()
    ready.set()

    import pickle

    from .pool import run_consumer_process

    run_consumer_process(pickle.loads(pickled_spec), index, parent_pid, early_signals)
