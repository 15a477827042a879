"""The Modal backend's queue: tasks in a ``modal.Queue``, their ledger in a ``modal.Dict``.

Modal's queue removes an item on ``get`` and has no ack or visibility
timeout, and its contents are not guaranteed durable. So the ledger, not the
queue, is the record of what must still be done:

* ``t/<task_id>``: the task, written when it is pushed. ``Dict.put`` with
  ``skip_if_exists=True`` is Modal's only atomic create-if-absent, so this
  write is also the dedup check.
* ``s/<task_id>``: its state: ``queued`` (written just before its item is
  sent), ``leased`` (owner, expiry), ``retry`` (waiting for its backoff to
  end), ``done`` or ``dead``. A task with no state was recorded by a
  producer that died before sending it, so pushing it again sends it.
* ``d/<task_id>``: the dead-letter index. The full record, with the
  traceback, is a JSON file in the dead-letter folder (on a Volume in production).
* ``r/<task_id>/<attempt>/<stamp>``: a marker that lets only one reconciler
  deliver a given expiry, retry or loss again. The stamp is the lease expiry,
  the retry time, or the generation of the last delivery.
* ``o/<task_id>``: how many times the task was moved to the solo lane after
  running out of GPU memory. A move also rewrites ``t/<task_id>`` with the new lane.
* ``meta``: what producers recorded about the queue.

Tasks travel packed into items (up to ``tasks_per_item`` tasks, at most
``max_item_bytes``), spread over ``partitions`` partitions per lane, so one
queue RPC carries many tasks. A consumer's claim takes whole items; tasks
beyond its ``limit`` are leased to it at once and handed out by its next claims.

The reconciler delivers again the tasks whose lease expired and the retries
whose delay is over. Once the queue is empty, it also delivers every task in
the ledger that is neither done, dead, leased nor waiting for a retry,
because a consumer that died between ``get`` and writing its leases leaves
such tasks. Consumers run it when their claim finds nothing and the last run
is ``reconcile_interval_s`` old.

Every value is JSON text, so nothing in the queue or the ledger holds code.
The modal client still pickles those strings on the wire.

NOTE: Dict writes are last-write-wins. A consumer that stalls past its lease
and then settles the task can overwrite the state written by the consumer
that received it again. The result is still counted once by the reducer, but
the ledger may briefly show a task as done while its second run is in flight.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue as stdlib_queue
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import anyio

from ..errors import QueueFullError, TaskTooLargeError
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
from ..results import write_json_atomic
from ..task import DEFAULT_LANE, LANES, SOLO_LANE, Task, validate_queue_name

logger = logging.getLogger("qworker.modal")

# Modal's documented limits.
MODAL_MAX_ITEM_BYTES = 1024 * 1024
MODAL_MAX_ITEMS_PER_PARTITION = 5000
MODAL_MAX_PARTITION_KEY_BYTES = 64
MODAL_PARTITION_TTL_S = 24 * 3600

QUEUED, LEASED, RETRY, DONE, DEAD = "queued", "leased", "retry", "done", "dead"

# Seconds between the progress lines of a producer waiting for room in a full queue.
BACKPRESSURE_REPORT_S = 5.0

Commit = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ModalQueueSettings:
    """Packing and partitioning of tasks on the Modal queue. Times are in seconds."""

    partitions: int = 8  # per lane
    tasks_per_item: int = 100
    # Room below Modal's 1 MiB item limit for the pickling that the client adds.
    max_item_bytes: int = MODAL_MAX_ITEM_BYTES - 16 * 1024
    items_per_put: int = 50
    put_timeout_s: float = 600.0  # how long a producer waits for room in a full queue
    partition_ttl_s: int = MODAL_PARTITION_TTL_S
    dedup_concurrency: int = 64
    # Seconds the reconciler waits before it calls a task lost that is in the
    # ledger but not in the empty queue, because a consumer may be between its
    # get and its lease write. A task recorded but not yet sent also gets
    # put_timeout_s, the longest a producer waits on a full queue.
    lost_grace_s: float = float(os.environ.get("QWORKER_MODAL_LOST_GRACE_S", "30"))
    # A reconciler pass scans the whole ledger (about 6 s for 20,000 tasks on
    # the local test server), so consumers start one at most this often when
    # their claim finds nothing. It also bounds how late a retry or an
    # expired lease is delivered again.
    reconcile_interval_s: float = float(os.environ.get("QWORKER_MODAL_RECONCILE_S", "30"))

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.tasks_per_item < 1 or self.items_per_put < 1:
            raise ValueError("partitions, tasks_per_item and items_per_put must be at least 1")


@dataclass(frozen=True)
class ReconcileReport:
    """Counts of one reconciler pass."""

    expired: int = 0
    retried: int = 0
    lost: int = 0
    buried: int = 0

    @property
    def delivered(self) -> int:
        return self.expired + self.retried + self.lost


@dataclass
class _Snapshot:
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    dead: dict[str, dict[str, Any]] = field(default_factory=dict)
    oom_moves: int = 0


def modal_object_names(queue_name: str) -> tuple[str, str]:
    """Return the names of the ``modal.Queue`` and ``modal.Dict`` behind a qworker queue."""
    return f"qworker-{queue_name}-tasks", f"qworker-{queue_name}-ledger"


class ModalTaskQueue(TaskQueue):
    """A qworker queue on a ``modal.Queue`` and a ``modal.Dict`` ledger.

    ``dead_letter_dir`` keeps the full dead-letter records; in production it
    is a folder on a ``modal.Volume`` and ``commit`` commits that Volume.
    """

    def __init__(
        self,
        name: str,
        task_queue: Any,
        ledger: Any,
        dead_letter_dir: Path,
        settings: ModalQueueSettings | None = None,
        *,
        commit: Commit | None = None,
    ) -> None:
        self.name = validate_queue_name(name)
        self._queue = task_queue
        self._ledger = ledger
        self._dead_letter_dir = dead_letter_dir
        self.settings = settings or ModalQueueSettings()
        self._commit = commit
        self._overflow: dict[tuple[str, str], list[Lease]] = {}  # by (owner, lane)
        self._next_partition = {lane: random.randrange(self.settings.partitions) for lane in LANES}
        self._last_reconcile = 0.0

    @classmethod
    async def open(
        cls,
        name: str,
        dead_letter_dir: Path,
        settings: ModalQueueSettings | None = None,
        *,
        commit: Commit | None = None,
        environment_name: str | None = None,
    ) -> ModalTaskQueue:
        """Look up (or create) the named Modal objects of queue ``name`` with the client from the environment."""
        import modal

        queue_name, dict_name = modal_object_names(validate_queue_name(name))
        task_queue = modal.Queue.from_name(queue_name, create_if_missing=True, environment_name=environment_name)
        ledger = modal.Dict.from_name(dict_name, create_if_missing=True, environment_name=environment_name)
        await task_queue.hydrate.aio()
        await ledger.hydrate.aio()
        return cls(name, task_queue, ledger, dead_letter_dir, settings, commit=commit)

    def partition_key(self, lane: str, index: int) -> str:
        return f"{lane}.{index}"

    # -- producers -------------------------------------------------------

    async def put(self, tasks: Sequence[Task]) -> PutResult:
        for task in tasks:
            self._check_item_size(task, self._encode_task(task))

        # Record and send chunk by chunk, so a task waits at most one chunk's
        # backpressure between its ledger entry and its queue item. The
        # reconciler relies on that bound to tell a lost task from an unsent one.
        chunk = self.settings.items_per_put * self.settings.tasks_per_item
        added = 0
        for start in range(0, len(tasks), chunk):
            encoded = [(task, self._encode_task(task)) for task in tasks[start : start + chunk]]
            new_tasks = await self._record_new(encoded)
            await self._mark_queued(task for task, _ in new_tasks)
            await self._send(new_tasks)
            added += len(new_tasks)
        return PutResult(added=added, duplicates=len(tasks) - added)

    async def _mark_queued(self, tasks: Iterable[Task]) -> None:
        """Write the queued state before the items are sent.

        Written first, it cannot overwrite the lease of a consumer that claims
        an item at once. If the producer dies before sending, the reconciler
        finds queued tasks missing from an empty queue and delivers them
        after ``lost_grace_s``.
        """
        now = time.time()
        states = {f"s/{task.task_id}": _state(QUEUED, task, queued_at=now) for task in tasks}
        if states:
            await self._ledger.update.aio(states)

    def _encode_task(self, task: Task, enqueued_at: float | None = None) -> str:
        record = task.to_dict()
        record["enqueued_at"] = task.enqueued_at or enqueued_at or time.time()
        return json.dumps(record, separators=(",", ":"), allow_nan=False)

    def _check_item_size(self, task: Task, text: str) -> None:
        size = len(text.encode()) + 2
        if size > self.settings.max_item_bytes:
            raise TaskTooLargeError(
                f"task {task.task_id!r} is {size:,} bytes as JSON, over the limit of"
                f" {self.settings.max_item_bytes:,} bytes for one Modal queue item: keep large inputs in"
                " a Volume and pass their path in the config"
            )

    async def _record_new(self, encoded: list[tuple[Task, str]]) -> list[tuple[Task, str]]:
        """Create each task's ledger entry unless it exists; return the tasks that were new or never sent.

        A duplicate costs a second RPC, the read of its state.
        """
        created: dict[str, tuple[Task, str]] = {}
        seen: set[str] = set()
        unique = []
        for task, text in encoded:
            if task.task_id not in seen:
                seen.add(task.task_id)
                unique.append((task, text))

        limiter = anyio.CapacityLimiter(self.settings.dedup_concurrency)

        async def record(task: Task, text: str) -> None:
            async with limiter:
                if await self._ledger.put.aio(f"t/{task.task_id}", text, skip_if_exists=True):
                    created[task.task_id] = (task, text)
                # A task recorded without a state was never sent: its producer died
                # between the two writes. It counts as new, so a restarted producer sends it.
                elif await self._ledger.get.aio(f"s/{task.task_id}") is None:
                    created[task.task_id] = (task, text)

        async with anyio.create_task_group() as group:
            for task, text in unique:
                group.start_soon(record, task, text)
        return [created[task.task_id] for task, _ in unique if task.task_id in created]

    async def _send(self, tasks: Iterable[tuple[Task, str]]) -> None:
        """Pack tasks into items and put them, waiting (backpressure) while partitions are full."""
        by_lane: dict[str, list[str]] = {}
        for task, text in tasks:
            by_lane.setdefault(task.lane, []).append(text)
        for lane, texts in by_lane.items():
            items = self._pack(texts)
            for start in range(0, len(items), self.settings.items_per_put):
                await self._put_items(lane, items[start : start + self.settings.items_per_put], len(items))

    def _pack(self, texts: list[str]) -> list[str]:
        items: list[str] = []
        batch: list[str] = []
        size = 2
        for text in texts:
            text_size = len(text.encode()) + 1
            if batch and (len(batch) >= self.settings.tasks_per_item or size + text_size > self.settings.max_item_bytes):
                items.append("[" + ",".join(batch) + "]")
                batch, size = [], 2
            batch.append(text)
            size += text_size
        if batch:
            items.append("[" + ",".join(batch) + "]")
        return items

    async def _put_items(self, lane: str, items: list[str], total_items: int) -> None:
        deadline = time.monotonic() + self.settings.put_timeout_s
        delay_s = 0.05
        waiting_since: float | None = None
        last_report = 0.0
        while True:
            for _ in range(self.settings.partitions):
                key = self._rotate_partition(lane)
                try:
                    await self._queue.put_many.aio(
                        items, block=False, partition=key, partition_ttl=self.settings.partition_ttl_s
                    )
                except stdlib_queue.Full:
                    continue
                if waiting_since is not None:
                    logger.info("queue %s has room again after %.1f s, pushing", self.name, time.monotonic() - waiting_since)
                return

            now = time.monotonic()
            waiting_since = waiting_since or now
            if now - last_report >= BACKPRESSURE_REPORT_S:
                last_report = now
                logger.warning(
                    "queue %s is full: every %s partition refused %d items, waiting %.0f s so far for consumers",
                    self.name, lane, len(items), now - waiting_since,
                )
            if now >= deadline:
                raise QueueFullError(
                    f"queue {self.name!r} stayed full for {self.settings.put_timeout_s:.0f} s: start consumers,"
                    " or raise the put timeout; tasks pushed before this batch stay queued"
                )
            await anyio.sleep(delay_s)
            delay_s = min(2.0, delay_s * 2)

    def _rotate_partition(self, lane: str) -> str:
        index = self._next_partition[lane]
        self._next_partition[lane] = (index + 1) % self.settings.partitions
        return self.partition_key(lane, index)

    # -- consumers -------------------------------------------------------

    async def claim(self, owner: str, limit: int, lease_s: float, lane: str = DEFAULT_LANE) -> list[Lease]:
        leases = self._take_overflow(owner, lane, limit)
        if len(leases) < limit:
            leases += await self._claim_from_queue(owner, limit - len(leases), lease_s, lane)
        if not leases and time.monotonic() - self._last_reconcile >= self.settings.reconcile_interval_s:
            report = await self.reconcile()
            if report.delivered:
                leases = await self._claim_from_queue(owner, limit, lease_s, lane)
        return leases

    def _take_overflow(self, owner: str, lane: str, limit: int) -> list[Lease]:
        self._drop_expired_overflow()
        overflow = self._overflow.get((owner, lane), [])
        taken, self._overflow[(owner, lane)] = overflow[:limit], overflow[limit:]
        return taken

    def _drop_expired_overflow(self) -> None:
        """Forget prefetched leases that expired: the reconciler delivers those tasks again."""
        now = time.time()
        for key, held in self._overflow.items():
            self._overflow[key] = [lease for lease in held if lease.expires_at > now]

    async def _claim_from_queue(self, owner: str, limit: int, lease_s: float, lane: str) -> list[Lease]:
        items: list[str] = []
        wanted_items = max(1, math.ceil(limit / self.settings.tasks_per_item))
        for _ in range(self.settings.partitions):
            # Stay on the partition that served the last claim until it runs dry,
            # so a claim rarely spends a get on an empty partition.
            key = self.partition_key(lane, self._next_partition[lane])
            items += await self._queue.get_many.aio(wanted_items - len(items), block=False, partition=key)
            if len(items) >= wanted_items:
                break
            self._rotate_partition(lane)
        if not items:
            return []

        now = time.time()
        leases = [self._lease_from(record, owner, now, lease_s) for item in items for record in json.loads(item)]
        await self._ledger.update.aio({f"s/{lease.task_id}": self._lease_state(lease) for lease in leases})
        self._overflow.setdefault((owner, lane), []).extend(leases[limit:])
        return leases[:limit]

    def _lease_from(self, record: dict[str, Any], owner: str, now: float, lease_s: float) -> Lease:
        task = Task(
            seed=record["seed"],
            config=record["config"],
            task_id=record["task_id"],
            attempt=record.get("attempt", 0) + 1,
            lane=record.get("lane", DEFAULT_LANE),
            max_attempts=record["max_attempts"],
            enqueued_at=record.get("enqueued_at", now),
        )
        return Lease(task=task, owner=owner, claimed_at=now, expires_at=now + lease_s)

    def _lease_state(self, lease: Lease, expires_at: float | None = None) -> str:
        return _state(LEASED, lease.task, owner=lease.owner, expires_at=expires_at or lease.expires_at)

    async def extend(self, owner: str, leases: Sequence[Lease], lease_s: float) -> set[str]:
        """Push the expiry of ``leases`` and of ``owner``'s prefetched overflow ahead; return ids no longer held.

        The states are read first, so a lease that was settled or delivered to
        another consumer is reported lost and left alone. A state can still
        change between the read and the write, because the ledger has no
        compare-and-set.
        """
        expires_at = time.time() + lease_s
        overflow = [lease for (holder, _), held in self._overflow.items() if holder == owner for lease in held]
        states = await self._read_states([lease.task_id for lease in (*leases, *overflow)])

        kept, lost = [], set()
        for lease in (*leases, *overflow):
            state = states.get(lease.task_id) or {}
            if state.get("state") == LEASED and state.get("owner") == owner and state.get("attempt") == lease.task.attempt:
                kept.append(lease)
            else:
                lost.add(lease.task_id)
        if kept:
            await self._ledger.update.aio({f"s/{lease.task_id}": self._lease_state(lease, expires_at) for lease in kept})
        self._renew_overflow(owner, expires_at, lost)
        return lost

    def _renew_overflow(self, owner: str, expires_at: float, lost: set[str]) -> None:
        for (holder, lane), held in self._overflow.items():
            if holder == owner:
                self._overflow[(holder, lane)] = [
                    dataclasses.replace(lease, expires_at=expires_at) for lease in held if lease.task_id not in lost
                ]

    async def _read_states(self, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        states: dict[str, dict[str, Any]] = {}
        limiter = anyio.CapacityLimiter(self.settings.dedup_concurrency)

        async def read(task_id: str) -> None:
            async with limiter:
                text = await self._ledger.get.aio(f"s/{task_id}")
            if text:
                states[task_id] = json.loads(text)

        async with anyio.create_task_group() as group:
            for task_id in task_ids:
                group.start_soon(read, task_id)
        return states

    async def settle(
        self,
        acks: Sequence[Lease] = (),
        retries: Sequence[Retry] = (),
        dead: Sequence[DeadLetter] = (),
        releases: Sequence[Lease] = (),
        oom_moves: Sequence[OomMove] = (),
    ) -> None:
        now = time.time()
        if oom_moves:
            await self._move_to_solo(oom_moves, now)
        updates: dict[str, str] = {}
        for lease in acks:
            updates[f"s/{lease.task_id}"] = _state(DONE, lease.task, finished_at=now)
        for retry in retries:
            updates[f"s/{retry.lease.task_id}"] = _state(
                RETRY, retry.lease.task, visible_at=now + retry.delay_s, error=retry.error
            )
        if dead:
            updates.update(await self._store_dead_letters(dead, now))
        if updates:
            await self._ledger.update.aio(updates)
        if releases:
            await self._release(releases, now)

    async def _move_to_solo(self, moves: Sequence[OomMove], now: float) -> None:
        """Record each task on the solo lane, count the move, then send it to the solo lane's partitions.

        The queued state is written before the item is sent, as in ``put``, so
        it cannot overwrite the lease of a solo consumer that claims the item at once.
        """
        tasks = [dataclasses.replace(move.lease.task, lane=SOLO_LANE, attempt=move.lease.task.attempt - 1) for move in moves]
        counts = await self._read_counts([f"o/{task.task_id}" for task in tasks])

        updates: dict[str, str] = {}
        for task in tasks:
            updates[f"t/{task.task_id}"] = self._encode_task(task)
            updates[f"s/{task.task_id}"] = _state(QUEUED, task, queued_at=now)
            updates[f"o/{task.task_id}"] = str(counts.get(f"o/{task.task_id}", 0) + 1)
        await self._ledger.update.aio(updates)
        await self._send((task, self._encode_task(task)) for task in tasks)

    async def _read_counts(self, keys: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in keys:
            text = await self._ledger.get.aio(key)
            if text is not None:
                counts[key] = int(text)
        return counts

    async def _release(self, releases: Sequence[Lease], now: float) -> None:
        """Write each task's queued state, then send it again with its attempt not counted.

        In this order a consumer that claims the item at once writes its lease
        after the queued state, so the lease is not overwritten.
        """
        returned = [lease.task.with_attempt(lease.task.attempt - 1) for lease in releases]
        await self._ledger.update.aio({f"s/{task.task_id}": _state(QUEUED, task, queued_at=now) for task in returned})
        await self._send((task, self._encode_task(task)) for task in returned)

    async def _store_dead_letters(self, dead: Sequence[DeadLetter], now: float) -> dict[str, str]:
        updates: dict[str, str] = {}
        for letter in dead:
            record = {
                "task": letter.lease.task.to_dict(),
                "error": letter.error,
                "traceback": letter.traceback,
                "finished_at": now,
            }
            path = self._dead_letter_path(letter.lease.task_id)
            await anyio.to_thread.run_sync(write_json_atomic, record, path)
            updates[f"s/{letter.lease.task_id}"] = _state(DEAD, letter.lease.task, finished_at=now, error=letter.error)
            updates[f"d/{letter.lease.task_id}"] = json.dumps({"error": letter.error[:500], "finished_at": now})
        if self._commit is not None:
            await self._commit()
        return updates

    def _dead_letter_path(self, task_id: str) -> Path:
        return self._dead_letter_dir / self.name / f"{task_id}.json"

    # -- reconciler ------------------------------------------------------

    async def reconcile(self) -> ReconcileReport:
        """Deliver again expired leases, finished retry delays and tasks lost between get and lease."""
        self._last_reconcile = time.monotonic()
        # The scan of the ledger takes a while. A queue found empty before it
        # and after it held no item of a task that the scan saw as queued.
        empty_before = await self._queue.len.aio(total=True) == 0
        snapshot = await self._snapshot()
        queue_empty = empty_before and await self._queue.len.aio(total=True) == 0
        now = time.time()

        counts = {"expired": 0, "retried": 0, "lost": 0, "buried": 0}
        redeliver: list[tuple[Task, str, str]] = []
        buried: list[DeadLetter] = []
        for task_id, record in snapshot.tasks.items():
            outcome = _reconcile_outcome(record, snapshot.states.get(task_id), queue_empty, now, self.settings)
            if outcome is None:
                continue
            kind, stamp, attempt = outcome
            generation = (snapshot.states.get(task_id) or {}).get("generation", 0)
            task = _task_from_record(record).with_attempt(attempt)
            if kind == "buried":
                lease = Lease(task, "reconciler", now, now)
                message = (
                    f"lease expired on attempt {attempt} of {task.max_attempts}: the consumer stopped without"
                    " settling the task (killed, preempted or out of memory)"
                )
                buried.append(DeadLetter(lease, message))
            else:
                redeliver.append((task, kind, f"r/{task_id}/{attempt}/{stamp}", generation))

        # A state the scan read may have changed since: a lease extended, a
        # task claimed or settled. Act only on the tasks whose state is unchanged.
        unchanged = await self._unchanged_states(
            [letter.lease.task_id for letter in buried] + [task.task_id for task, *_ in redeliver], snapshot
        )
        buried = [letter for letter in buried if letter.lease.task_id in unchanged]
        redeliver = [candidate for candidate in redeliver if candidate[0].task_id in unchanged]

        delivered = await self._claim_redeliveries(redeliver)
        for task, kind, _ in delivered:
            counts[kind] += 1
        if delivered:
            # The queued states go first, so a consumer that claims an item at once is not overwritten.
            await self._ledger.update.aio(
                {
                    f"s/{task.task_id}": _state(QUEUED, task, generation=generation + 1, queued_at=now)
                    for task, _, generation in delivered
                }
            )
            await self._send((task, self._encode_task(task)) for task, _, _ in delivered)
        if buried:
            await self.settle(dead=buried)
            counts["buried"] = len(buried)
            for letter in buried:
                logger.error("task dead id=%s attempt=%d/%d error=%s", letter.lease.task_id,
                             letter.lease.task.attempt, letter.lease.task.max_attempts, letter.error)

        report = ReconcileReport(**counts)
        if report.delivered or report.buried:
            logger.info(
                "reconciled queue=%s expired=%d retried=%d lost=%d buried=%d",
                self.name, report.expired, report.retried, report.lost, report.buried,
            )
        return report

    async def _unchanged_states(self, task_ids: Sequence[str], snapshot: _Snapshot) -> set[str]:
        fresh = await self._read_states(task_ids)
        return {task_id for task_id in task_ids if fresh.get(task_id) == snapshot.states.get(task_id)}

    async def _claim_redeliveries(
        self, candidates: list[tuple[Task, str, str, int]]
    ) -> list[tuple[Task, str, int]]:
        """Keep the candidates whose marker this reconciler created, so two reconcilers never both deliver one."""
        claimed: list[tuple[Task, str, int]] = []
        limiter = anyio.CapacityLimiter(self.settings.dedup_concurrency)

        async def try_claim(task: Task, kind: str, marker: str, generation: int) -> None:
            async with limiter:
                if await self._ledger.put.aio(marker, "1", skip_if_exists=True):
                    claimed.append((task, kind, generation))

        async with anyio.create_task_group() as group:
            for task, kind, marker, generation in candidates:
                group.start_soon(try_claim, task, kind, marker, generation)
        return claimed

    async def _snapshot(self) -> _Snapshot:
        snapshot = _Snapshot()
        async for key, value in self._ledger.items.aio():
            if not isinstance(key, str):
                continue
            prefix, _, task_id = key.partition("/")
            if prefix == "t":
                snapshot.tasks[task_id] = json.loads(value)
            elif prefix == "s":
                snapshot.states[task_id] = json.loads(value)
            elif prefix == "d":
                snapshot.dead[task_id] = json.loads(value)
            elif prefix == "o":
                snapshot.oom_moves += int(value)
        return snapshot

    # -- operators -------------------------------------------------------

    async def stats(self) -> QueueStats:
        snapshot = await self._snapshot()
        now = time.time()
        counts = {"queued": 0, "retrying": 0, "in_flight": 0, "expired": 0, "done": 0, "dead": 0}
        lane_depth: dict[str, int] = {}
        finished = 0
        for task_id, record in snapshot.tasks.items():
            state = snapshot.states.get(task_id, {"state": QUEUED, "attempt": 0})
            bucket = _stats_bucket(state, now)
            counts[bucket] += 1
            if bucket in ("queued", "retrying", "expired"):
                lane = record.get("lane", DEFAULT_LANE)
                lane_depth[lane] = lane_depth.get(lane, 0) + 1
            if bucket in (DONE, DEAD) and state.get("finished_at", 0) >= now - THROUGHPUT_WINDOW_S:
                finished += 1
        return QueueStats(**counts, lane_depth=lane_depth, finished_last_5m=finished, oom_moves=snapshot.oom_moves)

    async def has_pending(self, lane: str | None = None) -> bool:
        self._drop_expired_overflow()
        if any(held for (_, held_lane), held in self._overflow.items() if lane is None or held_lane == lane):
            return True
        # Items in the queue are pending work; a few QueueLen calls spare a scan of the whole ledger.
        if await self._has_items(lane):
            return True
        snapshot = await self._snapshot()
        for task_id, record in snapshot.tasks.items():
            if lane is not None and record.get("lane", DEFAULT_LANE) != lane:
                continue
            if snapshot.states.get(task_id, {}).get("state") not in (DONE, DEAD):
                return True
        return False

    async def _has_items(self, lane: str | None) -> bool:
        if lane is None:
            return await self._queue.len.aio(total=True) > 0
        for index in range(self.settings.partitions):
            if await self._queue.len.aio(partition=self.partition_key(lane, index)) > 0:
                return True
        return False

    async def dead_letters(self, limit: int = 100) -> list[DeadTask]:
        snapshot = await self._snapshot()
        newest = sorted(snapshot.dead.items(), key=lambda item: item[1].get("finished_at", 0), reverse=True)[:limit]
        letters = []
        for task_id, index in newest:
            record = await anyio.to_thread.run_sync(_read_json, self._dead_letter_path(task_id))
            task_record = (record or {}).get("task") or snapshot.tasks.get(task_id)
            if task_record is None:
                continue
            letters.append(
                DeadTask(
                    task=_task_from_record(task_record),
                    error=(record or index).get("error", ""),
                    traceback=(record or {}).get("traceback", ""),
                    finished_at=index.get("finished_at", 0.0),
                )
            )
        return letters

    async def metadata(self) -> dict[str, Any]:
        text = await self._ledger.get.aio("meta")
        return json.loads(text) if text else {}

    async def set_metadata(self, values: Mapping[str, Any]) -> None:
        merged = {**await self.metadata(), **values}
        await self._ledger.put.aio("meta", json.dumps(merged, sort_keys=True))

    async def exists(self) -> bool:
        return await self._ledger.contains.aio("meta")

    async def done_task_ids(self) -> set[str]:
        snapshot = await self._snapshot()
        return {task_id for task_id, state in snapshot.states.items() if state.get("state") == DONE}

    async def take_waiting(self) -> list[Task]:
        """Empty the queue's items and forget every task that is not in flight, done or dead."""
        await self._queue.clear.aio(all=True)
        self._overflow.clear()
        snapshot = await self._snapshot()
        now = time.time()
        taken = []
        for task_id, record in snapshot.tasks.items():
            state = snapshot.states.get(task_id)
            bucket = _stats_bucket(state, now) if state else "queued"
            if bucket in ("queued", "retrying", "expired"):
                taken.append(_task_from_record(record).with_attempt(0))
        for task in taken:
            await self._ledger.pop.aio(f"t/{task.task_id}", None)
            await self._ledger.pop.aio(f"s/{task.task_id}", None)
        return taken

    async def requeue_dead(self, task_ids: Sequence[str]) -> int:
        """Put the named dead letters back into the queue from attempt 1 and drop them from the dead-letter index."""
        return await self._requeue(DEAD, task_ids)

    async def requeue_done(self, task_ids: Sequence[str]) -> int:
        return await self._requeue(DONE, task_ids)

    async def _requeue(self, from_state: str, task_ids: Sequence[str]) -> int:
        states = await self._read_states(task_ids)
        matching = [task_id for task_id, state in states.items() if state.get("state") == from_state]
        records = await self._read_task_records(matching)
        tasks = [_task_from_record(record).with_attempt(0) for record in records]
        if not tasks:
            return 0

        now = time.time()
        await self._ledger.update.aio({f"s/{task.task_id}": _state(QUEUED, task, queued_at=now) for task in tasks})
        await self._send((task, self._encode_task(task)) for task in tasks)
        for task in tasks:
            await self._ledger.pop.aio(f"d/{task.task_id}", None)
        return len(tasks)

    async def _read_task_records(self, task_ids: Sequence[str]) -> list[dict[str, Any]]:
        records = []
        for task_id in task_ids:
            text = await self._ledger.get.aio(f"t/{task_id}")
            if text:
                records.append(json.loads(text))
        return records

    async def purge(self) -> int:
        """Delete every task of this queue: queue items, ledger and dead-letter records."""
        snapshot = await self._snapshot()
        await self._queue.clear.aio(all=True)
        await self._ledger.clear.aio()
        self._overflow.clear()
        return len(snapshot.tasks)

    async def close(self) -> None:
        """Nothing to release: the modal client's connection is shared by the process."""


def _state(state: str, task: Task, **fields: Any) -> str:
    record = {"state": state, "attempt": task.attempt, "max_attempts": task.max_attempts, **fields}
    return json.dumps(record, separators=(",", ":"))


def _task_from_record(record: Mapping[str, Any]) -> Task:
    return Task(
        seed=record["seed"],
        config=record["config"],
        task_id=record["task_id"],
        attempt=record.get("attempt", 0),
        lane=record.get("lane", DEFAULT_LANE),
        max_attempts=record.get("max_attempts", 3),
        enqueued_at=record.get("enqueued_at", 0.0),
    )


def _reconcile_outcome(
    record: Mapping[str, Any], state: dict[str, Any] | None, queue_empty: bool, now: float, settings: ModalQueueSettings
) -> tuple[str, str, int] | None:
    """Decide what the reconciler does with one task: (kind, marker stamp, attempt) or None to leave it."""
    if state is None:
        unsent_for_s = now - record.get("enqueued_at", 0.0)
        if queue_empty and unsent_for_s > settings.put_timeout_s + settings.lost_grace_s:
            return ("lost", "g0", 0)
        return None

    kind = state["state"]
    attempt = state.get("attempt", 0)
    if kind == LEASED and state.get("expires_at", 0) <= now:
        if attempt >= state.get("max_attempts", 1):
            return ("buried", "", attempt)
        return ("expired", f"{state['expires_at']:.3f}", attempt)
    if kind == RETRY and state.get("visible_at", 0) <= now:
        return ("retried", f"{state['visible_at']:.3f}", attempt)
    if kind == QUEUED and queue_empty and now - state.get("queued_at", 0.0) > settings.lost_grace_s:
        return ("lost", f"g{state.get('generation', 0)}", attempt)
    return None


def _stats_bucket(state: dict[str, Any], now: float) -> str:
    kind = state["state"]
    if kind == LEASED:
        return "expired" if state.get("expires_at", 0) <= now else "in_flight"
    if kind == RETRY:
        return "retrying"
    if kind == QUEUED:
        return "retrying" if state.get("attempt", 0) > 0 else "queued"
    return kind


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
