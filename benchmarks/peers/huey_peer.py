"""Huey on SQLite: the no-op task, a startup hook that marks the worker ready, and the producer.

Settings come from the environment, which the harness sets per variant:
``PEERS_HUEY_DB`` (the SQLite file) and ``PEERS_HUEY_FSYNC``: ``default``
passes ``fsync=None`` to ``SqliteHuey``, which leaves SQLite's default
``synchronous`` in place (FULL in the WAL mode Huey selects), and ``off``
passes ``fsync=False``, which sets ``PRAGMA synchronous = OFF``.
"""

from __future__ import annotations

import os

from huey import SqliteHuey

from completion import mark_ready, record_finish

FSYNC_SETTINGS: dict[str, bool | None] = {"default": None, "off": False}

_fsync_name = os.environ.get("PEERS_HUEY_FSYNC", "default")
if _fsync_name not in FSYNC_SETTINGS:
    raise ValueError(f"invalid PEERS_HUEY_FSYNC={_fsync_name!r}: use one of {sorted(FSYNC_SETTINGS)}")

# results=False: Huey stores no return values (a no-op returns None, which Huey would skip anyway).
huey = SqliteHuey(name="peers", filename=os.environ["PEERS_HUEY_DB"], results=False, fsync=FSYNC_SETTINGS[_fsync_name])


@huey.task()
def noop(seed: int) -> None:
    record_finish()


@huey.on_startup()
def announce_ready() -> None:
    mark_ready()


def synchronous_mode() -> int:
    """Return the ``PRAGMA synchronous`` value of a connection opened with this process's settings (0 OFF, 1 NORMAL, 2 FULL)."""
    connection = huey.storage._create_connection()  # the storage's own connection factory, so its pragmas apply
    try:
        return connection.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        connection.close()


class Producer:
    """Enqueues one Huey task per seed: one INSERT and one commit per task, as ``noop(seed)`` does."""

    def describe(self) -> dict[str, object]:
        return {"PRAGMA synchronous": synchronous_mode()}

    def push(self, seeds: range) -> None:
        for seed in seeds:
            noop(seed)
