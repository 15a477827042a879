"""Shared helpers: push tasks to a real SQLite file and run real consumer processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import anyio
import pytest

from qworker.backends.sqlite import SqliteQueue
from qworker.layout import Layout
from qworker.queue import DeadTask, QueueStats
from qworker.task import Task
from qworker.testing.modal_server import LocalModalServer, close_cached_client, point_client_at

TESTS_DIR = Path(__file__).parent


def push(data_dir: Path, queue: str, workload: str, tasks: Iterable[Task]) -> None:
    async def main() -> None:
        async with SqliteQueue(Layout(data_dir).db_path, queue) as q:
            await q.set_metadata({"workload": workload})
            await q.put(list(tasks))

    anyio.run(main)


def stats(data_dir: Path, queue: str) -> QueueStats:
    async def main() -> QueueStats:
        async with SqliteQueue(Layout(data_dir).db_path, queue) as q:
            return await q.stats()

    return anyio.run(main)


def dead_letters(data_dir: Path, queue: str) -> list[DeadTask]:
    async def main() -> list[DeadTask]:
        async with SqliteQueue(Layout(data_dir).db_path, queue) as q:
            return await q.dead_letters()

    return anyio.run(main)


def qworker_env() -> dict[str, str]:
    env = dict(os.environ)
    # Consumer processes on the Modal adapter reconcile every half second, so
    # tests of expired leases need not wait the default 30 s.
    env["QWORKER_MODAL_RECONCILE_S"] = "0.5"
    # And they call a queued task lost after 2 s instead of 30 s when the
    # queue is empty, so a producer killed between its ledger write and its
    # send is repaired within the test.
    env["QWORKER_MODAL_LOST_GRACE_S"] = "2"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return env


def run_qworker(*args: str, timeout_s: float = 60.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion in a child process and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "qworker", *args],
        capture_output=True, text=True, timeout=timeout_s, env=qworker_env(), cwd=cwd,
    )


def start_qworker(*args: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the CLI in a child process, its output going to ``log_path``."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the child's exit and the fixture below
    process = subprocess.Popen([sys.executable, "-m", "qworker", *args], stdout=log, stderr=subprocess.STDOUT, env=qworker_env())
    log.close()
    return process


def wait_until(condition: Callable[[], Any], timeout_s: float, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s} s")


def make_tasks(count: int, config: Mapping[str, Any], **options: Any) -> list[Task]:
    return [Task.create(seed, config, **options) for seed in range(count)]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def processes() -> Iterable[list[subprocess.Popen[bytes]]]:
    """Child processes a test started; any still running at the end are killed by PID."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def modal_server() -> Iterable[LocalModalServer]:
    """One local Modal-compatible server per test session, with this process's modal client pointed at it.

    The modal client caches its first server per process, so every test of a
    session shares this one; tests keep apart by using queue names of their own.
    """
    with LocalModalServer() as server:
        previous = {key: os.environ.get(key) for key in server.client_env()}
        point_client_at(server.url)
        yield server
        close_cached_client()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
