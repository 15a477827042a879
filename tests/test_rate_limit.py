"""The shared rate limiter with real consumer processes and a real HTTP API on 127.0.0.1.

The API (``qworker.testing.http_api``) records when every request arrived,
so the budget is checked where it matters: at the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import httpx
import pyarrow.parquet as pq
import pytest

from conftest import dead_letters, run_qworker, start_qworker, stats, wait_until
from qworker.layout import Layout
from qworker.queue import DeadTask
from qworker.ratelimit import Budget, RateLimiter, SqliteBucket
from qworker.results import iter_result_files
from qworker.testing.http_api import HOST, HttpApi, RequestRecord, make_records, max_in_window, utilisation

RATE = 50
BURST = 5
QUEUE = "api"
# Requests granted before a pause reached the bucket may still arrive this
# long after the 429 that caused it. After that, none may arrive until the pause ends.
STRAGGLER_WINDOW_S = 0.25
SECRET_ENV = "QWORKER_TEST_API_TOKEN"


def write_job(
    path: Path,
    url: str,
    *,
    count: int = 1,
    variants: list[dict[str, Any]] | None = None,
    max_attempts: int = 3,
    header_env: dict[str, str] | None = None,
) -> Path:
    job = {
        "queue": QUEUE,
        "workload": "http",
        "max_attempts": max_attempts,
        "config": {"url": url, "count": count},
        "http": {"budgets": {HOST: {"rate": RATE, "burst": BURST}}, "header_env": header_env or {}},
    }
    if variants is not None:
        job["variants"] = variants
    path.write_text(json.dumps(job))
    return path


def push_job(data_dir: Path, job: Path, seeds: str, backend: str = "sqlite") -> None:
    pushed = run_qworker("push", "--data-dir", str(data_dir), "--job", str(job), "--seeds", seeds, "--backend", backend)
    assert pushed.returncode == 0, pushed.stderr


def work_args(
    data_dir: Path, processes: int, slots: int, *extra: str, burst: bool = True, backend: str = "sqlite"
) -> list[str]:
    log_file = data_dir / "logs" / "consumer-{index}.log"
    return ["work", "--data-dir", str(data_dir), "--queue", QUEUE, "--processes", str(processes),
            "--slots", str(slots), "--log-file", str(log_file), "--backend", backend,
            *(["--burst"] if burst else []), *extra]


def done_count(data_dir: Path, backend: str) -> int:
    if backend == "sqlite":
        return stats(data_dir, QUEUE).done
    status = run_qworker("status", "--data-dir", str(data_dir), "--queue", QUEUE, "--json", "--backend", backend)
    return json.loads(status.stdout)["done"] if status.returncode == 0 else -1


def consumer_logs(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "logs").glob("consumer-*.log"))


def all_consumers_started(data_dir: Path, count: int) -> bool:
    logs = consumer_logs(data_dir)
    return len(logs) == count and all("consumer started" in log.read_text() for log in logs)


def api_arrivals(api: HttpApi) -> list[float]:
    return [record.arrived_at for record in api.requests() if record.path.endswith("/records")]


# -- the budget across processes -------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "modal-local"])
def test_budget_holds_across_four_processes(
    data_dir: Path, tmp_path: Path, processes: list[subprocess.Popen], backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "modal-local":
        request.getfixturevalue("modal_server")  # consumers inherit its address through the environment
    with HttpApi(limit=RATE + BURST) as api:
        job = write_job(tmp_path / "job.json", api.url)
        # `qworker work` needs an existing queue, so one task goes first.
        push_job(data_dir, job, "0:1", backend)
        work = start_qworker(*work_args(data_dir, 4, 8, burst=False, backend=backend), log_path=tmp_path / "work.log")
        processes.append(work)
        # NOTE: the consumers start before the load. On fewer cores than
        # processes, one still importing can delay another's first granted
        # requests by more than the spacing headroom, and the first window at
        # the server then holds rate + burst + 1 requests.
        wait_until(lambda: all_consumers_started(data_dir, 4), timeout_s=30)
        wait_until(lambda: done_count(data_dir, backend) == 1, timeout_s=60)
        api.clear()

        push_job(data_dir, job, "1:301", backend)
        wait_until(lambda: done_count(data_dir, backend) == 301, timeout_s=90, interval_s=0.5)
        work.send_signal(signal.SIGTERM)
        assert work.wait(timeout=30) == 0, (tmp_path / "work.log").read_text()
        arrivals = api_arrivals(api)
        statuses = api.status_counts()

    assert len(arrivals) == 300
    assert statuses.get(429, 0) == 0
    assert max_in_window(arrivals) <= RATE + BURST
    assert utilisation(arrivals, RATE) >= 0.9


def test_retry_after_pauses_every_process(data_dir: Path, tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    with HttpApi() as api:
        push_job(data_dir, write_job(tmp_path / "job.json", api.url), "0:150")
        work = start_qworker(*work_args(data_dir, 4, 8, "--retry-base-s", "0.05"), log_path=tmp_path / "work.log")
        processes.append(work)

        # Every process has run a task, so all four have requests waiting when the 429 comes.
        wait_until(lambda: len(consumer_logs(data_dir)) == 4
                   and all("task done" in log.read_text() for log in consumer_logs(data_dir)), timeout_s=30)
        api.fail_next(429, retry_after=2)
        assert work.wait(timeout=60) == 0, (tmp_path / "work.log").read_text()
        records = api.requests()

    [throttled] = [record for record in records if record.status == 429]
    later = sorted(record.arrived_at for record in records if record.arrived_at > throttled.arrived_at)
    resumed = [arrived for arrived in later if arrived >= throttled.arrived_at + STRAGGLER_WINDOW_S]
    assert resumed, "no request arrived after the pause"
    assert resumed[0] - throttled.arrived_at >= 2.0
    assert stats(data_dir, QUEUE).done == 150

    status = run_qworker("status", "--data-dir", str(data_dir), "--queue", QUEUE, "--json")
    assert status.returncode == 0, status.stderr
    [budget] = json.loads(status.stdout)["rate_limits"]
    assert budget["name"] == HOST
    assert budget["throttled"] == 1
    assert budget["granted"] == 151


# -- one limiter in one process --------------------------------------------------


def test_ten_thousand_waiters_do_not_stall_loop(tmp_path: Path) -> None:
    bucket = SqliteBucket(tmp_path / "bucket.db")
    limiter = RateLimiter(bucket, [Budget("fast", rate=20_000, burst=100)])

    async def main() -> tuple[list[float], int]:
        lags: list[float] = []
        max_waiting = 0
        finished = asyncio.Event()

        async def ticker() -> None:
            nonlocal max_waiting
            while not finished.is_set():
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - before - 0.01)
                max_waiting = max(max_waiting, limiter.waiting("fast"))

        waiters = [asyncio.create_task(limiter.acquire("fast")) for _ in range(10_000)]
        # Each task runs to its first await here. The ticker starts after that,
        # because creating 10,000 tasks stalls the loop for tens of milliseconds
        # with or without a limiter.
        await asyncio.sleep(0)
        ticking = asyncio.create_task(ticker())
        await asyncio.gather(*waiters)
        finished.set()
        await ticking
        return lags, max_waiting

    try:
        lags, max_waiting = asyncio.run(main())
    finally:
        bucket.close()

    assert limiter.local_granted == 10_000
    assert max_waiting >= 5_000
    assert len(lags) >= 20
    assert max(lags) < 0.05


def test_limiter_survives_successive_event_loops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bucket = SqliteBucket(tmp_path / "bucket.db")
    limiter = RateLimiter(bucket, [Budget("api", rate=200, burst=5)])

    async def acquire_twenty() -> float:
        waits = await asyncio.gather(*(limiter.acquire("api") for _ in range(20)))
        return max(waits)

    with caplog.at_level(logging.WARNING, logger="qworker.ratelimit"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            first = asyncio.run(acquire_twenty())
            second = asyncio.run(acquire_twenty())
        finally:
            bucket.close()

    assert limiter.local_granted == 40
    assert first < 5
    assert second < 5
    assert [str(warning.message) for warning in caught] == []
    assert caplog.records == []


# -- failed requests and credentials --------------------------------------------


class MixedRun:
    """One run of tasks that succeed, get 404 and get 500, with a credential header."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.secret = f"Bearer qworker-test-{uuid.uuid4().hex}"
        self.outputs: dict[str, str] = {}
        self.records: list[RequestRecord] = []
        self.dead: list[DeadTask] = []
        self.url = ""

    def run(self) -> None:
        with HttpApi() as api:
            self.url = api.url
            variants = [{"url": api.url}, {"url": f"{api.url}/missing"}, {"url": f"{api.url}/error/500"}]
            job = write_job(self.root / "job.json", api.url, count=3, variants=variants,
                            header_env={"Authorization": SECRET_ENV})
            push_job(self.data_dir, job, "0:6")
            work = run_qworker(*work_args(self.data_dir, 2, 4, "--retry-base-s", "0.05", "--log-level", "DEBUG"),
                               timeout_s=60)
            self.records = api.requests()

        assert work.returncode == 0, work.stderr
        self.outputs["work stdout"] = work.stdout
        self.outputs["work stderr"] = work.stderr
        for name in ("status", "status --json"):
            status = run_qworker("status", "--data-dir", str(self.data_dir), "--queue", QUEUE, *name.split()[1:])
            assert status.returncode == 0, status.stderr
            self.outputs[name] = status.stdout + status.stderr
        self.dead = dead_letters(self.data_dir, QUEUE)

    def dead_for(self, path: str) -> list[DeadTask]:
        return [dead for dead in self.dead if dead.task.config["url"] == self.url + path]

    def requests_to(self, path: str) -> list[RequestRecord]:
        return [record for record in self.records if record.path == path]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MixedRun]:
    run = MixedRun(tmp_path_factory.mktemp("mixed"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(SECRET_ENV, run.secret)
        run.run()
    yield run


def test_other_4xx_dead_letters_at_once(mixed_run: MixedRun) -> None:
    dead = mixed_run.dead_for("/missing")

    assert len(dead) == 6
    assert {dead_task.task.attempt for dead_task in dead} == {1}
    for dead_task in dead:
        assert dead_task.error.startswith("PermanentHTTPError: HTTP 404 for GET ")
        assert f"{mixed_run.url}/missing/records" in dead_task.error
    assert len(mixed_run.requests_to("/missing/records")) == 6


def test_5xx_retried_until_max_attempts(mixed_run: MixedRun) -> None:
    dead = mixed_run.dead_for("/error/500")

    assert len(dead) == 6
    assert {dead_task.task.attempt for dead_task in dead} == {3}
    for dead_task in dead:
        assert dead_task.error == f"RetryableHTTPError: HTTP 500 for GET {mixed_run.url}/error/500/records"
    assert len(mixed_run.requests_to("/error/500/records")) == 18


def test_successful_tasks_return_records(mixed_run: MixedRun) -> None:
    assert stats(mixed_run.data_dir, QUEUE).done == 6
    rows = [row for path in iter_result_files(Layout(mixed_run.data_dir).results_dir(QUEUE))
            for row in pq.read_table(path).to_pylist()]
    assert len(rows) == 18
    assert sorted({row["seed"] for row in rows}) == [0, 1, 2, 3, 4, 5]
    for row in rows:
        expected = make_records(row["seed"], 3)[row["index"]]
        assert (row["id"], row["category"], row["value"]) == (expected["id"], expected["category"], expected["value"])


def test_credential_header_arrives(mixed_run: MixedRun) -> None:
    assert len(mixed_run.records) == 6 + 6 + 18
    for record in mixed_run.records:
        assert record.headers.get("authorization") == mixed_run.secret


def test_secret_absent_from_logs(mixed_run: MixedRun) -> None:
    logs = consumer_logs(mixed_run.data_dir)

    assert len(logs) == 2
    assert "task dead" in "".join(log.read_text() for log in logs)
    for log in logs:
        assert mixed_run.secret not in log.read_text(), log
    assert mixed_run.secret not in mixed_run.outputs["work stdout"]
    assert mixed_run.secret not in mixed_run.outputs["work stderr"]


def test_secret_absent_from_dead_letters(mixed_run: MixedRun) -> None:
    assert len(mixed_run.dead) == 12
    for dead in mixed_run.dead:
        assert mixed_run.secret not in dead.error
        assert mixed_run.secret not in dead.traceback


def test_secret_absent_from_results(mixed_run: MixedRun) -> None:
    files = list(iter_result_files(Layout(mixed_run.data_dir).results_dir(QUEUE)))

    assert files
    for path in files:
        assert mixed_run.secret.encode() not in path.read_bytes()
        assert mixed_run.secret not in str(pq.read_table(path).to_pylist())


def test_secret_absent_from_status(mixed_run: MixedRun) -> None:
    assert "127.0.0.1" in mixed_run.outputs["status"]
    assert mixed_run.secret not in mixed_run.outputs["status"]
    assert mixed_run.secret not in mixed_run.outputs["status --json"]


def test_max_in_window_counts_half_open_windows() -> None:
    assert max_in_window([0.0, 0.5, 0.999, 1.0, 1.5]) == 3
    assert max_in_window([]) == 0


def test_run_server_from_command_line(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "qworker.testing.http_api", "--port", "0", "--limit", "2",
         "--arrivals-file", str(tmp_path / "arrivals.jsonl")],
        stdout=subprocess.PIPE, text=True,
    )
    processes.append(server)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client() as client:
            responses = [client.get(f"{url}/records", params={"seed": 7, "count": 2}) for _ in range(3)]
    finally:
        server.terminate()
        server.wait(timeout=10)
        server.stdout.close()

    assert server.returncode == 0
    assert [response.status_code for response in responses] == [200, 200, 429]
    assert responses[2].headers["Retry-After"] == "1"
    assert responses[0].json() == responses[1].json()
    lines = [json.loads(line) for line in (tmp_path / "arrivals.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == [200, 200, 429]
