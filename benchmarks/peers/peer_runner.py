"""One timed run of a peer variant: producer and worker processes, completion from the count files.

End to end: the producer process starts and connects, the workers start and
become ready and idle, then the harness signals the producer to start. The timer
starts at the producer's first push. Drain: the producer fills the queue
and exits, then the workers start. The timer starts right before the first
worker process is started. In both modes the run ends at the latest task
finish time that the workers published once the published counts add up to
the number of tasks.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from completion import COUNT_DIR_ENV, Progress, ProgressReader, count_ready
from processes import WorkerError, WorkerGroup
from redis_server import RedisServer
from timing import POLL_S, RunFailed, RunTiming
from variants import PeerVariant, RunPaths

PEERS_DIR = Path(__file__).resolve().parent
PRODUCER_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PeerEnvironment:
    """The peers' Python interpreters by environment name (see ``PeerVariant.environment``) and the Redis server, if any."""

    pythons: dict[str, Path]
    redis: RedisServer | None

    def python(self, variant: PeerVariant) -> Path:
        return self.pythons[variant.environment]


def _base_env(peers: PeerEnvironment, variant: PeerVariant, paths: RunPaths, count_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update({
        "PATH": f"{paths.bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(paths.bin_dir.parent),
        "PYTHONPATH": str(PEERS_DIR),
        COUNT_DIR_ENV: str(count_dir),
        "PEERS_REDIS_URL": paths.redis_url,
        "PEERS_HUEY_DB": str(paths.huey_db),
    })
    env.update(variant.env)
    return env


def _start_producer(python: Path, system: str, count: int, env: dict[str, str], log_path: Path,
                    *, wait_go: bool) -> subprocess.Popen[bytes]:
    command = [str(python), str(PEERS_DIR / "produce.py"), system, "--count", str(count)]
    if wait_go:
        command.append("--wait-go")
    with open(log_path, "ab") as log:
        # bufsize=0: unbuffered pipes, so a line that select() reports is not already sitting in a Python buffer.
        return subprocess.Popen(command, env=env, cwd=PEERS_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True, bufsize=0)


def _read_json_line(process: subprocess.Popen[bytes], timeout_s: float, what: str, log_path: Path) -> dict[str, Any]:
    """Read one JSON line from the producer's standard output within ``timeout_s`` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise RunFailed(f"the producer sent no {what} line within {timeout_s:g} s; see {log_path}", done=0)
    line = process.stdout.readline()
    if not line:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:] if log_path.exists() else []
        raise RunFailed(f"the producer exited (code {process.wait()}) before its {what} line: {' | '.join(tail)}", done=0)
    return json.loads(line)


def _stop_producer(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    if process.poll() is None:
        process.kill()  # by its PID; the producer has no state worth a graceful stop
    process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def _wait_for_count(count_dir: Path, count: int, deadline: float, workers: WorkerGroup) -> Progress:
    """Poll the count files until their sum reaches ``count``; raise RunFailed at ``deadline`` (unix seconds) or when a worker exits."""
    reader = ProgressReader(count_dir)
    while True:
        progress = reader.read()
        if progress.count >= count:
            return progress
        if time.time() > deadline:
            raise RunFailed(f"timed out with {progress.count} of {count} tasks finished (raise --timeout-s)", done=progress.count,
                            timed_out=True)
        if workers.exited():
            raise RunFailed(f"worker processes exited (codes {workers.exited()}) with {progress.count} of {count} tasks finished;"
                            f" log tail:\n{workers.log_tail()}", done=progress.count)
        time.sleep(POLL_S)


def _ready_counter(variant: PeerVariant, peers: PeerEnvironment, count_dir: Path) -> Any:
    if variant.ready == "rq-workers":
        assert peers.redis is not None
        redis = peers.redis
        return lambda: int(redis.command("SCARD", "rq:workers") or 0)
    return lambda: count_ready(count_dir)


def run(variant: PeerVariant, mode: str, count: int, peers: PeerEnvironment, folder: Path,
        timeout_s: float) -> tuple[RunTiming, dict[str, Any]]:
    """Run ``variant`` once in ``mode`` ("end_to_end" or "drain") with its files under the empty ``folder``.

    Returns the timing and the producer's description of its settings.
    """
    count_dir = folder / "counts"
    count_dir.mkdir()
    redis_url = peers.redis.url if peers.redis is not None else ""
    python = peers.python(variant)
    paths = RunPaths(bin_dir=python.parent, redis_url=redis_url, huey_db=folder / "huey.db")
    env = _base_env(peers, variant, paths, count_dir)
    producer_log = folder / "producer.log"
    workers = WorkerGroup(log_path=folder / "workers.log")
    if peers.redis is not None and variant.needs_redis:
        peers.redis.flush()

    producer: subprocess.Popen[bytes] | None = None
    try:
        if mode == "drain":
            producer = _start_producer(python, variant.system, count, {**env, **variant.fill_env}, producer_log, wait_go=False)
            described = _read_json_line(producer, PRODUCER_READY_TIMEOUT_S, "ready", producer_log)["ready"]
            pushed = _read_json_line(producer, timeout_s, "pushed", producer_log)
            _stop_producer(producer)
            workers.start(variant.commands(paths), env=env, cwd=PEERS_DIR)
            started_at = workers.started_at
            progress = _wait_for_count(count_dir, count, started_at + timeout_s, workers)
        else:
            producer = _start_producer(python, variant.system, count, env, producer_log, wait_go=True)
            described = _read_json_line(producer, PRODUCER_READY_TIMEOUT_S, "ready", producer_log)["ready"]
            workers.start(variant.commands(paths), env=env, cwd=PEERS_DIR)
            try:
                workers.wait_until_ready(_ready_counter(variant, peers, count_dir), variant.ready_expected, timeout_s)
            except WorkerError as exc:
                raise RunFailed(str(exc), done=0) from None
            assert producer.stdin is not None
            go_at = time.time()
            producer.stdin.write(b"go\n")
            producer.stdin.flush()
            progress = _wait_for_count(count_dir, count, go_at + timeout_s, workers)
            pushed = _read_json_line(producer, max(1.0, go_at + timeout_s - time.time()), "pushed", producer_log)
            started_at = pushed["first_push"]
    finally:
        _stop_producer(producer)
        workers.stop()

    timing = RunTiming(tasks=count, done=progress.count, started_at=started_at, first_finish=progress.first_finish,
                       last_finish=progress.last_finish, push_s=pushed["pushed"] - pushed["first_push"])
    return timing, described
