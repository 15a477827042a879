"""The Modal adapter beyond the contract: packing, backpressure, reconciling, consumers in real processes.

Everything runs through the real modal client against the local
Modal-compatible server (the session-wide ``modal_server`` fixture).
"""

from __future__ import annotations

import json
import re
import logging
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from conftest import TESTS_DIR, make_tasks, wait_until
from qworker.backends.modal_queue import MODAL_MAX_ITEMS_PER_PARTITION, ModalQueueSettings, ModalTaskQueue
from qworker.consumer import Consumer, ConsumerSettings
from qworker.errors import TaskTooLargeError
from qworker.layout import Layout
from qworker.reducer import Reducer
from qworker.results import iter_result_files
from qworker.sink import SinkSettings
from qworker.task import Task
from qworker.workloads import get_workload
from support_workloads import read_journal

pytestmark = pytest.mark.usefixtures("modal_server")


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def open_queue(tmp_path: Path, name: str, **settings: Any) -> ModalTaskQueue:
    return await ModalTaskQueue.open(name, tmp_path / "dead_letters", ModalQueueSettings(**settings))


def modal_cli(server, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**subprocess_env(), **server.client_env()}
    return subprocess.run([sys.executable, "-m", "qworker", *args, "--backend", "modal-local"],
                          capture_output=True, text=True, timeout=timeout_s, env=env)


def subprocess_env() -> dict[str, str]:
    from conftest import qworker_env

    return qworker_env()


def test_tasks_packed_into_items(tmp_path: Path, modal_server) -> None:
    async def main() -> tuple[int, int, int]:
        queue = await open_queue(tmp_path, unique("pack"), partitions=2, tasks_per_item=100)
        await queue.put(make_tasks(250, {"x": 1}))
        items = await queue._queue.len.aio(total=True)
        first = await queue.claim("owner-a", 10, 30)
        modal_server.reset_counts()
        second = await queue.claim("owner-a", 10, 30)
        gets = modal_server.rpc_counts().get("QueueGet", 0)
        return items, len(first) + len(second), gets

    items, claimed, gets = anyio.run(main)

    assert items == 3
    assert claimed == 20
    assert gets == 0  # the second claim is served from the first item's overflow


def test_overflow_belongs_to_its_owner(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        queue = await open_queue(tmp_path, unique("owner"), partitions=1, tasks_per_item=100)
        await queue.put(make_tasks(150, {"x": 1}))
        first = await queue.claim("owner-a", 10, 30)
        other = await queue.claim("owner-b", 200, 30)
        return len(first), len(other)

    first, other = anyio.run(main)

    assert first == 10
    assert other == 50


def test_expired_overflow_is_redelivered(tmp_path: Path) -> None:
    async def main() -> list[int]:
        name = unique("expire")
        queue = await open_queue(tmp_path, name, partitions=1, tasks_per_item=10, reconcile_interval_s=0.0)
        await queue.put(make_tasks(10, {"x": 1}))
        await queue.claim("owner-a", 2, 0.2)
        await anyio.sleep(0.4)
        other = await open_queue(tmp_path, name, partitions=1, tasks_per_item=10, reconcile_interval_s=0.0)
        leases = await other.claim("owner-b", 100, 30)
        return sorted(lease.task.attempt for lease in leases)

    attempts = anyio.run(main)

    assert attempts == [2] * 10


def test_task_lost_after_get_is_redelivered(tmp_path: Path) -> None:
    async def main() -> tuple[int, list[str], Any]:
        queue = await open_queue(
            tmp_path, unique("lost"), partitions=1, tasks_per_item=5, reconcile_interval_s=0.0,
            put_timeout_s=0.0, lost_grace_s=0.0,
        )
        tasks = make_tasks(5, {"x": 1})
        await queue.put(tasks)
        # A consumer that dies right after get: the item leaves the queue, no lease is written.
        removed = await queue._queue.get_many.aio(10, block=False, partition=queue.partition_key("default", 0))
        report = await queue.reconcile()
        leases = await queue.claim("owner-a", 10, 30)
        return len(removed), sorted(lease.task_id for lease in leases), report

    removed, claimed, report = anyio.run(main)

    assert removed == 1
    assert report.lost == 5
    assert claimed == sorted(task.task_id for task in make_tasks(5, {"x": 1}))


def test_oversized_task_rejected_before_sending(tmp_path: Path) -> None:
    big = Task.create(1, {"blob": "x" * 2_000_000})

    async def main() -> tuple[str, bool]:
        queue = await open_queue(tmp_path, unique("big"))
        with pytest.raises(TaskTooLargeError) as raised:
            await queue.put([Task.create(0, {}), big])
        return str(raised.value), await queue.has_pending()

    message, pending = anyio.run(main)

    assert big.task_id in message
    assert re.search(r"is 2,000,1[0-9][0-9] bytes as JSON", message)
    assert "1,032,192 bytes" in message
    assert pending is False


def test_push_20000_waits_while_full(tmp_path: Path, caplog) -> None:
    task_count = 20_000
    tasks = [Task.create(seed, {}, f"t{seed:05d}") for seed in range(task_count)]
    settings = {"partitions": 2, "tasks_per_item": 1, "reconcile_interval_s": 1.0, "put_timeout_s": 120}
    name = unique("bulk")
    claimed: list[str] = []

    async def consume(done: anyio.Event) -> None:
        queue = await open_queue(tmp_path, name, **settings)
        # Start only once the producer found both partitions full and said it waits.
        # Waiting for the queue length alone let a quick claim free room before
        # the producer's next put, so it sometimes never had to wait.
        while not any("is full" in record.getMessage() for record in caplog.records):
            await anyio.sleep(0.2)
        while True:
            leases = await queue.claim("consumer", 500, 60)
            claimed.extend(lease.task_id for lease in leases)
            if leases:
                await queue.ack(leases)
            elif done.is_set() and not await queue.has_pending():
                return
            else:
                await anyio.sleep(0.05)

    async def main() -> Any:
        producer = await open_queue(tmp_path, name, **settings)
        done = anyio.Event()
        with anyio.fail_after(240):
            async with anyio.create_task_group() as group:
                group.start_soon(consume, done)
                result = await producer.put(tasks)
                done.set()
        return result, await producer.stats()

    with caplog.at_level(logging.WARNING, logger="qworker.modal"):
        result, stats = anyio.run(main)

    assert result.added == task_count
    assert len(claimed) == task_count
    assert len(set(claimed)) == task_count
    assert stats.done == task_count
    assert any("is full" in record.getMessage() for record in caplog.records)
    assert task_count > 2 * MODAL_MAX_ITEMS_PER_PARTITION


def test_acks_wait_for_volume_commit(tmp_path: Path) -> None:
    commits: list[int] = []
    name = unique("commit")

    async def main() -> tuple[int, int]:
        queue = await open_queue(tmp_path, name, partitions=1, tasks_per_item=100)
        await queue.put(make_tasks(25, {"sleep_s": 0}))

        async def commit() -> None:
            stats = await queue.stats()
            commits.append(stats.done)

        settings = ConsumerSettings(slots=4, burst=True, scratch_root=tmp_path / "scratch",
                                    sink=SinkSettings(commit_every=10, commit_s=60))
        consumer = Consumer(queue, get_workload("sleep"), tmp_path / "results", settings, commit=commit)
        with anyio.fail_after(60):
            await consumer.run()
        return (await queue.stats()).done, len(list(iter_result_files(tmp_path / "results")))

    done, files = anyio.run(main)

    assert done == 25
    assert files == 25
    # At least one commit per 10 results; an idle consumer may commit sooner.
    assert len(commits) >= 3
    # Each commit sees only tasks acked after earlier commits, never the ones it covers.
    assert commits == sorted(commits)
    assert commits[0] == 0
    assert commits[-1] < 25


def test_cli_consumers_on_modal_local(tmp_path: Path, modal_server) -> None:
    data = str(tmp_path / "data")
    job = tmp_path / "job.json"
    queue_name = unique("cli")
    job.write_text(json.dumps({"queue": queue_name, "workload": "sleep", "config": {"sleep_s": 0.01}}))

    pushed = modal_cli(modal_server, "push", "--job", str(job), "--seeds", "0:200", "--tasks-per-item", "10", "--data-dir", data)
    worked = modal_cli(modal_server, "work", "--queue", queue_name, "--burst", "--processes", "2", "--data-dir", data)
    status = modal_cli(modal_server, "status", "--queue", queue_name, "--json", "--data-dir", data)

    assert pushed.returncode == 0, pushed.stderr
    assert worked.returncode == 0, worked.stderr
    assert json.loads(status.stdout)["done"] == 200
    results = Layout(Path(data)).results_dir(queue_name)
    assert Reducer(results).run().total_tasks == 200


def test_sigkill_mid_task_on_modal(tmp_path: Path, modal_server, processes: list) -> None:
    data = tmp_path / "data"
    journal = tmp_path / "journal"
    queue_name = unique("kill")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({
        "queue": queue_name, "workload": "support_workloads:slow_sync",
        "config": {"hang_first": True, "journal": str(journal)},
    }))
    env = {**subprocess_env(), **modal_server.client_env()}
    common = ["--data-dir", str(data), "--backend", "modal-local"]

    pushed = subprocess.run([sys.executable, "-m", "qworker", "push", "--job", str(job), "--seeds", "0:1", *common],
                            capture_output=True, text=True, env=env, timeout=60)
    assert pushed.returncode == 0, pushed.stderr
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "qworker", "work", "--queue", queue_name, "--lease-s", "1", *common],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=TESTS_DIR)
    processes.append(first)
    wait_until(lambda: read_journal(journal), timeout_s=60)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)

    second = subprocess.run(
        [sys.executable, "-m", "qworker", "work", "--queue", queue_name, "--lease-s", "1", "--burst", *common],
        capture_output=True, text=True, env=env, timeout=120,
    )

    assert second.returncode == 0, second.stderr
    assert [row[1] for row in read_journal(journal) if row[3] == "end"] == [2]
    results = Layout(data).results_dir(queue_name)
    assert len(list(iter_result_files(results))) == 1
    assert Reducer(results).run().total_tasks == 1


def test_oom_tasks_finish_on_solo_lane_on_modal(tmp_path: Path, modal_server) -> None:
    data = str(tmp_path / "data")
    queue_name = unique("oom")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({
        "queue": queue_name, "workload": "support_workloads:oom_unless_solo",
        "variants": [{"oom": True}, {"oom": False}],
    }))

    pushed = modal_cli(modal_server, "push", "--job", str(job), "--seeds", "0:3", "--data-dir", data)
    worked = modal_cli(modal_server, "work", "--queue", queue_name, "--burst", "--data-dir", data)
    status = modal_cli(modal_server, "status", "--queue", queue_name, "--json", "--data-dir", data)

    assert pushed.returncode == 0, pushed.stderr
    assert worked.returncode == 0, worked.stderr
    counts = json.loads(status.stdout)
    assert counts["done"] == 6
    assert counts["oom_moves"] == 3
    results = Layout(Path(data)).results_dir(queue_name)
    rows = [row for path in iter_result_files(results) for row in pq.read_table(path).to_pylist()]
    assert sorted(row["lane"] for row in rows) == ["default"] * 3 + ["solo"] * 3
