"""qworker stream: standard input, a followed file killed and restarted, rotation and backpressure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import qworker_env, run_qworker, start_qworker, stats, wait_until

from qworker.layout import Layout
from qworker.results import result_task_ids

JOB = 'queue = "stream"\nworkload = "noop"\n'


def write_job(tmp_path: Path, queue: str = "stream") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(JOB.replace('"stream"', f'"{queue}"'))
    return path


def backend_setup(backend: str, request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """Return the queue name and the CLI arguments for ``backend``; modal-local gets a queue of its own."""
    if backend == "sqlite":
        return "stream", []
    request.getfixturevalue("modal_server")  # subprocesses inherit its address through the environment
    return f"stream-{uuid.uuid4().hex[:8]}", ["--backend", backend]


def queue_counts(data_dir: Path, queue: str, backend_args: list[str]) -> dict:
    if not backend_args:
        return stats(data_dir, queue).as_dict()
    status = run_qworker("status", "--queue", queue, "--json", "--data-dir", str(data_dir), *backend_args)
    return json.loads(status.stdout) if status.returncode == 0 else {}


def records(start: int, stop: int) -> str:
    return "".join(json.dumps({"seed": seed}) + "\n" for seed in range(start, stop))


def test_stream_stdin_rejects_malformed_line(tmp_path: Path, data_dir: Path) -> None:
    job = write_job(tmp_path)
    text = records(0, 50) + "not json\n" + records(50, 100)

    result = subprocess.run(
        [sys.executable, "-m", "qworker", "stream", "--job", str(job), "--stdin", "--stop-at-eof",
         "--data-dir", str(data_dir)],
        input=text, capture_output=True, text=True, timeout=60, env=qworker_env(), check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "line 51: invalid JSON" in result.stderr
    assert "pushed 100" in result.stderr
    assert stats(data_dir, "stream").total == 100


def test_stream_stdin_blocks_writer_at_high_water(tmp_path: Path, data_dir: Path, processes: list) -> None:
    job = write_job(tmp_path)
    log = tmp_path / "stream.log"
    total = 200_000
    with open(log, "wb") as output:
        producer = subprocess.Popen(
            [sys.executable, "-m", "qworker", "stream", "--job", str(job), "--stdin", "--batch", "100",
             "--high-water", "500", "--data-dir", str(data_dir)],
            stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, env=qworker_env(),
        )
    processes.append(producer)
    written = 0

    def write_all() -> None:
        nonlocal written
        try:
            for seed in range(total):
                producer.stdin.write(f'{{"seed": {seed}}}\n'.encode())
                written += 1
        except (BrokenPipeError, ValueError):
            pass  # the producer was stopped at the end of the test

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    try:
        wait_until(lambda: "above the high-water mark 500: waiting" in log.read_text(), timeout_s=30, interval_s=0.2)
        time.sleep(1.0)
        written_while_waiting = written
        still_running = producer.poll() is None
    finally:
        producer.kill()
        producer.wait(timeout=10)
        writer.join(timeout=10)
        with contextlib.suppress(BrokenPipeError):
            producer.stdin.close()  # flushing what is buffered fails once the producer is gone

    assert still_running
    assert written_while_waiting < total // 2  # the pipe is full: the producer stopped reading ahead
    assert stats(data_dir, "stream").total <= 1_000


@pytest.mark.parametrize(("backend", "total"), [("sqlite", 10_000), ("modal-local", 2_000)])
def test_stream_follow_survives_sigkill(
    tmp_path: Path, data_dir: Path, processes: list, backend: str, total: int, request: pytest.FixtureRequest
) -> None:
    queue, backend_args = backend_setup(backend, request)
    job = write_job(tmp_path, queue)
    source = tmp_path / "tasks.jsonl"
    checkpoint = tmp_path / "tasks.ck"
    source.write_text("")

    def write_records() -> None:
        with open(source, "a", encoding="utf-8") as handle:
            for start in range(0, total, 250):
                handle.write(records(start, start + 250))
                handle.flush()
                time.sleep(0.08)

    writer = threading.Thread(target=write_records)
    writer.start()
    arguments = ("stream", "--job", str(job), "--follow", str(source), "--checkpoint", str(checkpoint),
                 "--batch", "200", "--batch-s", "0.2", "--data-dir", str(data_dir), *backend_args)

    for round_number, delay_s in enumerate((0.4, 0.9)):
        producer = start_qworker(*arguments, log_path=tmp_path / f"stream-{round_number}.log")
        processes.append(producer)
        wait_until(checkpoint.exists, timeout_s=20)
        time.sleep(delay_s)
        os.kill(producer.pid, signal.SIGKILL)
        producer.wait(timeout=10)

    writer.join(timeout=30)
    assert not writer.is_alive()
    finished = run_qworker(*arguments, "--stop-at-eof", timeout_s=120)
    assert finished.returncode == 0, finished.stderr
    assert queue_counts(data_dir, queue, backend_args)["total"] == total

    worked = run_qworker("work", "--queue", queue, "--burst", "--processes", "2", "--data-dir", str(data_dir),
                         *backend_args, timeout_s=120)
    assert worked.returncode == 0, worked.stderr
    assert queue_counts(data_dir, queue, backend_args)["done"] == total, worked.stderr[-4000:]
    assert len(result_task_ids(Layout(data_dir).results_dir(queue))) == total


def test_stream_follow_reads_rotated_file(tmp_path: Path, data_dir: Path, processes: list) -> None:
    job = write_job(tmp_path)
    source = tmp_path / "tasks.jsonl"
    checkpoint = tmp_path / "tasks.ck"
    source.write_text(records(0, 50))
    producer = start_qworker("stream", "--job", str(job), "--follow", str(source), "--checkpoint", str(checkpoint),
                             "--batch-s", "0.1", "--data-dir", str(data_dir), log_path=tmp_path / "stream.log")
    processes.append(producer)
    wait_until(lambda: stats(data_dir, "stream").total == 50, timeout_s=20, interval_s=0.2)

    source.rename(tmp_path / "tasks.jsonl.1")
    source.write_text(records(50, 100))
    wait_until(lambda: stats(data_dir, "stream").total == 100, timeout_s=20, interval_s=0.2)

    producer.send_signal(signal.SIGTERM)
    assert producer.wait(timeout=20) == 0
    saved = json.loads(checkpoint.read_text())
    assert saved["inode"] == source.stat().st_ino
    assert saved["offset"] == source.stat().st_size


@pytest.mark.parametrize("backend", ["sqlite", "modal-local"])
def test_stream_waits_at_high_water(
    tmp_path: Path, data_dir: Path, processes: list, backend: str, request: pytest.FixtureRequest
) -> None:
    queue, backend_args = backend_setup(backend, request)
    job = write_job(tmp_path, queue)
    source = tmp_path / "tasks.jsonl"
    source.write_text(records(0, 60))
    log = tmp_path / "stream.log"
    producer = start_qworker("stream", "--job", str(job), "--follow", str(source), "--stop-at-eof",
                             "--batch", "10", "--high-water", "20", "--data-dir", str(data_dir), *backend_args,
                             log_path=log)
    processes.append(producer)

    wait_until(lambda: "above the high-water mark 20: waiting" in log.read_text(), timeout_s=30, interval_s=0.2)
    assert producer.poll() is None
    assert queue_counts(data_dir, queue, backend_args)["depth"] == 20

    worked = run_qworker("work", "--queue", queue, "--burst", "--data-dir", str(data_dir), *backend_args)
    assert worked.returncode == 0, worked.stderr
    # Each burst run drains what is queued, so run consumers until the producer has pushed everything.
    deadline = time.monotonic() + 60
    while producer.poll() is None and time.monotonic() < deadline:
        run_qworker("work", "--queue", queue, "--burst", "--data-dir", str(data_dir), *backend_args)
    assert producer.wait(timeout=20) == 0
    assert queue_counts(data_dir, queue, backend_args)["total"] == 60


class RecordServer:
    """An HTTP endpoint on 127.0.0.1 that returns, for GET ?after=N&limit=M, with records N to N+M as JSON lines."""

    def __init__(self, count: int) -> None:
        import http.server
        import urllib.parse

        lines = records(0, count).splitlines()
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                server.requests += 1
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                after, limit = int(query["after"][0]), int(query["limit"][0])
                body = "".join(line + "\n" for line in lines[after : after + limit]).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/records"

    def __enter__(self) -> "RecordServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_stream_polls_http_endpoint(tmp_path: Path, data_dir: Path) -> None:
    job = write_job(tmp_path)
    checkpoint = tmp_path / "http.ck"

    with RecordServer(300) as server:
        arguments = ("stream", "--job", str(job), "--http", server.url, "--checkpoint", str(checkpoint),
                     "--batch", "40", "--poll-s", "0.1", "--stop-at-eof", "--data-dir", str(data_dir))
        first = run_qworker(*arguments)
        second = run_qworker(*arguments)

    assert first.returncode == 0, first.stderr
    assert "pushed 300" in first.stderr
    assert stats(data_dir, "stream").total == 300
    assert json.loads(checkpoint.read_text())["offset"] == 300
    assert second.returncode == 0, second.stderr
    assert "pushed 0, skipped 0" in second.stderr
