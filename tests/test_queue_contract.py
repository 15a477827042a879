"""Contract tests for the TaskQueue interface, run against every queue backend.

The ``queue_factory`` fixture yields ``make_queue(name="jobs")``, an async
factory of open queues. The tests above the "SQLite only" section use nothing
but the TaskQueue interface, so a new backend joins them by adding one
parameter to ``queue_factory``. Tests that wait for a lease to expire claim
with ``SHORT_LEASE_S`` and sleep just past it, so a backend must honour leases
shorter than a second.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from qworker.backends.modal_queue import ModalQueueSettings, ModalTaskQueue
from qworker.backends.sqlite import SqliteQueue
from qworker.errors import QueueFileError
from qworker.queue import DeadLetter, Lease, OomMove, QueueStats, Retry, TaskQueue
from qworker.task import DEFAULT_LANE, SOLO_LANE, Task

from queue_hammer import PRODUCER_DONE_KEY, QUEUE_NAME, hammer_task

pytestmark = pytest.mark.anyio

QueueFactory = Callable[..., Awaitable[TaskQueue]]

TESTS_DIR = Path(__file__).parent
HAMMER_SCRIPT = TESTS_DIR / "queue_hammer.py"

SHORT_LEASE_S = 0.2
LONG_LEASE_S = 60.0
# Maximum time of one wait inside a test, so a hung backend fails instead of stalling the run.
WAIT_TIMEOUT_S = 10.0
HAMMER_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


# One task per queue item and a reconciler that runs whenever a claim finds
# nothing make the Modal adapter deliver task by task, as the contract expects.
# Packing many tasks per item is tested in test_modal_queue.py.
MODAL_CONTRACT_SETTINGS = ModalQueueSettings(partitions=1, tasks_per_item=1, reconcile_interval_s=0.0, lost_grace_s=5.0)


@pytest.fixture(params=["sqlite", "modal"])
async def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueFactory]:
    """Yield ``make_queue(name="jobs")``, which opens a queue that is closed after the test.

    Two calls with the same name return two handles on the same durable queue.
    The Modal adapter runs through the real modal client against the local
    Modal-compatible server; each test gets queue names of its own there.
    """
    opened: list[TaskQueue] = []
    prefix = uuid.uuid4().hex[:8]
    if request.param == "modal":
        request.getfixturevalue("modal_server")

    async def make_queue(name: str = "jobs") -> TaskQueue:
        if request.param == "sqlite":
            queue: TaskQueue = SqliteQueue(tmp_path / "queue.sqlite", name)
        elif request.param == "modal":
            queue = await ModalTaskQueue.open(f"{name}-{prefix}", tmp_path / "dead_letters", MODAL_CONTRACT_SETTINGS)
        else:
            raise AssertionError(f"unknown queue backend {request.param!r}")
        opened.append(queue)
        return queue

    make_queue.backend = request.param  # type: ignore[attr-defined]
    yield make_queue

    for queue in opened:
        await queue.close()


def make_tasks(count: int, *, start: int = 0, lane: str = DEFAULT_LANE, max_attempts: int = 3) -> list[Task]:
    return [
        Task.create(seed, {"n": seed, "tag": "contract"}, lane=lane, max_attempts=max_attempts)
        for seed in range(start, start + count)
    ]


def task_ids(items: list[Lease] | list[Task]) -> set[str]:
    return {item.task_id for item in items}


async def sleep_past(leases: list[Lease], margin_s: float = 0.1) -> None:
    """Sleep until every lease in ``leases`` has expired, plus ``margin_s``."""
    with anyio.fail_after(WAIT_TIMEOUT_S):
        latest = max(lease.expires_at for lease in leases)
        await anyio.sleep(max(0.0, latest - time.time()) + margin_s)


# -- put and claim -------------------------------------------------------


async def test_claim_returns_put_tasks(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(3)
    await queue.put(tasks)

    leases = await queue.claim("owner-a", limit=10, lease_s=LONG_LEASE_S)

    by_id = {lease.task_id: lease for lease in leases}
    assert set(by_id) == task_ids(tasks)
    for task in tasks:
        claimed = by_id[task.task_id].task
        assert claimed.attempt == 1
        assert claimed.seed == task.seed
        assert dict(claimed.config) == dict(task.config)
        assert claimed.lane == DEFAULT_LANE
        assert claimed.max_attempts == task.max_attempts
        assert by_id[task.task_id].owner == "owner-a"


async def test_claim_sets_lease_expiry(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(1))

    before = time.time()
    [lease] = await queue.claim("owner-a", limit=1, lease_s=30.0)

    assert lease.claimed_at >= before - 1.0
    assert lease.expires_at == pytest.approx(lease.claimed_at + 30.0, abs=1.0)


async def test_claim_empty_queue(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()

    assert await queue.claim("owner-a", limit=5, lease_s=LONG_LEASE_S) == []


async def test_claim_respects_limit(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(5))

    leases = await queue.claim("owner-a", limit=2, lease_s=LONG_LEASE_S)

    assert len(leases) == 2


async def test_claim_skips_leased_tasks(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(5)
    await queue.put(tasks)

    first = await queue.claim("owner-a", limit=2, lease_s=LONG_LEASE_S)
    second = await queue.claim("owner-b", limit=10, lease_s=LONG_LEASE_S)
    third = await queue.claim("owner-c", limit=10, lease_s=LONG_LEASE_S)

    assert len(second) == 3
    assert task_ids(first).isdisjoint(task_ids(second))
    assert task_ids(first) | task_ids(second) == task_ids(tasks)
    assert third == []


async def test_claim_first_in_first_out(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    batches = [make_tasks(10, start=start) for start in (0, 10, 20)]
    for batch in batches:
        await queue.put(batch)
        await anyio.sleep(0.01)

    leases = await queue.claim("owner-a", limit=10, lease_s=LONG_LEASE_S)

    assert task_ids(leases) == task_ids(batches[0])


async def test_queues_isolated_by_name(queue_factory: QueueFactory) -> None:
    jobs = await queue_factory("jobs")
    other = await queue_factory("other")
    await jobs.put(make_tasks(2))

    assert await other.claim("owner-a", limit=10, lease_s=LONG_LEASE_S) == []
    assert await other.has_pending() is False
    assert (await other.stats()).total == 0


async def test_second_handle_sees_tasks(queue_factory: QueueFactory) -> None:
    writer = await queue_factory("jobs")
    reader = await queue_factory("jobs")
    tasks = make_tasks(2)
    await writer.put(tasks)

    leases = await reader.claim("owner-a", limit=10, lease_s=LONG_LEASE_S)

    assert task_ids(leases) == task_ids(tasks)


# -- deduplication -------------------------------------------------------


async def test_put_reports_duplicates(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(4)

    first = await queue.put(tasks)
    again = await queue.put(tasks)

    assert (first.added, first.duplicates) == (4, 0)
    assert (again.added, again.duplicates) == (0, 4)


async def test_put_counts_partial_duplicates(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(3))

    result = await queue.put(make_tasks(5))

    assert (result.added, result.duplicates) == (2, 3)


async def test_put_dedups_within_call(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    [task] = make_tasks(1)

    result = await queue.put([task, task])

    assert (result.added, result.duplicates) == (1, 1)


async def test_duplicates_delivered_once(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(4)
    await queue.put(tasks)
    await queue.put(tasks)

    first = await queue.claim("owner-a", limit=10, lease_s=LONG_LEASE_S)
    await queue.put(tasks)  # again while every task is leased
    second = await queue.claim("owner-b", limit=10, lease_s=LONG_LEASE_S)

    assert len(first) == 4
    assert task_ids(first) == task_ids(tasks)
    assert second == []


async def test_put_skips_done_task(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(2)
    await queue.put(tasks)
    await queue.ack(await queue.claim("owner-a", limit=10, lease_s=LONG_LEASE_S))

    result = await queue.put(tasks)

    assert result.duplicates == 2
    assert await queue.claim("owner-b", limit=10, lease_s=LONG_LEASE_S) == []
    assert (await queue.stats()).done == 2


async def test_put_skips_dead_task(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(1)
    await queue.put(tasks)
    [lease] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)
    await queue.settle(dead=[DeadLetter(lease, "ValueError: boom")])

    result = await queue.put(tasks)

    assert result.duplicates == 1
    assert await queue.claim("owner-b", limit=10, lease_s=LONG_LEASE_S) == []


# -- leases --------------------------------------------------------------


async def test_expired_lease_redelivered(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    [task] = make_tasks(1)
    await queue.put([task])

    [first] = await queue.claim("owner-a", limit=1, lease_s=SHORT_LEASE_S)
    before_expiry = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)
    await sleep_past([first])
    redelivered = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)

    assert first.task.attempt == 1
    assert before_expiry == []
    assert task_ids(redelivered) == {task.task_id}
    assert redelivered[0].task.attempt == 2
    assert redelivered[0].owner == "owner-b"


async def test_extend_keeps_lease(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(1))
    leases = await queue.claim("owner-a", limit=1, lease_s=SHORT_LEASE_S)

    lost = await queue.extend("owner-a", leases, LONG_LEASE_S)
    await sleep_past(leases)

    assert lost == set()
    assert await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S) == []
    assert (await queue.stats()).in_flight == 1


async def test_extend_reports_taken_lease(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(2))
    leases = await queue.claim("owner-a", limit=2, lease_s=SHORT_LEASE_S)
    await sleep_past(leases)
    taken_over = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)

    lost = await queue.extend("owner-a", leases, LONG_LEASE_S)

    assert len(taken_over) == 1
    # An expired lease that no consumer claimed yet may be revived or reported lost, by backend.
    assert task_ids(taken_over) <= lost


async def test_extend_reports_settled_lease(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(2))
    leases = await queue.claim("owner-a", limit=2, lease_s=LONG_LEASE_S)
    await queue.ack(leases[:1])

    lost = await queue.extend("owner-a", leases, LONG_LEASE_S)

    assert lost == {leases[0].task_id}


async def test_extend_only_given_leases(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(2))
    leases = await queue.claim("owner-a", limit=2, lease_s=SHORT_LEASE_S)
    extended, lapsing = leases

    await queue.extend("owner-a", [extended], LONG_LEASE_S)
    await sleep_past([lapsing])
    redelivered = await queue.claim("owner-b", limit=2, lease_s=LONG_LEASE_S)

    assert task_ids(redelivered) == {lapsing.task_id}


# -- settling ------------------------------------------------------------


async def test_ack_marks_done(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(3))
    leases = await queue.claim("owner-a", limit=3, lease_s=LONG_LEASE_S)

    await queue.ack(leases)

    stats = await queue.stats()
    assert stats.done == 3
    assert stats.in_flight == 0
    assert stats.pending == 0


async def test_stale_ack_ignored(queue_factory: QueueFactory) -> None:
    if queue_factory.backend == "modal":  # type: ignore[attr-defined]
        pytest.skip("the Modal ledger is last-write-wins: a stale consumer's settlement overwrites the newer lease")
    queue = await queue_factory()
    await queue.put(make_tasks(1))
    [stale] = await queue.claim("owner-a", limit=1, lease_s=SHORT_LEASE_S)
    await sleep_past([stale])
    [current] = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)

    await queue.ack([stale])
    after_stale_ack = await queue.stats()
    await queue.ack([current])
    after_current_ack = await queue.stats()

    assert current.task.attempt == 2
    assert after_stale_ack.done == 0
    assert after_stale_ack.in_flight == 1
    assert after_current_ack.done == 1
    assert after_current_ack.total == 1


async def test_stale_retry_ignored(queue_factory: QueueFactory) -> None:
    if queue_factory.backend == "modal":  # type: ignore[attr-defined]
        pytest.skip("the Modal ledger is last-write-wins: a stale consumer's settlement overwrites the newer lease")
    queue = await queue_factory()
    await queue.put(make_tasks(1))
    [stale] = await queue.claim("owner-a", limit=1, lease_s=SHORT_LEASE_S)
    await sleep_past([stale])
    await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)

    await queue.settle(retries=[Retry(stale, delay_s=0.0, error="ValueError: late")])

    stats = await queue.stats()
    assert stats.in_flight == 1
    assert stats.retrying == 0


async def test_retry_waits_for_delay(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    [task] = make_tasks(1)
    await queue.put([task])
    [lease] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)

    await queue.settle(retries=[Retry(lease, delay_s=1.0, error="ValueError: boom", traceback="Traceback ...")])
    during_delay = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)
    stats = await queue.stats()
    with anyio.fail_after(WAIT_TIMEOUT_S):
        await anyio.sleep(1.1)
    after_delay = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)

    assert during_delay == []
    assert stats.retrying == 1
    assert stats.queued == 0
    assert stats.in_flight == 0
    assert task_ids(after_delay) == {task.task_id}
    assert after_delay[0].task.attempt == 2


async def test_dead_letter_stored(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    [task] = make_tasks(1)
    await queue.put([task])
    [lease] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)
    trace = 'Traceback (most recent call last):\n  File "handler.py", line 3\nValueError: boom\n'

    await queue.settle(dead=[DeadLetter(lease, "ValueError: boom", trace)])

    [dead] = await queue.dead_letters()
    assert dead.task.task_id == task.task_id
    assert dead.task.seed == task.seed
    assert dead.task.attempt == 1
    assert dead.error == "ValueError: boom"
    assert dead.traceback == trace
    assert dead.finished_at > 0
    assert (await queue.stats()).dead == 1
    assert await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S) == []


async def test_requeue_dead_delivers_again(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(2)
    await queue.put(tasks)
    leases = await queue.claim("owner-a", limit=2, lease_s=LONG_LEASE_S)
    await queue.settle(dead=[DeadLetter(lease, "ValueError: boom") for lease in leases])

    requeued = await queue.requeue_dead([tasks[0].task_id, "no-such-task"])
    [lease] = await queue.claim("owner-b", limit=2, lease_s=LONG_LEASE_S)

    assert requeued == 1
    assert lease.task_id == tasks[0].task_id
    assert lease.task.attempt == 1
    assert [dead.task.task_id for dead in await queue.dead_letters()] == [tasks[1].task_id]


async def test_take_waiting_leaves_in_flight(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(3)
    await queue.put(tasks)
    [lease] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)

    taken = await queue.take_waiting()
    stats = await queue.stats()
    again = await queue.put(taken)

    assert sorted(task.task_id for task in taken) == sorted(t.task_id for t in tasks if t.task_id != lease.task_id)
    assert stats.in_flight == 1
    assert stats.total == 1
    assert again.added == 2


async def test_requeue_done_delivers_again(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(2)
    await queue.put(tasks)
    await queue.ack(await queue.claim("owner-a", limit=2, lease_s=LONG_LEASE_S))
    done_before = await queue.done_task_ids()

    requeued = await queue.requeue_done([tasks[1].task_id])
    [lease] = await queue.claim("owner-b", limit=2, lease_s=LONG_LEASE_S)

    assert done_before == task_ids(tasks)
    assert requeued == 1
    assert lease.task_id == tasks[1].task_id
    assert lease.task.attempt == 1
    assert await queue.done_task_ids() == {tasks[0].task_id}


async def test_purge_deletes_every_task(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(3))
    await queue.ack(await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S))

    deleted = await queue.purge()

    assert deleted == 3
    assert (await queue.stats()).total == 0
    assert await queue.claim("owner-a", limit=5, lease_s=LONG_LEASE_S) == []


async def test_dead_letters_newest_first(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    tasks = make_tasks(3)
    await queue.put(tasks)
    leases = await queue.claim("owner-a", limit=3, lease_s=LONG_LEASE_S)
    for lease in leases:
        await queue.settle(dead=[DeadLetter(lease, f"ValueError: {lease.task_id}")])
        await anyio.sleep(0.01)

    newest = await queue.dead_letters(limit=2)

    assert [dead.task.task_id for dead in newest] == [leases[2].task_id, leases[1].task_id]


async def test_last_attempt_expiry_buried(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    [task] = make_tasks(1, max_attempts=1)
    await queue.put([task])
    [lease] = await queue.claim("owner-a", limit=1, lease_s=SHORT_LEASE_S)
    await sleep_past([lease])

    redelivered = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)

    assert redelivered == []
    [dead] = await queue.dead_letters()
    assert dead.task.task_id == task.task_id
    assert "lease expired" in dead.error
    assert (await queue.stats()).dead == 1
    assert await queue.has_pending() is False


async def test_release_keeps_attempt(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    [task] = make_tasks(1)
    await queue.put([task])
    [lease] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)

    await queue.release([lease])
    stats = await queue.stats()
    [again] = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)

    assert stats.queued == 1
    assert stats.in_flight == 0
    assert again.task_id == task.task_id
    assert again.task.attempt == 1


async def test_release_after_retry(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(1))
    [first] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)
    await queue.settle(retries=[Retry(first, delay_s=0.0, error="ValueError: boom")])
    [second] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)

    await queue.release([second])
    [third] = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S)

    assert second.task.attempt == 2
    assert third.task.attempt == 2


async def test_settle_mixed_outcomes(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(4))
    acked, retried, buried, released = await queue.claim("owner-a", limit=4, lease_s=LONG_LEASE_S)

    await queue.settle(
        acks=[acked],
        retries=[Retry(retried, delay_s=LONG_LEASE_S, error="ValueError: boom")],
        dead=[DeadLetter(buried, "ValueError: fatal")],
        releases=[released],
    )

    stats = await queue.stats()
    assert stats.done == 1
    assert stats.retrying == 1
    assert stats.dead == 1
    assert stats.queued == 1
    assert stats.in_flight == 0


# -- lanes ---------------------------------------------------------------


async def test_solo_lane_claimed_separately(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    default_tasks = make_tasks(2)
    solo_tasks = make_tasks(2, start=100, lane=SOLO_LANE)
    await queue.put(default_tasks + solo_tasks)

    default_leases = await queue.claim("owner-a", limit=10, lease_s=LONG_LEASE_S)
    solo_leases = await queue.claim("owner-b", limit=10, lease_s=LONG_LEASE_S, lane=SOLO_LANE)

    assert task_ids(default_leases) == task_ids(default_tasks)
    assert task_ids(solo_leases) == task_ids(solo_tasks)
    assert {lease.task.lane for lease in solo_leases} == {SOLO_LANE}


async def test_solo_lane_invisible_to_default(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(2, lane=SOLO_LANE))

    assert await queue.claim("owner-a", limit=10, lease_s=LONG_LEASE_S) == []
    assert await queue.has_pending() is True


async def test_oom_move_goes_to_solo_lane(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    [task] = make_tasks(1)
    await queue.put([task])
    [lease] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)

    await queue.settle(oom_moves=[OomMove(lease, "OutOfMemoryError: CUDA out of memory")])
    on_default = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)
    [solo] = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S, lane=SOLO_LANE)

    assert on_default == []
    assert solo.task_id == task.task_id
    assert solo.task.lane == SOLO_LANE
    assert solo.task.attempt == 1


async def test_oom_moves_counted(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(3))
    leases = await queue.claim("owner-a", limit=3, lease_s=LONG_LEASE_S)

    await queue.settle(oom_moves=[OomMove(lease, "OutOfMemoryError") for lease in leases[:2]], acks=leases[2:])
    stats = await queue.stats()

    assert stats.oom_moves == 2
    assert stats.queued == 2
    assert stats.done == 1
    assert stats.lane_depth == {SOLO_LANE: 2}
    assert stats.as_dict()["oom_moves"] == 2
    assert await queue.has_pending(SOLO_LANE) is True
    assert await queue.has_pending(DEFAULT_LANE) is False


async def test_oom_moved_task_finishes_on_solo(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(1, max_attempts=1))
    [lease] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)
    await queue.settle(oom_moves=[OomMove(lease, "OutOfMemoryError")])

    [solo] = await queue.claim("owner-b", limit=1, lease_s=LONG_LEASE_S, lane=SOLO_LANE)
    await queue.ack([solo])
    stats = await queue.stats()

    assert solo.task.attempt == 1
    assert stats.done == 1
    assert stats.dead == 0
    assert stats.oom_moves == 1


# -- stats and has_pending -----------------------------------------------


async def test_stats_empty_queue(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()

    assert await queue.stats() == QueueStats()


async def test_stats_counts_each_state(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(7))
    await queue.put(make_tasks(1, start=100, lane=SOLO_LANE))
    acked, buried, retried, running = await queue.claim("owner-a", limit=4, lease_s=LONG_LEASE_S)
    await queue.settle(
        acks=[acked],
        dead=[DeadLetter(buried, "ValueError: fatal")],
        retries=[Retry(retried, delay_s=LONG_LEASE_S, error="ValueError: boom")],
    )
    expiring = await queue.claim("owner-b", limit=1, lease_s=SHORT_LEASE_S)
    await sleep_past(expiring)

    stats = await queue.stats()

    assert running.task.attempt == 1
    assert stats.queued == 3  # two default tasks and one solo task never claimed
    assert stats.retrying == 1
    assert stats.in_flight == 1
    assert stats.expired == 1
    assert stats.done == 1
    assert stats.dead == 1
    assert dict(stats.lane_depth) == {DEFAULT_LANE: 4, SOLO_LANE: 1}
    assert stats.depth == 5
    assert stats.pending == 6
    assert stats.total == 8


async def test_has_pending_follows_tasks(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    empty = await queue.has_pending()
    await queue.put(make_tasks(2))
    queued = await queue.has_pending()
    acked, buried = await queue.claim("owner-a", limit=2, lease_s=LONG_LEASE_S)
    leased = await queue.has_pending()
    await queue.ack([acked])
    one_leased = await queue.has_pending()
    await queue.settle(dead=[DeadLetter(buried, "ValueError: fatal")])
    finished = await queue.has_pending()

    assert empty is False
    assert queued is True
    assert leased is True
    assert one_leased is True
    assert finished is False


async def test_has_pending_during_retry_delay(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.put(make_tasks(1))
    [lease] = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)

    await queue.settle(retries=[Retry(lease, delay_s=LONG_LEASE_S, error="ValueError: boom")])

    assert await queue.has_pending() is True


# -- metadata ------------------------------------------------------------


async def test_metadata_starts_empty(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()

    assert await queue.metadata() == {}


async def test_metadata_round_trip(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    values = {"workload": "montecarlo", "seeds": [0, 500], "options": {"paths": 10000, "antithetic": True}}

    await queue.set_metadata(values)

    assert await queue.metadata() == values


async def test_metadata_merges_keys(queue_factory: QueueFactory) -> None:
    queue = await queue_factory()
    await queue.set_metadata({"workload": "montecarlo", "version": 1})

    await queue.set_metadata({"version": 2, "owner": "ops"})

    assert await queue.metadata() == {"workload": "montecarlo", "version": 2, "owner": "ops"}


async def test_metadata_per_queue(queue_factory: QueueFactory) -> None:
    jobs = await queue_factory("jobs")
    other = await queue_factory("other")
    reopened = await queue_factory("jobs")

    await jobs.set_metadata({"workload": "montecarlo"})

    assert await other.metadata() == {}
    assert await reopened.metadata() == {"workload": "montecarlo"}


# -- SQLite only: several processes on one file -------------------------


def start_hammer(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``queue_hammer.py`` with ``args``, its stdout and stderr going to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, str(HAMMER_SCRIPT), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=TESTS_DIR,
        )


def wait_for_processes(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> list[int]:
    """Wait up to ``timeout_s`` for every process and return the exit codes.

    Processes still running at the deadline are killed by PID, and the wait raises TimeoutExpired.
    """
    deadline = time.monotonic() + timeout_s
    try:
        return [process.wait(timeout=max(0.1, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def read_claims(claims_paths: list[Path]) -> list[tuple[str, int, str]]:
    claims = []
    for path in claims_paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            task_id, attempt, owner = line.split()
            claims.append((task_id, int(attempt), owner))
    return claims


def hammer_stats(db_path: Path) -> QueueStats:
    async def read() -> QueueStats:
        async with SqliteQueue(db_path, QUEUE_NAME, create=False) as queue:
            return await queue.stats()

    return anyio.run(read)


def prepare_hammer_file(db_path: Path, tasks: list[Task], producer_done: bool) -> None:
    """Create the queue file before the processes start, with ``tasks`` pushed."""

    async def prepare() -> None:
        async with SqliteQueue(db_path, QUEUE_NAME) as queue:
            await queue.put(tasks)
            await queue.set_metadata({PRODUCER_DONE_KEY: producer_done})

    anyio.run(prepare)


@pytest.mark.timeout(90)
def test_sqlite_consumers_claim_once(tmp_path: Path) -> None:
    task_count = 3000
    db_path = tmp_path / "hammer.sqlite"
    expected_ids = {task.task_id for task in map(hammer_task, range(task_count))}
    prepare_hammer_file(db_path, [hammer_task(index) for index in range(task_count)], producer_done=True)

    owners = [f"consumer-{number}" for number in range(4)]
    claims_paths = [tmp_path / f"{owner}.claims" for owner in owners]
    log_paths = [tmp_path / f"{owner}.log" for owner in owners]
    processes = [
        start_hammer(["consume", str(db_path), owner, str(claims), "--batch", "7", "--lease-s", "5"], log)
        for owner, claims, log in zip(owners, claims_paths, log_paths)
    ]
    exit_codes = wait_for_processes(processes, HAMMER_TIMEOUT_S)

    logs = "".join(path.read_text(encoding="utf-8", errors="replace") for path in log_paths)
    claims = read_claims(claims_paths)
    claim_counts = Counter(task_id for task_id, _, _ in claims)
    stats = hammer_stats(db_path)

    assert exit_codes == [0, 0, 0, 0], logs
    assert "database is locked" not in logs
    assert [task_id for task_id, count in claim_counts.items() if count > 1] == []
    assert {attempt for _, attempt, _ in claims} == {1}
    assert set(claim_counts) == expected_ids
    assert stats.done == task_count
    assert stats.pending == 0
    assert stats.dead == 0


@pytest.mark.timeout(90)
def test_sqlite_producer_with_consumers(tmp_path: Path) -> None:
    task_count = 3000
    db_path = tmp_path / "hammer.sqlite"
    expected_ids = {task.task_id for task in map(hammer_task, range(task_count))}
    prepare_hammer_file(db_path, [], producer_done=False)

    owners = ["consumer-0", "consumer-1"]
    claims_paths = [tmp_path / f"{owner}.claims" for owner in owners]
    log_paths = [tmp_path / f"{name}.log" for name in [*owners, "producer"]]
    processes = [
        start_hammer(["consume", str(db_path), owner, str(claims), "--batch", "7", "--lease-s", "5"], log)
        for owner, claims, log in zip(owners, claims_paths, log_paths)
    ]
    processes.append(start_hammer(["produce", str(db_path), "--tasks", str(task_count), "--batch", "50"], log_paths[-1]))
    exit_codes = wait_for_processes(processes, HAMMER_TIMEOUT_S)

    logs = "".join(path.read_text(encoding="utf-8", errors="replace") for path in log_paths)
    claims = read_claims(claims_paths)
    claim_counts = Counter(task_id for task_id, _, _ in claims)
    stats = hammer_stats(db_path)

    assert exit_codes == [0, 0, 0], logs
    assert "database is locked" not in logs
    assert [task_id for task_id, count in claim_counts.items() if count > 1] == []
    assert {attempt for _, attempt, _ in claims} == {1}
    assert set(claim_counts) == expected_ids
    assert stats.done == task_count
    assert stats.pending == 0


# -- SQLite only: opening files ------------------------------------------


def make_foreign_database(path: Path) -> None:
    """Create a SQLite file that another program owns: its own table, rollback journal."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
        db.commit()


def read_journal_mode(path: Path) -> str:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


def test_sqlite_concurrent_first_open(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    script = (
        "import sys\n"
        "from qworker.backends.sqlite import SqliteQueue\n"
        "SqliteQueue(sys.argv[1], 'jobs')\n"
    )
    for round_number in range(5):
        path = tmp_path / f"new-{round_number}.sqlite"
        children = [subprocess.Popen([sys.executable, "-c", script, str(path)], stderr=subprocess.PIPE) for _ in range(6)]
        errors = [child.communicate(timeout=60)[1].decode() for child in children]

        assert [child.returncode for child in children] == [0] * 6, errors
        assert read_journal_mode(path) == "wal"


def test_sqlite_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(QueueFileError) as excinfo:
        SqliteQueue(tmp_path, "jobs")

    assert str(tmp_path) in str(excinfo.value)
    assert "is a directory" in str(excinfo.value)


def test_sqlite_text_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are notes, not a database\n" * 200)

    with pytest.raises(QueueFileError) as excinfo:
        SqliteQueue(path, "jobs")

    assert str(path) in str(excinfo.value)
    assert "cannot be opened as a SQLite database" in str(excinfo.value)


def test_sqlite_missing_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "missing.sqlite"

    with pytest.raises(QueueFileError) as excinfo:
        SqliteQueue(path, "jobs", create=False)

    assert str(path) in str(excinfo.value)
    assert "not found" in str(excinfo.value)
    assert not path.exists()


def test_sqlite_foreign_database_rejected(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    make_foreign_database(path)

    with pytest.raises(QueueFileError) as excinfo:
        SqliteQueue(path, "jobs")

    assert str(path) in str(excinfo.value)
    assert "is not a qworker queue" in str(excinfo.value)


def test_sqlite_newer_schema_rejected(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    SqliteQueue(path, "jobs")._connection.close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")

    with pytest.raises(QueueFileError) as excinfo:
        SqliteQueue(path, "jobs")

    assert "schema version 99" in str(excinfo.value)


async def test_sqlite_schema_1_migrated(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    old = SqliteQueue(path, "jobs")
    await old.put(make_tasks(2))
    await old.close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("ALTER TABLE tasks DROP COLUMN oom_moves")
        db.execute("PRAGMA user_version = 1")

    queue = SqliteQueue(path, "jobs")
    stats = await queue.stats()
    leases = await queue.claim("owner-a", limit=2, lease_s=LONG_LEASE_S)
    await queue.settle(oom_moves=[OomMove(leases[0], "OutOfMemoryError")])
    moved = await queue.stats()
    await queue.close()
    with closing(sqlite3.connect(path)) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]

    assert stats.queued == 2
    assert stats.oom_moves == 0
    assert moved.oom_moves == 1
    assert version == 2


def test_sqlite_foreign_database_unchanged(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    make_foreign_database(foreign)
    mode_before = read_journal_mode(foreign)

    with pytest.raises(QueueFileError):
        SqliteQueue(foreign, "jobs")

    assert read_journal_mode(foreign) == mode_before


def test_sqlite_invalid_synchronous_rejected(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"

    with pytest.raises(QueueFileError) as excinfo:
        SqliteQueue(path, "jobs", synchronous="fast")

    assert "synchronous" in str(excinfo.value)
    assert "FAST" in str(excinfo.value)
    assert not path.exists()


@pytest.mark.parametrize("mode", ["off", "normal", "FULL", "Extra"])
async def test_sqlite_synchronous_modes_accepted(tmp_path: Path, mode: str) -> None:
    async with SqliteQueue(tmp_path / "queue.sqlite", "jobs", synchronous=mode) as queue:
        await queue.put(make_tasks(1))
        leases = await queue.claim("owner-a", limit=1, lease_s=LONG_LEASE_S)

    assert len(leases) == 1


# -- SQLite only: purge and exists ---------------------------------------


async def test_sqlite_purge_own_queue_only(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    async with SqliteQueue(path, "jobs") as jobs, SqliteQueue(path, "other") as other:
        await jobs.put(make_tasks(3))
        await other.put(make_tasks(2))
        await jobs.ack(await jobs.claim("owner-a", limit=1, lease_s=LONG_LEASE_S))

        deleted = await jobs.purge()
        jobs_stats = await jobs.stats()
        other_stats = await other.stats()

    assert deleted == 3
    assert jobs_stats.total == 0
    assert other_stats.total == 2
    assert other_stats.queued == 2


async def test_sqlite_exists_after_put(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    async with SqliteQueue(path, "jobs") as jobs, SqliteQueue(path, "other") as other:
        before = await jobs.exists()
        await jobs.put(make_tasks(1))
        after = await jobs.exists()
        other_exists = await other.exists()

    assert before is False
    assert after is True
    assert other_exists is False
