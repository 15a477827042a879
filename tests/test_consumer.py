"""Consumer behaviour in real processes sharing a real SQLite file."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import anyio
import pyarrow.parquet as pq

from conftest import dead_letters, make_tasks, push, run_qworker, start_qworker, stats, wait_until
from qworker.backends.sqlite import SqliteQueue
from qworker.consumer import Consumer, ConsumerSettings
from qworker.layout import Layout
from qworker.reducer import Reducer
from qworker.results import SEGMENTS_DIR, iter_result_files
from qworker.workloads import get_workload
from support_workloads import read_journal


def result_files(data_dir: Path, queue: str) -> list[Path]:
    return sorted(iter_result_files(Layout(data_dir).results_dir(queue)))


def test_burst_processes_drain_queue(data_dir: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(60, {"sleep_s": 0.01}))

    done = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--processes", "2", "--slots", "3")

    assert done.returncode == 0, done.stderr
    assert stats(data_dir, "q").done == 60
    assert len(result_files(data_dir, "q")) == 60


def test_retry_then_dead_letter(data_dir: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    push(data_dir, "q", "support_workloads:always_fail", make_tasks(1, {"journal": str(journal)}, max_attempts=3))

    done = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--retry-base-s", "0.05")

    assert done.returncode == 0, done.stderr
    assert done.stderr.count("task retry") == 2
    assert done.stderr.count("task dead") == 1
    [dead] = dead_letters(data_dir, "q")
    assert dead.error == "ValueError: boom seed=0"
    assert "support_workloads.py" in dead.traceback
    assert dead.task.attempt == 3
    assert [row[1] for row in read_journal(journal)] == [1, 2, 3]
    assert result_files(data_dir, "q") == []


def test_retry_then_success(data_dir: Path) -> None:
    push(data_dir, "q", "support_workloads:flaky", make_tasks(4, {"succeed_on": 2}))

    done = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--retry-base-s", "0.05")

    assert done.returncode == 0, done.stderr
    counts = stats(data_dir, "q")
    assert counts.done == 4
    assert counts.dead == 0
    attempts = [pq.read_table(path).column("attempt")[0].as_py() for path in result_files(data_dir, "q")]
    assert attempts == [2, 2, 2, 2]


def test_long_task_keeps_its_lease(data_dir: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    push(data_dir, "q", "support_workloads:slow_sync", make_tasks(1, {"sleep_s": 3.0, "journal": str(journal)}))
    args = ("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--lease-s", "1", "--slots", "1")

    done = run_qworker(*args, "--processes", "2")

    assert done.returncode == 0, done.stderr
    starts = [row for row in read_journal(journal) if row[3] == "start"]
    assert len(starts) == 1
    assert "lease lost" not in done.stderr
    assert stats(data_dir, "q").done == 1


def test_sigkill_mid_task_redelivers_once(data_dir: Path, tmp_path: Path, processes: list) -> None:
    journal = tmp_path / "journal"
    push(data_dir, "q", "support_workloads:slow_sync", make_tasks(1, {"hang_first": True, "journal": str(journal)}))
    args = ("work", "--data-dir", str(data_dir), "--queue", "q", "--lease-s", "1")

    first = start_qworker(*args, log_path=tmp_path / "first.log")
    processes.append(first)
    wait_until(lambda: read_journal(journal), timeout_s=30)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    second = run_qworker(*args, "--burst")

    assert second.returncode == 0, second.stderr
    assert [row[1] for row in read_journal(journal) if row[3] == "end"] == [2]
    assert len(result_files(data_dir, "q")) == 1
    assert stats(data_dir, "q").done == 1
    report = Reducer(Layout(data_dir).results_dir("q")).run()
    assert report.total_tasks == 1


def test_sigterm_finishes_running_tasks(data_dir: Path, tmp_path: Path, processes: list) -> None:
    journal = tmp_path / "journal"
    push(data_dir, "q", "support_workloads:slow_async", make_tasks(3, {"sleep_s": 1.5, "journal": str(journal)}))

    worker = start_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--slots", "4", log_path=tmp_path / "w.log")
    processes.append(worker)
    wait_until(lambda: len(read_journal(journal)) == 3, timeout_s=30)
    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=20) == 0
    assert stats(data_dir, "q").done == 3
    log = (tmp_path / "w.log").read_text()
    assert "received SIGTERM, stopping gracefully" in log
    assert "consumer stopped" in log
    assert "done=3" in log


def test_sigterm_grace_over_releases_tasks(data_dir: Path, tmp_path: Path, processes: list) -> None:
    journal = tmp_path / "journal"
    push(data_dir, "q", "support_workloads:slow_async", make_tasks(6, {"sleep_s": 60, "journal": str(journal)}))
    args = ("work", "--data-dir", str(data_dir), "--queue", "q", "--slots", "2", "--prefetch", "3", "--grace-s", "0.5")

    worker = start_qworker(*args, log_path=tmp_path / "w.log")
    processes.append(worker)
    wait_until(lambda: len(read_journal(journal)) == 2, timeout_s=30)
    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=20) == 0
    counts = stats(data_dir, "q")
    assert counts.queued == 6
    assert counts.in_flight == 0
    log = (tmp_path / "w.log").read_text()
    assert "released=5" in log or "released=6" in log


def test_pool_forwards_sigterm(data_dir: Path, tmp_path: Path, processes: list) -> None:
    push(data_dir, "q", "sleep", make_tasks(20, {"sleep_s": 0.01}))

    parent = start_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--processes", "2", log_path=tmp_path / "w.log")
    processes.append(parent)
    wait_until(lambda: stats(data_dir, "q").done == 20, timeout_s=60)
    parent.send_signal(signal.SIGTERM)

    assert parent.wait(timeout=30) == 0
    log = (tmp_path / "w.log").read_text()
    assert log.count("consumer stopped") == 3  # two default-lane consumers and the first process's solo consumer
    assert log.count("lane=solo") == 1


def test_segment_results_counted_once(data_dir: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(45, {"sleep_s": 0}))

    done = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--batch-rows", "10", "--batch-s", "0.2")

    assert done.returncode == 0, done.stderr
    files = result_files(data_dir, "q")
    assert all(path.parent.name == SEGMENTS_DIR for path in files)
    assert sum(pq.read_metadata(path).num_rows for path in files) == 45
    assert Reducer(Layout(data_dir).results_dir("q")).run().total_tasks == 45


def test_log_lines_have_fixed_shape(data_dir: Path, caplog) -> None:
    push(data_dir, "q", "sleep", make_tasks(3, {"sleep_s": 0.05}))
    settings = ConsumerSettings(slots=2, burst=True, health_interval_s=0.02, scratch_root=data_dir / "scratch")

    async def main() -> None:
        async with SqliteQueue(Layout(data_dir).db_path, "q") as queue:
            consumer = Consumer(queue, get_workload("sleep"), Layout(data_dir).results_dir("q"), settings)
            with anyio.fail_after(30):
                await consumer.run()

    with caplog.at_level(logging.DEBUG, logger="qworker"):
        anyio.run(main)

    messages = [record.getMessage() for record in caplog.records]
    claimed = [m for m in messages if m.startswith("task claimed ")]
    done = [m for m in messages if m.startswith("task done ")]
    health = [m for m in messages if m.startswith("health ")]
    assert len(claimed) == 3
    assert len(done) == 3
    assert all(" attempt=1 wait_ms=" in m and " duration_ms=" in m for m in done)
    assert health
    assert all("owner=" in m and " done=" in m and " running=" in m for m in health)


def test_unknown_workload_fails_before_claiming(data_dir: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(2, {}))

    done = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--workload", "nope")

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "qworker work: error: unknown workload 'nope': use one of http, montecarlo, noop, sleep, or a module:function path"
    ]
    assert stats(data_dir, "q").queued == 2


def test_handler_returning_bad_rows_is_retried(data_dir: Path) -> None:
    push(data_dir, "q", "support_workloads:bad_rows", make_tasks(1, {}, max_attempts=1))

    done = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst")

    assert done.returncode == 0, done.stderr
    [dead] = dead_letters(data_dir, "q")
    assert "ResultError" in dead.error
    assert "return a pyarrow.Table, a list of dicts, a dict or None" in dead.error




def test_pool_stops_during_startup(data_dir: Path, tmp_path: Path, processes: list) -> None:
    push(data_dir, "q", "sleep", make_tasks(5, {"sleep_s": 0.01}))
    log_path = tmp_path / "w.log"

    parent = start_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--processes", "2", "--no-solo",
                           log_path=log_path)
    processes.append(parent)
    wait_until(lambda: "started 2 consumer processes" in log_path.read_text(), timeout_s=30, interval_s=0.005)
    parent.send_signal(signal.SIGTERM)

    assert parent.wait(timeout=30) == 0
    assert log_path.read_text().count("consumer stopped") == 2


class FailingOnce:
    """Wraps a real queue so that its first claim and first settle raise, as a backend outage would."""

    def __init__(self, queue: SqliteQueue) -> None:
        self._queue = queue
        self.failures = {"claim": 1, "settle": 1}

    def __getattr__(self, name: str):
        method = getattr(self._queue, name)
        if name not in self.failures:
            return method

        async def fail_first(*args, **kwargs):
            if self.failures[name] > 0:
                self.failures[name] -= 1
                raise OSError(f"injected {name} failure")
            return await method(*args, **kwargs)

        return fail_first


def test_backend_errors_are_retried(data_dir: Path, caplog) -> None:
    push(data_dir, "q", "sleep", make_tasks(10, {"sleep_s": 0}))
    settings = ConsumerSettings(slots=2, burst=True, scratch_root=data_dir / "scratch")

    async def main() -> None:
        async with SqliteQueue(Layout(data_dir).db_path, "q") as queue:
            flaky = FailingOnce(queue)
            consumer = Consumer(flaky, get_workload("sleep"), Layout(data_dir).results_dir("q"), settings)
            with anyio.fail_after(30):
                await consumer.run()

    with caplog.at_level(logging.ERROR, logger="qworker"):
        anyio.run(main)

    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("claim failed") for m in messages)
    assert any(m.startswith("settling failed") for m in messages)
    assert stats(data_dir, "q").done == 10


class SettleBlocksOnce:
    """Wraps a real queue so that its first settle with acks hangs until cancelled, as a slow backend at shutdown does."""

    def __init__(self, queue: SqliteQueue) -> None:
        self._queue = queue
        self.blocked = anyio.Event()

    def __getattr__(self, name: str):
        return getattr(self._queue, name)

    async def settle(self, **outcomes) -> None:
        if outcomes.get("acks") and not self.blocked.is_set():
            self.blocked.set()
            await anyio.sleep_forever()
        await self._queue.settle(**outcomes)


def test_cancelled_settle_keeps_acks(data_dir: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(1, {"sleep_s": 0}))
    settings = ConsumerSettings(slots=1, scratch_root=data_dir / "scratch")

    async def main() -> None:
        async with SqliteQueue(Layout(data_dir).db_path, "q") as queue:
            slow = SettleBlocksOnce(queue)
            consumer = Consumer(slow, get_workload("sleep"), Layout(data_dir).results_dir("q"), settings)
            async with anyio.create_task_group() as group:
                group.start_soon(consumer.run)
                with anyio.fail_after(30):
                    await slow.blocked.wait()
                consumer.stop()

    anyio.run(main)

    counts = stats(data_dir, "q")
    assert counts.done == 1
    assert counts.in_flight == 0
