"""The embedded queue: one SQLite file shared by producer, consumer and ops processes.

Each task is a row. A lease is the owner and expiry written on the row, so a
consumer that dies loses its leases when they expire and nothing else has to
notice. WAL mode lets readers work while one writer commits, and
``busy_timeout`` makes writers from several processes wait their turn instead
of failing. Every write runs in one ``BEGIN IMMEDIATE`` transaction, and claims
and settlements cover many tasks per transaction.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import anyio
import anyio.to_thread

from ..errors import QueueFileError, QueueNotFoundError
from ..queue import (
    THROUGHPUT_WINDOW_S,
    DeadLetter,
    DeadTask,
    Lease,
    OomMove,
    PutResult,
    QueueStats,
    Retry,
    TaskQueue,
)
from ..task import DEFAULT_LANE, LANES, SOLO_LANE, Task, canonical_json, validate_queue_name

logger = logging.getLogger("qworker.sqlite")

SCHEMA_VERSION = 2
# Statements that bring a file of an older schema version to SCHEMA_VERSION.
MIGRATIONS = {
    1: ("ALTER TABLE tasks ADD COLUMN oom_moves INTEGER NOT NULL DEFAULT 0",),
}
BUSY_TIMEOUT_MS = int(os.environ.get("QWORKER_SQLITE_BUSY_TIMEOUT_MS", "30000"))
PUT_BATCH = 5000
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

QUEUED, LEASED, DONE, DEAD = "queued", "leased", "done", "dead"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    task_id TEXT NOT NULL,
    lane TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    visible_at REAL NOT NULL,  -- queued: when it may be claimed, leased: when the lease expires
    owner TEXT,
    enqueued_at REAL NOT NULL,
    claimed_at REAL,
    finished_at REAL,
    error TEXT,
    traceback TEXT,
    oom_moves INTEGER NOT NULL DEFAULT 0,
    UNIQUE (queue, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_claimable ON tasks (queue, lane, visible_at)
    WHERE state IN ('{QUEUED}', '{LEASED}');
CREATE INDEX IF NOT EXISTS tasks_owner ON tasks (owner) WHERE state = '{LEASED}';
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (queue, state, finished_at)
    WHERE state IN ('{DONE}', '{DEAD}');
PRAGMA user_version = {SCHEMA_VERSION};
"""

# One statement claims a batch. SQLite evaluates every SET expression on the
# old row, so the CASE reads the state and attempt from before the claim: a
# lease that expired on the task's last allowed attempt is buried, not leased.
_CLAIM_SQL = f"""
UPDATE tasks SET
    state = CASE WHEN state = '{LEASED}' AND attempt >= max_attempts THEN '{DEAD}' ELSE '{LEASED}' END,
    error = CASE WHEN state = '{LEASED}' AND attempt >= max_attempts
        THEN 'lease expired on attempt ' || attempt || ' of ' || max_attempts
             || ': the consumer stopped without settling the task (killed, crashed or out of memory)'
        ELSE error END,
    finished_at = CASE WHEN state = '{LEASED}' AND attempt >= max_attempts THEN :now ELSE NULL END,
    attempt = CASE WHEN state = '{LEASED}' AND attempt >= max_attempts THEN attempt ELSE attempt + 1 END,
    owner = :owner,
    visible_at = :expires_at,
    claimed_at = :now
WHERE id IN (
    SELECT id FROM tasks
    WHERE queue = :queue AND lane = :lane AND state IN ('{QUEUED}', '{LEASED}') AND visible_at <= :now
    ORDER BY visible_at
    LIMIT :limit
)
RETURNING task_id, seed, config, attempt, max_attempts, enqueued_at, state, error
"""

_HELD = "queue = ? AND task_id = ? AND state = 'leased' AND owner = ? AND attempt = ?"

T = TypeVar("T")


class SqliteQueue(TaskQueue):
    """A named queue in a SQLite file; many processes may open the same file at once.

    Blocking SQLite calls run in a worker thread, one at a time per instance,
    so the event loop never waits on the disk.
    """

    def __init__(self, path: Path | str, name: str, *, synchronous: str = "NORMAL", create: bool = True) -> None:
        self.name = validate_queue_name(name)
        self.path = Path(path)
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise QueueFileError(f"invalid SQLite synchronous mode {synchronous!r}: use one of {', '.join(SYNCHRONOUS_MODES)}")
        self._connection = _connect(self.path, synchronous, create)
        self._limiter = anyio.CapacityLimiter(1)

    # -- producers -------------------------------------------------------

    async def put(self, tasks: Sequence[Task]) -> PutResult:
        return await self._call(self._put_sync, list(tasks))

    def _put_sync(self, tasks: list[Task]) -> PutResult:
        added = 0
        for start in range(0, len(tasks), PUT_BATCH):
            added += self._put_batch(tasks[start : start + PUT_BATCH])
        return PutResult(added=added, duplicates=len(tasks) - added)

    def _put_batch(self, tasks: list[Task]) -> int:
        now = time.time()
        rows = [
            (self.name, t.task_id, t.lane, t.seed, canonical_json(t.config), QUEUED, t.max_attempts, now, now)
            for t in tasks
        ]
        with self._transaction() as db:
            self._ensure_queue_row(db, now)
            before = db.total_changes
            db.executemany(
                "INSERT INTO tasks (queue, task_id, lane, seed, config, state, max_attempts, visible_at, enqueued_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (queue, task_id) DO NOTHING",
                rows,
            )
            return db.total_changes - before

    def _ensure_queue_row(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("INSERT INTO queues (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (self.name, now))

    # -- consumers -------------------------------------------------------

    async def claim(self, owner: str, limit: int, lease_s: float, lane: str = DEFAULT_LANE) -> list[Lease]:
        return await self._call(self._claim_sync, owner, limit, lease_s, lane)

    def _claim_sync(self, owner: str, limit: int, lease_s: float, lane: str) -> list[Lease]:
        leases: list[Lease] = []
        while len(leases) < limit:
            claimed, buried = self._claim_batch(owner, limit - len(leases), lease_s, lane)
            leases.extend(claimed)
            if not buried:
                break
        return leases

    def _claim_batch(self, owner: str, limit: int, lease_s: float, lane: str) -> tuple[list[Lease], int]:
        """Claim up to ``limit`` tasks in one statement; return the leases and how many expired leases were buried."""
        now = time.time()
        params = {"now": now, "owner": owner, "expires_at": now + lease_s, "queue": self.name, "lane": lane, "limit": limit}
        with self._transaction() as db:
            rows = db.execute(_CLAIM_SQL, params).fetchall()

        leases = []
        for task_id, seed, config, attempt, max_attempts, enqueued_at, state, error in rows:
            if state == DEAD:
                logger.error("task dead id=%s attempt=%d/%d error=%s", task_id, attempt, max_attempts, error)
                continue
            task = Task(
                seed=seed,
                config=json.loads(config),
                task_id=task_id,
                attempt=attempt,
                lane=lane,
                max_attempts=max_attempts,
                enqueued_at=enqueued_at,
            )
            leases.append(Lease(task=task, owner=owner, claimed_at=now, expires_at=now + lease_s))
        return leases, len(rows) - len(leases)

    async def extend(self, owner: str, leases: Sequence[Lease], lease_s: float) -> set[str]:
        return await self._call(self._extend_sync, owner, [lease.task_id for lease in leases], lease_s)

    def _extend_sync(self, owner: str, task_ids: list[str], lease_s: float) -> set[str]:
        if not task_ids:
            return set()
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE tasks SET visible_at = ? WHERE queue = ? AND task_id IN (SELECT value FROM json_each(?))"
                " AND owner = ? AND state = 'leased' RETURNING task_id",
                (time.time() + lease_s, self.name, json.dumps(task_ids), owner),
            ).fetchall()
        held = {row[0] for row in rows}
        return set(task_ids) - held

    async def settle(
        self,
        acks: Sequence[Lease] = (),
        retries: Sequence[Retry] = (),
        dead: Sequence[DeadLetter] = (),
        releases: Sequence[Lease] = (),
        oom_moves: Sequence[OomMove] = (),
    ) -> None:
        if acks or retries or dead or releases or oom_moves:
            await self._call(self._settle_sync, acks, retries, dead, releases, oom_moves)

    def _settle_sync(
        self,
        acks: Sequence[Lease],
        retries: Sequence[Retry],
        dead: Sequence[DeadLetter],
        releases: Sequence[Lease],
        oom_moves: Sequence[OomMove],
    ) -> None:
        now = time.time()
        with self._transaction() as db:
            if acks:
                db.executemany(
                    f"UPDATE tasks SET state = 'done', finished_at = ?, owner = NULL, error = NULL, traceback = NULL WHERE {_HELD}",
                    [(now, *self._held_key(lease)) for lease in acks],
                )
            if retries:
                db.executemany(
                    f"UPDATE tasks SET state = 'queued', visible_at = ?, owner = NULL, error = ?, traceback = ? WHERE {_HELD}",
                    [(now + r.delay_s, r.error, r.traceback, *self._held_key(r.lease)) for r in retries],
                )
            if dead:
                db.executemany(
                    f"UPDATE tasks SET state = 'dead', finished_at = ?, owner = NULL, error = ?, traceback = ? WHERE {_HELD}",
                    [(now, d.error, d.traceback, *self._held_key(d.lease)) for d in dead],
                )
            if releases:
                db.executemany(
                    f"UPDATE tasks SET state = 'queued', visible_at = ?, owner = NULL, attempt = attempt - 1 WHERE {_HELD}",
                    [(now, *self._held_key(lease)) for lease in releases],
                )
            if oom_moves:
                db.executemany(
                    f"UPDATE tasks SET state = 'queued', lane = '{SOLO_LANE}', visible_at = ?, owner = NULL,"
                    f" attempt = attempt - 1, oom_moves = oom_moves + 1, error = ?, traceback = ? WHERE {_HELD}",
                    [(now, m.error, m.traceback, *self._held_key(m.lease)) for m in oom_moves],
                )

    def _held_key(self, lease: Lease) -> tuple[str, str, str, int]:
        return (self.name, lease.task_id, lease.owner, lease.task.attempt)

    # -- operators -------------------------------------------------------

    async def stats(self) -> QueueStats:
        return await self._call(self._stats_sync)

    def _stats_sync(self) -> QueueStats:
        now = time.time()
        rows = self._connection.execute(
            "SELECT lane, state, visible_at <= ?, attempt > 0, COUNT(*), SUM(oom_moves) FROM tasks WHERE queue = ?"
            " GROUP BY 1, 2, 3, 4",
            (now, self.name),
        ).fetchall()

        counts = {"queued": 0, "retrying": 0, "in_flight": 0, "expired": 0, "done": 0, "dead": 0}
        lane_depth: dict[str, int] = {}
        oom_moves = 0
        for lane, state, ready, retried, count, moves in rows:
            oom_moves += moves
            if state == QUEUED:
                counts["retrying" if retried else "queued"] += count
                lane_depth[lane] = lane_depth.get(lane, 0) + count
            elif state == LEASED and ready:
                counts["expired"] += count
                lane_depth[lane] = lane_depth.get(lane, 0) + count
            elif state == LEASED:
                counts["in_flight"] += count
            else:
                counts[state] += count
        finished = self._connection.execute(
            "SELECT COUNT(*) FROM tasks WHERE queue = ? AND state IN ('done', 'dead') AND finished_at >= ?",
            (self.name, now - THROUGHPUT_WINDOW_S),
        ).fetchone()[0]
        return QueueStats(**counts, lane_depth=lane_depth, finished_last_5m=finished, oom_moves=oom_moves)

    async def has_pending(self, lane: str | None = None) -> bool:
        return await self._call(self._has_pending_sync, lane)

    def _has_pending_sync(self, lane: str | None) -> bool:
        lanes = LANES if lane is None else (lane,)
        placeholders = ", ".join("?" for _ in lanes)
        row = self._connection.execute(
            f"SELECT EXISTS (SELECT 1 FROM tasks WHERE queue = ? AND lane IN ({placeholders})"
            " AND state IN ('queued', 'leased'))",
            (self.name, *lanes),
        ).fetchone()
        return bool(row[0])

    async def dead_letters(self, limit: int = 100) -> list[DeadTask]:
        return await self._call(self._dead_letters_sync, limit)

    def _dead_letters_sync(self, limit: int) -> list[DeadTask]:
        rows = self._connection.execute(
            "SELECT task_id, seed, config, attempt, lane, max_attempts, enqueued_at, error, traceback, finished_at"
            " FROM tasks WHERE queue = ? AND state = 'dead' ORDER BY finished_at DESC LIMIT ?",
            (self.name, limit),
        ).fetchall()
        return [
            DeadTask(
                task=Task(seed=seed, config=json.loads(config), task_id=task_id, attempt=attempt, lane=lane,
                          max_attempts=max_attempts, enqueued_at=enqueued_at),
                error=error or "",
                traceback=traceback or "",
                finished_at=finished_at,
            )
            for task_id, seed, config, attempt, lane, max_attempts, enqueued_at, error, traceback, finished_at in rows
        ]

    async def metadata(self) -> dict[str, Any]:
        return await self._call(self._metadata_sync)

    def _metadata_sync(self) -> dict[str, Any]:
        row = self._connection.execute("SELECT metadata FROM queues WHERE name = ?", (self.name,)).fetchone()
        return json.loads(row[0]) if row else {}

    async def set_metadata(self, values: Mapping[str, Any]) -> None:
        await self._call(self._set_metadata_sync, dict(values))

    def _set_metadata_sync(self, values: dict[str, Any]) -> None:
        with self._transaction() as db:
            self._ensure_queue_row(db, time.time())
            row = db.execute("SELECT metadata FROM queues WHERE name = ?", (self.name,)).fetchone()
            merged = {**json.loads(row[0]), **values}
            db.execute("UPDATE queues SET metadata = ? WHERE name = ?", (canonical_json(merged), self.name))

    async def exists(self) -> bool:
        """Return whether any producer has created this queue in the file."""
        return await self._call(self._exists_sync)

    def _exists_sync(self) -> bool:
        row = self._connection.execute("SELECT 1 FROM queues WHERE name = ?", (self.name,)).fetchone()
        return row is not None

    async def requeue_dead(self, task_ids: Sequence[str]) -> int:
        return await self._call(self._requeue_sync, DEAD, list(task_ids))

    async def requeue_done(self, task_ids: Sequence[str]) -> int:
        return await self._call(self._requeue_sync, DONE, list(task_ids))

    def _requeue_sync(self, state: str, task_ids: list[str]) -> int:
        with self._transaction() as db:
            return db.execute(
                "UPDATE tasks SET state = 'queued', attempt = 0, visible_at = ?, owner = NULL, finished_at = NULL,"
                " error = NULL, traceback = NULL"
                " WHERE queue = ? AND state = ? AND task_id IN (SELECT value FROM json_each(?))",
                (time.time(), self.name, state, json.dumps(task_ids)),
            ).rowcount

    async def done_task_ids(self) -> set[str]:
        return await self._call(self._done_task_ids_sync)

    def _done_task_ids_sync(self) -> set[str]:
        rows = self._connection.execute("SELECT task_id FROM tasks WHERE queue = ? AND state = 'done'", (self.name,))
        return {row[0] for row in rows}

    async def take_waiting(self) -> list[Task]:
        return await self._call(self._take_waiting_sync)

    def _take_waiting_sync(self) -> list[Task]:
        with self._transaction() as db:
            rows = db.execute(
                "DELETE FROM tasks WHERE queue = ? AND (state = 'queued' OR (state = 'leased' AND visible_at <= ?))"
                " RETURNING task_id, seed, config, lane, max_attempts, enqueued_at",
                (self.name, time.time()),
            ).fetchall()
        return [
            Task(seed=seed, config=json.loads(config), task_id=task_id, lane=lane, max_attempts=max_attempts,
                 enqueued_at=enqueued_at)
            for task_id, seed, config, lane, max_attempts, enqueued_at in rows
        ]

    async def purge(self) -> int:
        """Delete every task of this queue, in any state; return how many were deleted."""
        return await self._call(self._purge_sync)

    def _purge_sync(self) -> int:
        with self._transaction() as db:
            return db.execute("DELETE FROM tasks WHERE queue = ?", (self.name,)).rowcount

    async def close(self) -> None:
        await self._call(self._connection.close)

    # -- plumbing --------------------------------------------------------

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._connection)


async def open_existing_queue(path: Path | str, name: str, *, synchronous: str = "NORMAL") -> SqliteQueue:
    """Open a queue that a producer has already created, or raise QueueNotFoundError."""
    queue = SqliteQueue(path, name, synchronous=synchronous, create=False)
    if not await queue.exists():
        await queue.close()
        raise QueueNotFoundError(f"queue {name!r} not found in {str(path)!r}: push tasks to it first")
    return queue


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error.

    IMMEDIATE takes the write lock at the start, so two processes never both
    read and then fail to upgrade to writing (SQLITE_BUSY mid-transaction).
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> sqlite3.Connection:
        self._connection.execute("BEGIN IMMEDIATE")
        return self._connection

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self._connection.execute("COMMIT")
        else:
            self._connection.execute("ROLLBACK")


def _connect(path: Path, synchronous: str, create: bool) -> sqlite3.Connection:
    if path.is_dir():
        raise QueueFileError(f"queue file {str(path)!r} is a directory: pass the path of a SQLite file")
    if not path.exists() and not create:
        raise QueueFileError(f"queue file {str(path)!r} not found: push tasks first, or pass the right --data-dir")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)

    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _ensure_schema(connection, path)
        _retry_while_busy(lambda: connection.execute("PRAGMA journal_mode = WAL"))
        connection.execute(f"PRAGMA synchronous = {synchronous}")
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise QueueFileError(f"queue file {str(path)!r} cannot be opened as a SQLite database: {exc}") from None
    except QueueFileError:
        connection.close()
        raise
    return connection


def _ensure_schema(connection: sqlite3.Connection, path: Path) -> None:
    """Create the schema in an empty file, or check that an existing file contains a qworker queue.

    The check runs before anything is written, so a foreign database is left
    as it was. Creation takes an exclusive lock and checks again inside it,
    so processes opening a new file at the same moment create the schema once.
    """
    if _schema_version(connection, path) == SCHEMA_VERSION:
        return
    connection.execute("BEGIN EXCLUSIVE")
    try:
        version = _schema_version(connection, path)
        if version == 0:
            # Statements are split on ";", so the schema text contains no other semicolon.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
        elif version != SCHEMA_VERSION:
            _migrate(connection, path, version)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _migrate(connection: sqlite3.Connection, path: Path, version: int) -> None:
    """Bring a queue file from schema ``version`` to SCHEMA_VERSION; the caller holds an exclusive lock."""
    for step in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[step]:
            connection.execute(statement)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    logger.info("migrated queue file %s from schema version %d to %d", path, version, SCHEMA_VERSION)


def _schema_version(connection: sqlite3.Connection, path: Path) -> int:
    """Return the schema version: 0 for an empty file; raise if the file belongs to another program."""
    # One statement reads both, so a schema committed by another process
    # between two reads cannot look like tables without a version.
    version, tables = connection.execute(
        "SELECT (SELECT user_version FROM pragma_user_version),"
        " (SELECT count(*) FROM sqlite_master WHERE type = 'table')"
    ).fetchone()
    if version == SCHEMA_VERSION or version in MIGRATIONS:
        return version
    if version == 0 and tables == 0:
        return 0
    raise QueueFileError(
        f"queue file {str(path)!r} is not a qworker queue (schema version {version}, expected {SCHEMA_VERSION}):"
        " choose another --data-dir"
    )


def _retry_while_busy(statement: Callable[[], object]) -> None:
    """Run ``statement``, retrying while another connection holds the lock it needs.

    Switching to WAL mode needs a lock that SQLite's busy handler does not wait for.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay_s = 0.005
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay_s)
        delay_s = min(0.2, delay_s * 2)
