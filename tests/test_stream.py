"""qworker stream: standard input, a followed file killed and restarted, rotation and backpressure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import qworker_env, run_qworker, start_qworker, stats, wait_until

from qworker.layout import Layout
from qworker.results import result_task_ids

JOB = 'queue = "stream"\nworkload = "noop"\n'


def write_job(tmp_path: Path) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    return path


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


def test_stream_follow_survives_sigkill(tmp_path: Path, data_dir: Path, processes: list) -> None:
    job = write_job(tmp_path)
    source = tmp_path / "tasks.jsonl"
    checkpoint = tmp_path / "tasks.ck"
    source.write_text("")
    total = 10_000

    def write_records() -> None:
        with open(source, "a", encoding="utf-8") as handle:
            for start in range(0, total, 250):
                handle.write(records(start, start + 250))
                handle.flush()
                time.sleep(0.08)

    writer = threading.Thread(target=write_records)
    writer.start()
    arguments = ("stream", "--job", str(job), "--follow", str(source), "--checkpoint", str(checkpoint),
                 "--batch", "200", "--batch-s", "0.2", "--data-dir", str(data_dir))

    for round_number, delay_s in enumerate((0.4, 0.9)):
        producer = start_qworker(*arguments, log_path=tmp_path / f"stream-{round_number}.log")
        processes.append(producer)
        wait_until(checkpoint.exists, timeout_s=20)
        time.sleep(delay_s)
        os.kill(producer.pid, signal.SIGKILL)
        producer.wait(timeout=10)

    writer.join(timeout=30)
    assert not writer.is_alive()
    finished = run_qworker(*arguments, "--stop-at-eof")
    assert finished.returncode == 0, finished.stderr
    assert stats(data_dir, "stream").total == total

    worked = run_qworker("work", "--queue", "stream", "--burst", "--processes", "2", "--data-dir", str(data_dir),
                         timeout_s=120)
    assert worked.returncode == 0, worked.stderr
    assert stats(data_dir, "stream").done == total
    assert len(result_task_ids(Layout(data_dir).results_dir("stream"))) == total


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


def test_stream_waits_at_high_water(tmp_path: Path, data_dir: Path, processes: list) -> None:
    job = write_job(tmp_path)
    source = tmp_path / "tasks.jsonl"
    source.write_text(records(0, 60))
    log = tmp_path / "stream.log"
    producer = start_qworker("stream", "--job", str(job), "--follow", str(source), "--stop-at-eof",
                             "--batch", "10", "--high-water", "20", "--data-dir", str(data_dir), log_path=log)
    processes.append(producer)

    wait_until(lambda: "above the high-water mark 20: waiting" in log.read_text(), timeout_s=20, interval_s=0.2)
    assert producer.poll() is None
    assert stats(data_dir, "stream").depth == 20

    worked = run_qworker("work", "--queue", "stream", "--burst", "--data-dir", str(data_dir))
    assert worked.returncode == 0, worked.stderr
    # Each burst run drains what is queued, so run consumers until the producer has pushed everything.
    deadline = time.monotonic() + 40
    while producer.poll() is None and time.monotonic() < deadline:
        run_qworker("work", "--queue", "stream", "--burst", "--data-dir", str(data_dir))
    assert producer.wait(timeout=20) == 0
    assert stats(data_dir, "stream").total == 60
