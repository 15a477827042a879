"""The queue interface every backend implements, and the records it passes around.

A consumer claims tasks under a lease, extends the lease while a task runs,
and settles each task with an ack (done), a retry (after a delay) or a dead
letter. Settling is batched: one call records many outcomes at once, so the
per-task cost is a small share of one commit.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .task import DEFAULT_LANE, Task


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed task, invisible to other consumers until ``expires_at`` (unix seconds).

    ``task.attempt`` is the delivery this lease belongs to, starting at 1.
    """

    task: Task
    owner: str
    claimed_at: float
    expires_at: float

    @property
    def task_id(self) -> str:
        return self.task.task_id


@dataclass(frozen=True, slots=True)
class Retry:
    """A failed task to deliver again after ``delay_s`` seconds."""

    lease: Lease
    delay_s: float
    error: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A failed task that will not be delivered again, with its error and traceback."""

    lease: Lease
    error: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class OomMove:
    """A task that ran out of GPU memory beside other tasks, to deliver again alone on the solo lane.

    The attempt does not count: the task is not at fault.
    """

    lease: Lease
    error: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class PutResult:
    added: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class DeadTask:
    """A task in the dead letters, as an operator sees it."""

    task: Task
    error: str
    traceback: str
    finished_at: float


# The window over which status reports throughput and estimates the time left.
THROUGHPUT_WINDOW_S = 300.0


@dataclass(frozen=True)
class QueueStats:
    """Counts of one queue's tasks by state.

    ``queued`` tasks wait for their first delivery; ``retrying`` ones failed
    and wait for another (possibly still in backoff); ``expired`` leases
    belong to consumers that stopped without settling and will be delivered again.
    """

    queued: int = 0
    retrying: int = 0
    in_flight: int = 0
    expired: int = 0
    done: int = 0
    dead: int = 0
    lane_depth: Mapping[str, int] = field(default_factory=dict)
    finished_last_5m: int = 0  # tasks done or dead in the last THROUGHPUT_WINDOW_S seconds
    oom_moves: int = 0  # moves to the solo lane after out-of-memory errors, since the queue was created or purged

    @property
    def throughput_per_s(self) -> float:
        """Tasks finished per second over the last five minutes."""
        return self.finished_last_5m / THROUGHPUT_WINDOW_S

    @property
    def eta_s(self) -> float | None:
        """Seconds until every pending task is finished at the recent throughput, or None if nothing finished lately."""
        if self.pending == 0:
            return 0.0
        rate = self.throughput_per_s
        return self.pending / rate if rate > 0 else None

    @property
    def depth(self) -> int:
        """Tasks not yet claimed or whose lease ran out."""
        return self.queued + self.retrying + self.expired

    @property
    def pending(self) -> int:
        """Tasks that are not finished: waiting, retrying or in flight."""
        return self.depth + self.in_flight

    @property
    def total(self) -> int:
        return self.pending + self.done + self.dead

    def as_dict(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "retrying": self.retrying,
            "in_flight": self.in_flight,
            "expired": self.expired,
            "done": self.done,
            "dead": self.dead,
            "depth": self.depth,
            "total": self.total,
            "lane_depth": dict(self.lane_depth),
            "oom_moves": self.oom_moves,
            "throughput_per_s": round(self.throughput_per_s, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }


class TaskQueue(abc.ABC):
    """A named, durable task queue with leases, lanes and dead letters."""

    name: str

    @abc.abstractmethod
    async def put(self, tasks: Sequence[Task]) -> PutResult:
        """Add tasks; a task whose id the queue already holds, in any state, is skipped."""

    @abc.abstractmethod
    async def claim(self, owner: str, limit: int, lease_s: float, lane: str = DEFAULT_LANE) -> list[Lease]:
        """Lease up to ``limit`` ready tasks of ``lane`` to ``owner`` for ``lease_s`` seconds.

        Tasks whose lease expired are ready again; one whose lease expired on
        its last allowed attempt goes to the dead letters instead.
        """

    @abc.abstractmethod
    async def extend(self, owner: str, leases: Sequence[Lease], lease_s: float) -> set[str]:
        """Push the expiry of ``owner``'s leases ``lease_s`` seconds ahead; return ids of leases no longer held."""

    @abc.abstractmethod
    async def settle(
        self,
        acks: Sequence[Lease] = (),
        retries: Sequence[Retry] = (),
        dead: Sequence[DeadLetter] = (),
        releases: Sequence[Lease] = (),
        oom_moves: Sequence[OomMove] = (),
    ) -> None:
        """Record many outcomes at once.

        An ack marks the task done. A retry makes it ready again after its
        delay. A dead letter stores the error and traceback. A release returns
        an unstarted or interrupted task without counting the attempt. An OOM
        move returns the task on the solo lane, without counting the attempt,
        and adds one to ``QueueStats.oom_moves``. Outcomes for leases that are
        no longer held are ignored.
        """

    @abc.abstractmethod
    async def stats(self) -> QueueStats:
        """Count the queue's tasks by state."""

    @abc.abstractmethod
    async def has_pending(self, lane: str | None = None) -> bool:
        """Return whether any task of ``lane`` (of any lane if None) is waiting, retrying or in flight."""

    @abc.abstractmethod
    async def dead_letters(self, limit: int = 100) -> list[DeadTask]:
        """Return up to ``limit`` dead letters, newest first."""

    @abc.abstractmethod
    async def requeue_dead(self, task_ids: Sequence[str]) -> int:
        """Deliver the named dead letters again from attempt 1; return how many were requeued."""

    @abc.abstractmethod
    async def requeue_done(self, task_ids: Sequence[str]) -> int:
        """Deliver the named done tasks again from attempt 1, as when their result was lost; return how many."""

    @abc.abstractmethod
    async def done_task_ids(self) -> set[str]:
        """Return the ids of every task marked done."""

    @abc.abstractmethod
    async def take_waiting(self) -> list[Task]:
        """Remove and return every task that waits for delivery (queued, retrying or with an expired lease).

        Tasks in flight stay. A removed task is forgotten, so pushing it again adds it anew.
        """

    @abc.abstractmethod
    async def purge(self) -> int:
        """Delete every task of the queue, in any state; return how many were deleted."""

    @abc.abstractmethod
    async def metadata(self) -> dict[str, Any]:
        """Return what producers recorded about the queue, such as its workload."""

    @abc.abstractmethod
    async def set_metadata(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into the queue's metadata."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the backend's connections."""

    async def ack(self, leases: Sequence[Lease]) -> None:
        await self.settle(acks=leases)

    async def release(self, leases: Sequence[Lease]) -> None:
        await self.settle(releases=leases)

    async def __aenter__(self) -> TaskQueue:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
